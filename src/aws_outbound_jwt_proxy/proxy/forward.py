"""One HTTP request → route, token, upstream call, streamed answer (REFERENCE.md A2-A4).

:class:`Forwarder` is built once per app. Per request it resolves the target,
gets the bearer token, sends the request through the one shared
``httpx.AsyncClient`` with the raw path and query byte for byte, and hands the
upstream response back for streaming. It also writes the access record and
feeds the :class:`RequestObserver` (metrics hook) when a request finishes.
"""

from __future__ import annotations

import errno
import logging
import ssl
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar
from typing import Any, Protocol

import certifi
import httpx
import trio
from hypercorn.typing import ASGISendCallable

from ..config.settings import Settings
from ..routing import audience
from ..routing.router import RouteError, Router
from ..routing.target import Target, parse_authority
from ..tokens.supervisor import TokenSource, TokenUnavailable
from . import headers as hdr
from .streaming import ClientDisconnected, ProxyRequest, ProxyResponse, close_upstream, plain

log = logging.getLogger("aws_outbound_jwt_proxy.forward")
access = logging.getLogger("aws_outbound_jwt_proxy.access")

TOKEN_UNAVAILABLE = "token unavailable\n"
UPSTREAM_UNAVAILABLE = "upstream unavailable\n"
UPSTREAM_TIMEOUT = "upstream timeout\n"
BAD_TARGET = "invalid request target\n"

# Pool sizing, split over SHARDS independent pools (see ShardedTransport): at
# most MAX_CONNECTIONS upstream connections, MAX_KEEPALIVE of them kept idle.
SHARDS = 8
MAX_CONNECTIONS = 1024
MAX_KEEPALIVE = 256
KEEPALIVE_EXPIRY = 60.0
_NO_TIMEOUTS = {"connect": None, "read": None, "write": None, "pool": None}
_URL_CACHE_MAX = 1024


@dataclass(slots=True, eq=False)
class Exchange:
    """What happened to one request; filled in as it goes, logged when it ends."""

    method: str
    path: str
    started: float
    target: Target | None = None
    status: int = 0
    token_result: str | None = None  # ok / fetch_error / resolver_error; None = not reached
    error_type: str | None = None  # timeout / connection_refused / unknown on upstream failure
    upstream_seconds: float | None = None  # time to the upstream's response headers (or failure)
    complete: bool = False  # the whole response reached hypercorn
    client_gone: bool = False


class RequestObserver(Protocol):
    """Metrics hook; called once per request. Must be cheap and must not raise."""

    def started(self) -> None: ...

    def finished(
        self,
        method: str,
        status: int,
        duration: float,
        target: Target | None,
        token_result: str | None,
        error_type: str | None,
        upstream_seconds: float | None,
    ) -> None: ...


class NullObserver:
    """The default: records nothing. (Metrics replace it via ``create_app(..., observer=)``.)"""

    def started(self) -> None:
        pass

    def finished(
        self,
        method: str,
        status: int,
        duration: float,
        target: Target | None,
        token_result: str | None,
        error_type: str | None,
        upstream_seconds: float | None,
    ) -> None:
        pass


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
    of connections (STACK-NOTES). Splitting one big pool into small shards keeps
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


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
    return seen


def classify(exc: BaseException) -> tuple[int, str, str]:
    """Upstream failure → (status, body, error_type). Pure."""
    if isinstance(exc, httpx.TimeoutException):
        return 504, UPSTREAM_TIMEOUT, "timeout"
    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError) or (
            isinstance(e, OSError) and e.errno == errno.ECONNREFUSED
        ):
            return 502, UPSTREAM_UNAVAILABLE, "connection_refused"
    return 502, UPSTREAM_UNAVAILABLE, "unknown"


def cause(exc: BaseException) -> str:
    """Exception class and a short message, for the error record (never headers)."""
    # httpx often wraps with an empty message; the first non-empty one down the chain says why.
    text = next((str(e) for e in _chain(exc) if str(e)), "").replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def request_target(scope: Any) -> bytes | None:
    """Raw path + query exactly as received, or None for a target we cannot forward."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if not raw.startswith(b"/") and raw != b"*":
        return None
    query: bytes = scope["query_string"]
    return raw + b"?" + query if query else raw


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


def build_router(settings: Settings) -> Router:
    pinned = parse_authority(settings.upstream_scheme, settings.upstream_host) if settings.pinned else None
    return Router(
        scheme=settings.upstream_scheme,
        header=settings.host_header,
        pinned=pinned,
        allowed=settings.allowed_upstream_hosts,
    )


class Forwarder:
    """Per-app state (router, resolver, token source, client); ``handle`` runs per request."""

    def __init__(self, settings: Settings, tokens: TokenSource, observer: RequestObserver) -> None:
        self.settings = settings
        self.tokens = tokens
        self.observer = observer
        self.router = build_router(settings)
        self.resolver = audience.Resolver(settings.token_audiences)
        self.timeout = settings.upstream_timeout
        header = settings.host_header.lower().encode("latin-1")
        # Header mode drops its routing header; Host mode rewrites Host anyway.
        self.drop: bytes | None = None if settings.pinned or header == b"host" else header
        self.tls = ssl_context(settings)
        self.client: httpx.AsyncClient | None = None
        self._urls: dict[str, httpx.URL] = {}

    # ---- lifecycle (before_serving / after_serving) -----------------------

    def open(self) -> None:
        self.client = build_client(self.settings, self.tls)

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    # ---- per request ------------------------------------------------------

    def begin(self, scope: Any) -> Exchange:
        self.observer.started()
        path = scope.get("raw_path") or b""
        return Exchange(scope.get("method", "GET"), path.decode("latin-1"), trio.current_time())

    def finish(self, ex: Exchange) -> None:
        duration = trio.current_time() - ex.started
        access.info(
            "request",
            extra={
                "method": ex.method,
                "path": ex.path,
                "target": ex.target.authority if ex.target is not None else "",
                "status": ex.status,
                "duration_ms": round(duration * 1000, 3),
            },
        )
        self.observer.finished(
            ex.method, ex.status, duration, ex.target, ex.token_result, ex.error_type, ex.upstream_seconds
        )

    async def token_for(self, target: Target, ex: Exchange) -> str | None:
        """The bearer JWT for the target, or None (logged, recorded) when there is none."""
        try:
            audiences = self.resolver.for_target(target)
        except Exception as exc:
            ex.token_result = "resolver_error"
            log.error(
                "audience resolution failed",
                extra={"target": target.authority, "error_class": type(exc).__name__},
            )
            return None
        try:
            jwt = await self.tokens.get(audiences)
        except TokenUnavailable as err:
            ex.token_result = "fetch_error"
            log.error(
                "token unavailable",
                extra={
                    "target": target.authority,
                    "audience": audience.key(audiences),
                    "error_class": err.error_class,
                },
            )
            return None
        ex.token_result = "ok"
        return jwt

    def url(self, target: Target) -> httpx.URL:
        url = self._urls.get(target.authority)
        if url is None:
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            url = self._urls[target.authority] = httpx.URL(target.base_url + "/")
        return url

    async def handle(self, request: ProxyRequest) -> ProxyResponse:
        scope: Any = request.scope
        ex = request.exchange
        raw_target = request_target(scope)
        if raw_target is None:
            return plain(400, BAD_TARGET)
        try:
            target = self.router.resolve(scope["headers"], server_address(scope))
        except RouteError as err:
            return plain(err.status, err.body)
        ex.target = target
        jwt = await self.token_for(target, ex)
        if jwt is None:
            return plain(502, TOKEN_UNAVAILABLE)
        out, replaced = hdr.outbound(
            scope["headers"],
            authority=target.authority.encode("ascii"),
            bearer=jwt.encode("ascii"),
            client_ip=client_ip(scope),
            drop=self.drop,
        )
        if replaced:
            log.debug(
                "replaced inbound Authorization with the bearer token", extra={"target": target.authority}
            )
        body = request.body
        assert self.client is not None, "Forwarder.open() runs in before_serving"
        started = trio.current_time()
        try:
            has_body = await body.present()
            upstream = httpx.Request(
                scope["method"],
                self.url(target),
                headers=out,
                content=body if has_body else None,
                extensions={"target": raw_target, "timeout": _NO_TIMEOUTS},
            )
            # Deadline for the response headers: covers pool wait + connect + headers, is
            # lifted while the request body streams, and restarts when the body ends.
            with trio.CancelScope(deadline=started + self.timeout) as timer:
                if has_body:
                    body.header_timer(timer, self.timeout)
                response = await self.client.send(upstream, stream=True)
        except ClientDisconnected:
            ex.client_gone = True
            return plain(499, "")
        except Exception as exc:
            ex.upstream_seconds = trio.current_time() - started
            status, text, ex.error_type = classify(exc)
            log.error("upstream request failed", extra={"target": target.authority, "cause": cause(exc)})
            return plain(status, text)
        ex.upstream_seconds = trio.current_time() - started
        if timer.cancelled_caught:
            ex.error_type = "timeout"
            log.error(
                "upstream request failed",
                extra={
                    "target": target.authority,
                    "cause": f"no response headers within {self.timeout:g}s",
                },
            )
            return plain(504, UPSTREAM_TIMEOUT)
        return ProxyResponse(response.status_code, hdr.inbound(response.headers.raw), upstream=response)

    async def relay(self, response: httpx.Response, send: ASGISendCallable, ex: Exchange) -> None:
        """Stream the upstream body to the client as it arrives (raw, no decoding, no timeout).

        An upstream failure mid-body is logged and the client response is left
        unfinished, so hypercorn aborts it instead of ending it cleanly.
        """
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            ex.error_type = classify(exc)[2]
            log.error(
                "upstream response failed mid-body",
                extra={"target": ex.target.authority if ex.target else "", "cause": cause(exc)},
            )
            return
        finally:
            await close_upstream(response)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        ex.complete = True
