"""Request → upstream target, plus the upstream allow-list.

Pure logic: :class:`Router` is built once from plain values (scheme, routing
header, pinned target, allow-list) and resolves the
ASGI header list of each request to a :class:`Target` or raises
:class:`RouteError` with the status and body to answer with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .target import Target, parse_authority


class RouteError(Exception):
    """The request cannot be routed: answer ``status`` with ``body``, call nothing."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_self(target: Target, server: tuple[str, int]) -> bool:
    """The target is the listener the request came in on (a request that would loop).

    Catches a routing header or Host naming the proxy's own address; a DNS name
    that resolves to the proxy is not detectable here.
    """
    host = target.host.strip("[]").rstrip(".")
    own_host, own_port = server[0], server[1]
    if target.effective_port != own_port:
        return False
    if host == own_host:
        return True
    return host in _LOOPBACK_NAMES and own_host in _LOOPBACK_NAMES


def host_allowed(target: Target, patterns: Sequence[str]) -> bool:
    """Match against ``host``, ``host:port`` and ``*.suffix`` patterns (lower-case).

    ``*.example.com`` matches ``a.example.com`` but not ``example.com``,
    ``xexample.com`` or ``example.com.evil``. Empty patterns allow everything.
    """
    if not patterns:
        return True
    host = target.host.rstrip(".")
    for pattern in patterns:
        pat_host, pat_port = _split_pattern(pattern)
        if pat_port is not None and pat_port != target.effective_port:
            continue
        if pat_host.startswith("*."):
            suffix = pat_host[1:]  # ".example.com"
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == pat_host:
            return True
    return False


def _split_pattern(pattern: str) -> tuple[str, int | None]:
    if pattern.startswith("["):
        end = pattern.find("]")
        rest = pattern[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            return pattern[: end + 1], int(rest[1:])
        return pattern, None
    name, sep, port = pattern.rpartition(":")
    if sep and port.isdigit():
        return name, int(port)
    return pattern, None


class Router:
    """Built once from the settings; :meth:`resolve` runs per request."""

    def __init__(
        self,
        *,
        scheme: str,
        header: str,
        pinned: Target | None = None,
        allowed: Sequence[str] = (),
    ) -> None:
        """``header`` names the routing header (``Host`` = the request's own Host / :authority);
        ``pinned`` short-circuits routing; ``allowed`` are lower-case host patterns (empty = any)."""
        self.scheme = scheme
        self.allowed = tuple(allowed)
        self.header_label = header
        self.pinned = pinned
        # ``Host`` mode reads the request's own Host; hypercorn maps h2 :authority to it.
        self.header = header.lower().encode("latin-1")
        self.missing_body = f"no upstream: set --upstream-host or send the header {header}\n"

    def resolve(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        server: tuple[str, int] | None = None,
        *,
        absolute: tuple[str, str] | None = None,
    ) -> Target:
        """The request's upstream, or :class:`RouteError`.

        ``server`` is the proxy address the client connected to (ASGI ``scope["server"]``).
        ``absolute`` is ``(scheme, authority)`` of an absolute-form request target
        (``GET http://api.example.com/x``, a client using us as its HTTP proxy): it
        names the upstream, and a routing header, if sent too, must name the same one.
        A port that is the URL scheme's default is dropped, so ``http://api:80`` goes to
        ``--upstream-scheme``'s default port like ``http://api``.
        """
        if self.pinned is not None:
            return self.pinned
        value = self._header_value(headers)
        if absolute is not None:
            url_scheme, authority = absolute
            try:
                target = self._without_default_port(parse_authority(url_scheme, authority))
            except ValueError as exc:
                raise RouteError(400, f"invalid request target: {exc}\n") from None
            if value is not None and not self._same(target, url_scheme, value):
                raise RouteError(400, f"the {self.header_label} header names another upstream than the URL\n")
        else:
            if value is None:
                raise RouteError(400, self.missing_body)
            try:
                target = parse_authority(self.scheme, value.decode("latin-1"))
            except ValueError as exc:
                raise RouteError(400, f"invalid {self.header_label} header: {exc}\n") from None
        if not host_allowed(target, self.allowed):
            raise RouteError(403, "upstream not allowed\n")
        if server is not None and is_self(target, server):
            raise RouteError(508, "loop detected: the upstream is this proxy\n")
        return target

    def connect(self, authority: str, server: tuple[str, int] | None = None) -> Target:
        """The upstream of an intercepted ``CONNECT host:port``, or :class:`RouteError`.

        Always ``https`` (the client speaks TLS in the tunnel), whatever the
        routing scheme; port 443 is dropped like any scheme-default port. Only
        hosts on the allow-list qualify, and an empty list allows nothing here.
        """
        try:
            target = parse_authority("https", authority)
        except ValueError as exc:
            raise RouteError(400, f"invalid CONNECT target: {exc}\n") from None
        if target.port is None:
            raise RouteError(400, "invalid CONNECT target: host:port expected\n")
        if target.default_port:
            target = Target(scheme="https", host=target.host, port=None, authority=target.host)
        if not self.allowed or not host_allowed(target, self.allowed):
            raise RouteError(403, "upstream not allowed\n")
        if server is not None and is_self(target, server):
            raise RouteError(508, "loop detected: the upstream is this proxy\n")
        return target

    def _header_value(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
        """The routing header's value (None when absent or blank); 400 when sent twice, differently."""
        wanted = self.header
        value: bytes | None = None
        for name, val in headers:
            if name == wanted:
                if value is not None and val != value:
                    raise RouteError(400, f"conflicting {self.header_label} headers\n")
                value = val
        if value is None or value.strip() == b"":
            return None
        return value

    def _without_default_port(self, url_target: Target) -> Target:
        """A target parsed under the URL's scheme, re-expressed for ``self.scheme``."""
        port = None if url_target.default_port else url_target.port
        authority = url_target.host if port is None else f"{url_target.host}:{port}"
        return Target(scheme=self.scheme, host=url_target.host, port=port, authority=authority)

    def _same(self, target: Target, url_scheme: str, value: bytes) -> bool:
        try:
            other = self._without_default_port(parse_authority(url_scheme, value.decode("latin-1")))
        except ValueError:
            return False
        return (other.host.rstrip("."), other.port) == (target.host.rstrip("."), target.port)
