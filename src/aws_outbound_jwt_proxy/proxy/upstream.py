"""The upstream side: one shared httpx client, and sending a planned request through it.

:class:`Upstream` owns the client (opened in ``before_serving``, closed in
``after_serving``). Its transport sends each request either directly (through
the SSRF guard's dialer, :class:`~.dial.GuardedBackend`) or through the egress
proxy the environment names for that target (``HTTPS_PROXY``: a CONNECT
tunnel with TLS to the upstream inside; ``HTTP_PROXY``: absolute-form), with
Go's ``ProxyFromEnvironment`` rules (:mod:`..routing.egress`). TLS trusts the
operating system's store (``truststore``) unless --upstream-ca-file replaces it.

:meth:`Upstream.send` sends a :class:`~.plan.Plan` with the request body
streamed and the path and query byte for byte, and returns the response as
soon as its headers arrive (the body is streamed later). It raises whatever
the lower layers raise, plus :class:`~.exchange.UpstreamTimeout` when no
headers came within --upstream-timeout, and :class:`~.exchange.DeniedUpstream`
when the guard refused every address; callers map errors with
:func:`~.exchange.classify`.
"""

from __future__ import annotations

import ssl
from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpcore
import httpx
import trio
import truststore

from ..config.settings import Settings
from ..routing.egress import EgressProxies
from ..routing.guard import Guard
from ..routing.target import Target
from .body import RequestBody
from .dial import GuardedBackend, TunnelBackend
from .exchange import UpstreamTimeout
from .h1 import (
    CLOSED_UNDER_US,
    REPLAY_ATTEMPTS,
    REPLAYABLE_METHODS,
    DirectTransport,
    ReleasingBody,
    UpstreamSlots,
    origin_of,
)
from .plan import Plan

# Pool sizing, split over SHARDS independent pools (see ShardedTransport): at
# most MAX_CONNECTIONS upstream connections, MAX_KEEPALIVE of them kept idle.
SHARDS = 8
MAX_CONNECTIONS = 1024
MAX_KEEPALIVE = 256
MAX_PER_UPSTREAM = MAX_CONNECTIONS // 4  # one upstream never holds more than a quarter of the pool
KEEPALIVE_EXPIRY = 60.0
_NO_TIMEOUTS = {"connect": None, "read": None, "write": None, "pool": None}
_URL_CACHE_MAX = 1024
_TUNNEL = "tunnel:"  # egress_proxy extension prefix: a CONNECT tunnel through that proxy


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Upstream TLS verification: --upstream-ca-file when set, else the system trust store. Built once."""
    if settings.upstream_ca_file:
        return ssl.create_default_context(cafile=settings.upstream_ca_file)
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class NoCookies(CookieJar):
    """A jar that never stores anything: one client's upstream cookies never reach another."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Cookie) -> None:
        pass


class NoClientCookies(httpx.Cookies):
    """The client's cookie store: skips httpx's per-response urllib adapters (the jar keeps nothing)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


def _replayable(request: httpx.Request) -> bool:
    headers = request.headers
    return (
        request.method in REPLAYABLE_METHODS
        and "content-length" not in headers
        and "transfer-encoding" not in headers
    )


class ShardedTransport(httpx.AsyncBaseTransport):
    """Round-robin over several independent httpcore pools.

    httpcore's pool walks (and polls) every connection it holds on each
    request and response close, so its cost per request grows with the number
    of connections. Splitting one big pool into small shards keeps that walk
    short under concurrency.
    """

    def __init__(self, shards: list[httpx.AsyncHTTPTransport]) -> None:
        self._shards = shards
        self._next = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._next = (self._next + 1) % len(self._shards)
        shard = self._shards[self._next]
        if not _replayable(request):
            return await shard.handle_async_request(request)
        # A pooled keep-alive connection the upstream closed just as the request went out (its
        # idle timeout racing us) fails before any response byte. A body-less idempotent request
        # is sent again on the same pool, which has dropped that connection, as Go does.
        for _ in range(REPLAY_ATTEMPTS - 1):
            try:
                return await shard.handle_async_request(request)
            except CLOSED_UNDER_US:
                pass
        return await shard.handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class PerUpstreamLimit(httpx.AsyncBaseTransport):
    """At most ``limit`` requests in flight per upstream (scheme, host, port), body streaming included.

    The connection pool is shared by every upstream; without this, one slow
    target (say, 1,250 uploads dribbling bytes) takes every connection and all
    other targets wait. A request over the limit waits for a slot (inside the
    caller's --upstream-timeout), and a slot is held until the response is closed.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._slots = UpstreamSlots(limit)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        slot = await self._slots.acquire(origin_of(request.url))
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            slot.release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = ReleasingBody(response.stream, slot.release)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class EgressTransport(httpx.AsyncBaseTransport):
    """Direct, or through the egress proxy named in the request's ``egress_proxy`` extension."""

    def __init__(self, direct: DirectTransport, proxied: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.direct = direct
        self._proxied = proxied

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = request.extensions.get("egress_proxy")
        transport = self.direct if proxy is None else self._proxied[proxy]
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        for transport in (self.direct, *self._proxied.values()):
            await transport.aclose()


def _egress_proxy(url: str, tls: ssl.SSLContext) -> httpx.Proxy:
    """The egress proxy at ``url``; an https:// proxy is verified like an upstream."""
    return httpx.Proxy(url, ssl_context=tls if url.startswith("https://") else None)


def _transport(
    tls: ssl.SSLContext,
    limits: httpx.Limits,
    backend: httpcore.AsyncNetworkBackend | None = None,
    proxy: str | None = None,
) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(
        verify=tls,
        http1=True,
        http2=True,
        trust_env=False,
        limits=limits,
        proxy=_egress_proxy(proxy, tls) if proxy else None,
    )
    if backend is not None:
        # httpx 0.28 takes no network backend, its pool does (why httpx is pinned below 0.29).
        transport._pool._network_backend = backend
    return transport


def build_transport(tls: ssl.SSLContext, guard: Guard, egress: EgressProxies) -> EgressTransport:
    """Every upstream route: the direct pool (and its httpcore fallback), the egress proxies.

    ``guard`` checks every address a direct connection goes to; egress proxies are exempt.
    """
    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS // SHARDS,
        max_keepalive_connections=MAX_KEEPALIVE // SHARDS,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    guarded = GuardedBackend(guard) if guard.active else None
    # HTTP/1.1 upstreams through our own lean pool; upstreams that pick h2 (and HEAD requests)
    # through httpcore's pools, sharded (ShardedTransport).
    fallback = ShardedTransport([_transport(tls, limits, guarded) for _ in range(SHARDS)])
    direct = DirectTransport(
        tls,
        guard,
        fallback,
        max_connections=MAX_CONNECTIONS,
        max_idle=MAX_KEEPALIVE,
        max_per_upstream=MAX_PER_UPSTREAM,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    proxy_limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    # http:// upstreams: absolute-form requests to HTTP_PROXY (httpx's proxy support);
    # https:// upstreams: CONNECT tunnels to HTTPS_PROXY, opened below httpcore.
    proxied: dict[str, httpx.AsyncBaseTransport] = {}
    if egress.http:
        forwarding = _transport(tls, proxy_limits, proxy=egress.http)
        proxied[egress.http] = PerUpstreamLimit(forwarding, MAX_PER_UPSTREAM)
    if egress.https:
        tunnels = _transport(tls, proxy_limits, TunnelBackend(egress.https, tls))
        proxied[_TUNNEL + egress.https] = PerUpstreamLimit(tunnels, MAX_PER_UPSTREAM)
    return EgressTransport(direct, proxied)


def client_for(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    """An httpx client over ``transport`` with every httpx default that is wrong for a proxy off."""
    client = httpx.AsyncClient(
        transport=transport,
        trust_env=False,  # proxies come from EgressProxies (Go's rules), never .netrc or SSL_CERT_*
        follow_redirects=False,
        cookies=NoCookies(),
        timeout=httpx.Timeout(None),
    )
    client.headers.clear()  # no User-Agent / Accept-Encoding / Accept / Connection defaults
    # httpx builds urllib request/response adapters for every response just to offer Set-Cookie to
    # the jar; the jar keeps nothing, so skip that (the ``cookies=`` setter would copy into a plain one).
    client._cookies = NoClientCookies(NoCookies())
    return client


class Upstream:
    """The shared client and the per-request send; built once per app."""

    def __init__(self, settings: Settings, guard: Guard, egress: EgressProxies) -> None:
        self.settings = settings
        self.guard = guard
        # The pinned --upstream-host is the operator's choice: the guard covers routed targets only.
        self.direct_guard = Guard(()) if settings.pinned else guard
        self.egress = egress
        self.timeout = settings.upstream_timeout
        self.tls = ssl_context(settings)
        self.client: httpx.AsyncClient | None = None
        self._direct: DirectTransport | None = None
        self._routes: dict[str, tuple[httpx.URL, str | None]] = {}

    def open(self) -> None:
        transport = build_transport(self.tls, self.direct_guard, self.egress)
        self._direct = transport.direct
        self.client = client_for(transport)

    async def sweep_idle(self) -> None:
        """Close idle direct connections the upstream closed, with or without traffic (cancel to stop)."""
        assert self._direct is not None, "Upstream.open() runs in before_serving"
        await self._direct.sweep_while_open()

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    def route(self, target: Target) -> tuple[httpx.URL, str | None]:
        """The target's base URL and the egress proxy to use for it (None: direct). Cached."""
        # Keyed by scheme too: an intercepted https target may share its authority with an http one.
        route = self._routes.get(target.base_url)
        if route is None:
            if len(self._routes) >= _URL_CACHE_MAX:
                self._routes.clear()
            url = httpx.URL(target.base_url + "/")
            proxy = self.egress.proxy_for(target)
            if proxy is not None and target.scheme == "https":
                proxy = _TUNNEL + proxy
            route = self._routes[target.base_url] = (url, proxy)
        return route

    async def send(self, method: str, plan: Plan, body: RequestBody) -> httpx.Response:
        """The upstream's response, headers read, body not yet. May raise ``ClientDisconnected``."""
        assert self.client is not None, "Upstream.open() runs in before_serving"
        started = trio.current_time()
        has_body = await body.present()
        url, proxy = self.route(plan.target)
        path = plan.path
        if proxy is not None and not proxy.startswith(_TUNNEL):
            # To an HTTP proxy the request line carries the absolute URL; httpcore puts the
            # ``target`` extension on the proxy's request line as it is, so it must be absolute.
            path = plan.target.base_url.encode("ascii") + path
        request = httpx.Request(
            method,
            url,
            headers=plan.headers,
            content=body if has_body else None,
            extensions={"target": path, "timeout": _NO_TIMEOUTS, "egress_proxy": proxy},
        )
        # Deadline for the response headers: covers pool wait + connect + headers, is
        # lifted while the request body streams, and restarts when the body ends.
        with trio.CancelScope(deadline=started + self.timeout) as timer:
            if has_body:
                body.header_timer(timer, self.timeout)
            return await self.client.send(request, stream=True)
        raise UpstreamTimeout(f"no response headers within {self.timeout:g}s")
