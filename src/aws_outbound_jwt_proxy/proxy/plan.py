"""The shared planning step of HTTP and WebSocket: route → allow → audience → token → headers.

:meth:`Planner.plan` turns one request's ASGI scope into either a :class:`Plan`
(where to send it, with which headers, the bearer token included) or a
:class:`~.exchange.Refusal` (what the proxy answers itself). Nothing here talks
to the upstream; the token source is the only thing awaited.

A request that arrived inside an intercepted ``CONNECT`` tunnel carries the
tunnel's target in its connection state (``scope["state"][TUNNEL]``, put
there by the server when it opened the tunnel after :meth:`Planner.admit`):
that target is the upstream, over https, and the routing header is ignored.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..config.settings import Settings
from ..routing import audience
from ..routing.guard import Guard
from ..routing.router import RouteError, Router
from ..routing.target import Target, parse_authority
from ..tokens.api import RATE_LIMITED
from ..tokens.supervisor import TokenSource, TokenUnavailable
from . import headers as hdr
from .exchange import (
    BAD_TARGET,
    DENIED_ALLOW_LIST,
    DENIED_CIDR,
    LOOP,
    NOT_ALLOWED,
    TOKEN_FETCH_ERROR,
    TOKEN_RATE_LIMITED,
    TOKEN_RESOLVER_ERROR,
    TOKEN_UNAVAILABLE,
    Refusal,
    own_listener_refusal,
)

log = logging.getLogger("aws_outbound_jwt_proxy.forward")

# Our hop marker, sent upstream in ``Via`` and refused when it comes back (a loop through
# other proxies or DNS names the address checks cannot see). One per process.
VIA = f"aws-outbound-jwt-proxy-{secrets.token_hex(4)}".encode("ascii")
VIA_VALUE = b"1.1 " + VIA


def _came_through_us(headers: Any) -> bool:
    for name, value in headers:
        if name == b"via" and VIA in value:
            return True
    return False


CONNECT_NOT_SUPPORTED = (
    "CONNECT is not supported: send plain http:// URLs through this proxy "
    "(HTTP_PROXY=http://<this proxy>); it sends them upstream over --upstream-scheme\n"
)
CONNECT_NOT_FIRST = "CONNECT is intercepted only as the first request of a new HTTP/1.1 connection\n"
CONNECT_IN_TUNNEL = "CONNECT inside an intercepted tunnel is not supported\n"

# Key in the per-connection state hypercorn copies into every request's ``scope["state"]``:
# the Target of the intercepted CONNECT tunnel the request came through. Only the server sets it.
TUNNEL = "aws_outbound_jwt_proxy.tunnel"


def tunnel_target(scope: Any) -> Target | None:
    """The target of the intercepted tunnel this request arrived through, if any."""
    state = scope.get("state")
    target = state.get(TUNNEL) if isinstance(state, dict) else None
    return target if isinstance(target, Target) else None


def connect_authority(scope: Any) -> str:
    """The ``host:port`` of a CONNECT request (its request target; for HTTP/2, ``:authority``)."""
    raw: bytes = scope.get("raw_path") or b""
    if not raw:
        raw = next((value for name, value in scope["headers"] if name == b"host"), b"")
    return raw.decode("latin-1")


@dataclass(frozen=True, slots=True)
class Plan:
    """A request ready to go upstream."""

    target: Target
    path: bytes  # raw path + query, byte for byte as received
    headers: hdr.Headers  # outbound headers, ``Authorization: Bearer`` included


def build_router(settings: Settings) -> Router:
    """The router for these settings (the pinned host was validated with the settings)."""
    pinned = parse_authority(settings.upstream_scheme, settings.upstream_host) if settings.pinned else None
    return Router(
        scheme=settings.upstream_scheme,
        header=settings.host_header,
        pinned=pinned,
        allowed=settings.allowed_upstream_hosts,
    )


_ABSOLUTE = re.compile(rb"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.S)


def request_target(scope: Any) -> tuple[bytes, tuple[str, str] | None] | None:
    """(path + query to send upstream, (scheme, authority) of an absolute-form target or None).

    Path and query go out byte for byte as received; a ``#fragment`` (never meant
    for the server) is cut. None for a target we cannot forward.
    """
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope["query_string"]
    if b"#" in raw:
        raw, query = raw.partition(b"#")[0], b""
    elif b"#" in query:
        query = query.partition(b"#")[0]
    absolute: tuple[str, str] | None = None
    if not raw.startswith(b"/") and raw != b"*":
        match = _ABSOLUTE.match(raw)
        if match is None or match.group(1).lower() not in (b"http", b"https"):
            return None
        absolute = (match.group(1).decode("ascii").lower(), match.group(2).decode("latin-1"))
        raw = match.group(3) or b"/"
        if not raw.startswith(b"/"):
            return None
    return (raw + b"?" + query if query else raw), absolute


def server_address(scope: Any) -> tuple[str, int] | None:
    """The (host, port) of the listener this request arrived on, when known."""
    server = scope.get("server")
    if not server or server[1] is None:
        return None
    return str(server[0]), int(server[1])


def client_ip(scope: Any) -> bytes | None:
    client = scope.get("client")
    if not client:
        return None
    return str(client[0]).encode("ascii", "replace")


def _log_denied(refusal: Refusal) -> None:
    if refusal.denied == DENIED_CIDR and refusal.target is not None:
        fields = {"target": refusal.target.authority, "reason": DENIED_CIDR}
        log.warning("upstream address denied", extra=fields)


class Planner:
    """Built once per app from the settings and the token source; :meth:`plan` runs per request."""

    def __init__(self, settings: Settings, tokens: TokenSource, guard: Guard) -> None:
        self.router = build_router(settings)
        # The pinned --upstream-host is the operator's choice: the guard applies to routed targets.
        self.guard = guard
        self.guard_literals = guard.active and not settings.pinned
        self.resolver = audience.Resolver(settings.token_audiences)
        self.tokens = tokens
        self.intercepting = settings.intercepting
        header = settings.host_header.lower().encode("latin-1")
        # Header mode drops its routing header; Host mode rewrites Host anyway.
        self.drop: bytes | None = None if settings.pinned or header == b"host" else header

    def admit(self, authority: str, server: tuple[str, int] | None) -> Target | Refusal:
        """The upstream of ``CONNECT authority`` if it may be intercepted, else the refusal to answer.

        The allow-list, the loop checks and the SSRF guard's check of a literal
        address, as for any routed request; a name is checked again, address by
        address, when each request in the tunnel connects.
        """
        try:
            target = self.router.connect(authority, server)
        except RouteError as err:
            return Refusal(err.status, err.body, denied=DENIED_ALLOW_LIST if err.status == 403 else None)
        return self._literal_refusal(target) or target

    def _literal_refusal(self, target: Target) -> Refusal | None:
        if not self.guard_literals:
            return None
        own = self.guard.own_literal(target.host, target.effective_port)
        if own is not None:
            return own_listener_refusal(own, target)
        if self.guard.denied_literal(target.host):
            return Refusal(403, NOT_ALLOWED, target, denied=DENIED_CIDR)
        return None

    def _connect(self, scope: Any, tunnel: Target | None) -> Refusal:
        """A CONNECT that reached the app: never tunnelled here (the server takes the ones it may)."""
        if tunnel is not None:
            return Refusal(405, CONNECT_IN_TUNNEL, tunnel)
        if not self.intercepting:
            return Refusal(405, CONNECT_NOT_SUPPORTED)
        admitted = self.admit(connect_authority(scope), server_address(scope))
        if isinstance(admitted, Refusal):
            _log_denied(admitted)
            return admitted
        return Refusal(400, CONNECT_NOT_FIRST, admitted)

    async def plan(self, scope: Any, *, websocket: bool = False) -> Plan | Refusal:
        tunnel = tunnel_target(scope)
        if scope.get("method") == "CONNECT":
            return self._connect(scope, tunnel)
        if _came_through_us(scope["headers"]):
            log.warning("request loop: our Via marker came back", extra={"via": VIA.decode()})
            return Refusal(508, LOOP)
        request = request_target(scope)
        if request is None:
            return Refusal(400, BAD_TARGET)
        path, absolute = request
        if tunnel is not None:
            target = tunnel  # admitted when the tunnel opened; the routing header and URL are not read
        else:
            try:
                target = self.router.resolve(scope["headers"], server_address(scope), absolute=absolute)
            except RouteError as err:
                return Refusal(err.status, err.body, denied=DENIED_ALLOW_LIST if err.status == 403 else None)
        refusal = self._literal_refusal(target)
        if refusal is not None:
            _log_denied(refusal)
            return refusal
        try:
            audiences = self.resolver.for_target(target)
        except Exception as exc:
            log.error(
                "audience resolution failed",
                extra={"target": target.authority, "error_class": type(exc).__name__},
            )
            return Refusal(502, TOKEN_UNAVAILABLE, target, TOKEN_RESOLVER_ERROR)
        try:
            jwt = await self.tokens.get(audiences)
        except TokenUnavailable as err:
            if err.error_class == RATE_LIMITED:
                retry = max(1, math.ceil(err.retry_after))
                return Refusal(503, TOKEN_RATE_LIMITED, target, TOKEN_FETCH_ERROR, retry_after=retry)
            log.error(
                "token unavailable",
                extra={
                    "target": target.authority,
                    "audience": audience.key(audiences),
                    "error_class": err.error_class,
                },
            )
            return Refusal(502, TOKEN_UNAVAILABLE, target, TOKEN_FETCH_ERROR)
        out, replaced = hdr.outbound(
            scope["headers"],
            authority=target.authority.encode("ascii"),
            bearer=jwt.encode("ascii"),
            client_ip=client_ip(scope),
            drop=self.drop,
            websocket=websocket,
        )
        if replaced:
            log.debug(
                "replaced inbound Authorization with the bearer token", extra={"target": target.authority}
            )
        out.insert(len(out) - 1, (b"via", VIA_VALUE))  # before Authorization, which stays last
        return Plan(target, path, out)
