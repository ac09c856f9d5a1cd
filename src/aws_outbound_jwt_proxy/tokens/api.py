"""The tokens package's vocabulary: what callers pass in, get back and implement.

No behaviour here. :class:`TokenPolicy` is the part of the configuration the
token code reads, as a structural protocol, so the configuration object
(``config.Settings``) satisfies it without tokens importing config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import sts

SHUTDOWN = "shutdown"  # error_class when the supervisor is gone
RATE_LIMITED = "sts_rate_limited"  # error_class when --sts-max-rate left no call for a new fetch
TIMEOUT = "timeout"  # error_class when a waiting request ran out of time
INTERNAL = "internal"  # error_class for an unexpected exception in the fetch path
EXPIRED_ON_ARRIVAL = "ExpiredOnArrival"  # STS answered with a token already past its exp


class TokenUnavailable(Exception):
    """No valid token for the set. ``error_class`` is the AWS error code or ``transport``.

    The message never carries AWS error text or token material: handlers answer
    ``502 token unavailable`` and log ``error_class``.
    """

    def __init__(self, error_class: str, retry_after: float = 0.0) -> None:
        super().__init__(error_class)
        self.error_class = error_class
        self.retry_after = retry_after  # RATE_LIMITED: seconds until STS may be called again


class TokenSource(Protocol):
    async def get(self, audiences: tuple[str, ...]) -> str:
        """A valid JWT for the normalized (sorted, de-duplicated) audience set.

        Raises :class:`TokenUnavailable`. Cancel-safe.
        """
        ...


class TokenPolicy(Protocol):
    """The settings the token code reads (``config.Settings`` has them all)."""

    @property
    def token_audiences(self) -> Sequence[str]: ...  # static audiences; empty: dynamic sets only

    @property
    def token_signing_algorithm(self) -> str: ...

    @property
    def token_duration(self) -> int: ...  # seconds asked of STS

    @property
    def token_refresh_skew(self) -> float: ...  # refresh this long before exp

    @property
    def token_tags(self) -> Sequence[tuple[str, str]]: ...

    @property
    def token_cache_max_entries(self) -> int: ...

    @property
    def token_cache_idle_ttl(self) -> float: ...  # a dynamic set unused this long is dropped

    @property
    def upstream_timeout(self) -> float: ...  # longest a request waits for a token

    @property
    def sts_max_rate(self) -> float: ...  # STS calls per second at most (0: no limit)


class Fetcher(Protocol):
    """The STS side: one blocking call, :class:`sts.StsError` on failure."""

    def fetch(
        self, audiences: Sequence[str], algorithm: str, duration: int, tags: Sequence[tuple[str, str]]
    ) -> sts.Token: ...


class TokenObserver(Protocol):
    """Hooks for metrics. ``audience`` is the normalized set joined with ``,``."""

    def fetch_finished(
        self, audience: str, ok: bool, error_class: str | None, seconds: float, background: bool
    ) -> None: ...

    def cache_hit(self, audience: str) -> None: ...

    def cache_miss(self, audience: str) -> None: ...

    def cached_sets(self, count: int) -> None: ...


class NullObserver:
    """The default observer: does nothing."""

    def fetch_finished(
        self, audience: str, ok: bool, error_class: str | None, seconds: float, background: bool
    ) -> None:
        pass

    def cache_hit(self, audience: str) -> None:
        pass

    def cache_miss(self, audience: str) -> None:
        pass

    def cached_sets(self, count: int) -> None:
        pass


@dataclass(frozen=True)
class SetState:
    """Read-only view of one cached set (for metrics and debugging)."""

    audience: str
    static: bool
    seconds_left: float | None  # None: no valid token
    fetching: bool
    error_class: str | None  # class of the last failed attempt, None after a success
