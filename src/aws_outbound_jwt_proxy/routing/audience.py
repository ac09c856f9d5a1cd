"""Target → the audience set a token is minted for.

Static audiences come from ``--token-audience``; without them the audience is
``<scheme>://<host>`` of the target, lower-case, port stripped, IPv6 kept in
brackets. Sets are normalized (sorted, de-duplicated); the cache key and the
metrics label are the set joined with ``,``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .target import Target


def normalize(audiences: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(audiences)))


def key(audiences: tuple[str, ...]) -> str:
    return ",".join(audiences)


def dynamic(target: Target) -> str:
    host = target.host.lower().rstrip(".")
    return f"{target.scheme.lower()}://{host}"


class Resolver:
    """Built once; :meth:`for_target` runs per request and allocates nothing for static sets."""

    def __init__(self, static: Iterable[str] = ()) -> None:
        """``static``: the configured audiences; empty means dynamic (one per target)."""
        audiences = normalize(static)
        self.static: tuple[str, ...] | None = audiences or None

    def for_target(self, target: Target) -> tuple[str, ...]:
        if self.static is not None:
            return self.static
        return (dynamic(target),)
