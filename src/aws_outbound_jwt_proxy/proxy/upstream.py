"""The upstream side: one shared httpx client, and sending a planned request through it.

:class:`Upstream` owns the client (opened in ``before_serving``, closed in
``after_serving``). :meth:`Upstream.send` sends a :class:`~.plan.Plan` with
the request body streamed and the path and query byte for byte, and returns
the response as soon as its headers arrive (the body is streamed later). It
raises whatever the lower layers raise, plus :class:`~.exchange.UpstreamTimeout`
when no headers came within --upstream-timeout; callers map errors with
:func:`~.exchange.classify`.
"""

from __future__ import annotations

import ssl
from http.cookiejar import Cookie, CookieJar
from typing import Any

import certifi
import httpx
import trio

from ..config.settings import Settings
from ..routing.target import Target
from .body import RequestBody
from .exchange import UpstreamTimeout
from .plan import Plan

# Pool sizing, split over SHARDS independent pools (see ShardedTransport): at
# most MAX_CONNECTIONS upstream connections, MAX_KEEPALIVE of them kept idle.
SHARDS = 8
MAX_CONNECTIONS = 1024
MAX_KEEPALIVE = 256
KEEPALIVE_EXPIRY = 60.0
_NO_TIMEOUTS = {"connect": None, "read": None, "write": None, "pool": None}
_URL_CACHE_MAX = 1024


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Upstream TLS verification: --upstream-ca-file when set, else certifi's roots. Built once."""
    return ssl.create_default_context(cafile=settings.upstream_ca_file or certifi.where())


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


class ShardedTransport(httpx.AsyncBaseTransport):
    """Round-robin over several independent httpcore pools.

    httpcore's pool walks (and polls) every connection it holds on each
    request and response close, so its cost per request grows with the number
    of connections. Splitting one big pool into small shards keeps
    that walk short under concurrency.
    """

    def __init__(self, shards: list[httpx.AsyncHTTPTransport]) -> None:
        self._shards = shards
        self._next = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._next = (self._next + 1) % len(self._shards)
        return await self._shards[self._next].handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def build_client(settings: Settings, tls: ssl.SSLContext) -> httpx.AsyncClient:
    """The one shared upstream client with every httpx default that is wrong for a proxy off."""
    limits = httpx.Limits(
        max_connections=MAX_CONNECTIONS // SHARDS,
        max_keepalive_connections=MAX_KEEPALIVE // SHARDS,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    shards = [
        httpx.AsyncHTTPTransport(verify=tls, http1=True, http2=True, trust_env=False, limits=limits)
        for _ in range(SHARDS)
    ]
    client = httpx.AsyncClient(
        transport=ShardedTransport(shards),
        trust_env=False,
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout = settings.upstream_timeout
        self.tls = ssl_context(settings)
        self.client: httpx.AsyncClient | None = None
        self._urls: dict[str, httpx.URL] = {}

    def open(self) -> None:
        self.client = build_client(self.settings, self.tls)

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    def url(self, target: Target) -> httpx.URL:
        url = self._urls.get(target.authority)
        if url is None:
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            url = self._urls[target.authority] = httpx.URL(target.base_url + "/")
        return url

    async def send(self, method: str, plan: Plan, body: RequestBody) -> httpx.Response:
        """The upstream's response, headers read, body not yet. May raise ``ClientDisconnected``."""
        assert self.client is not None, "Upstream.open() runs in before_serving"
        started = trio.current_time()
        has_body = await body.present()
        request = httpx.Request(
            method,
            self.url(plan.target),
            headers=plan.headers,
            content=body if has_body else None,
            extensions={"target": plan.path, "timeout": _NO_TIMEOUTS},
        )
        # Deadline for the response headers: covers pool wait + connect + headers, is
        # lifted while the request body streams, and restarts when the body ends.
        with trio.CancelScope(deadline=started + self.timeout) as timer:
            if has_body:
                body.header_timer(timer, self.timeout)
            return await self.client.send(request, stream=True)
        raise UpstreamTimeout(f"no response headers within {self.timeout:g}s")
