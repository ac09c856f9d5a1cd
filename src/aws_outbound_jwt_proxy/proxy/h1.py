"""Direct upstream connections: a lean HTTP/1.1 client and its pool, beneath httpx's transport interface.

httpx stays the client API (``AsyncClient``, ``AsyncBaseTransport``); for the
direct route this transport replaces httpcore + h11, which cost about half of
the proxy's CPU per request (docs/benchmark.md). A request head is one
write, a response is parsed by llhttp (``httptools``), and the pool is a dict
of per-upstream idle lists.

What httpcore's pool gave and this keeps:

* keep-alive, with an idle expiry and a check that a pooled connection is
  still quiet (not closed or talking) before it is reused; a body-less
  idempotent request that meets a connection the upstream closed under it is
  sent again, as Go does;
* limits: connections in all, idle connections, requests in flight per
  upstream (held until the response body is closed, so one slow upstream
  cannot take the whole pool);
* TLS verified against the caller's context, with SNI, offering ``h2`` and
  ``http/1.1`` by ALPN. An upstream that picks ``h2`` is remembered and its
  requests go to ``fallback`` (httpx's own transport: HTTP/2 multiplexing);
  so do ``HEAD`` requests (a bodiless answer llhttp cannot be told about);
* every address dialled goes through the SSRF guard (:func:`~.dial.open_tcp`).

Errors are httpx's: ``ConnectError``, ``WriteError``, ``ReadError``,
``RemoteProtocolError``; the guard's own refusals pass through.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import httpx
import trio

from ..routing.guard import Guard
from .dial import open_tcp
from .wire import write_all

Origin = tuple[str, str, int]  # scheme, host, port
BODY = "aws_outbound_jwt_proxy.body"  # response extension: the ResponseBody (absent on fallbacks)

READ_SIZE = 64 * 1024
SWEEP_INTERVAL = 5.0  # seconds between walks that close expired idle connections
_ORIGINS_MAX = 1024
# A body-less request with one of these methods is sent again (at most REPLAY_ATTEMPTS times in
# all) when a pooled connection the upstream had closed fails before any response byte.
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
REPLAY_ATTEMPTS = 3
CLOSED_UNDER_US = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# A request target we refuse to write: a space or control character would split the request line.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class _Stale(Exception):
    """A reused connection ended before any response byte: the upstream closed it under us."""

    def __init__(self, error: httpx.TransportError) -> None:
        self.error = error


class _Connection:
    """One upstream connection and its socket (for the quiet check and a synchronous close)."""

    __slots__ = ("idle_since", "origin", "reused", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType, origin: Origin) -> None:
        self.stream = stream
        self.socket = sock
        self.origin = origin
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        """Close now, without waiting (no TLS close_notify): safe while cancelled."""
        self.socket.close()


class _Reader:
    """llhttp callbacks for one response: the head, then body chunks as they are parsed."""

    __slots__ = (
        "chunks",
        "done",
        "extra",
        "head_done",
        "headers",
        "keep_alive",
        "parser",
        "reason",
        "status",
        "version",
    )

    def __init__(self) -> None:
        # The parser holds this object's callbacks and this object the parser: a reference
        # cycle, broken by release() once the response is over, so both die with the request.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.version = ""
        self.head_done = False
        self.keep_alive = False  # read at the end of the head: llhttp forgets it once the message ends
        self.chunks: list[bytes] = []
        self.done = False
        self.extra = False  # bytes after the end of the response: the connection is not reusable

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # callbacks run inside feed()
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: wait for the answer
            self.headers = []
            self.reason = b""
            return
        self.head_done = True
        self.status = status
        self.version = parser.get_http_version()
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True

    def feed(self, data: bytes | bytearray) -> None:
        if self.parser is None:
            raise httpx.ReadError("response already released")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise httpx.RemoteProtocolError("upstream switched protocols on a plain request") from None
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"malformed response from upstream: {exc}") from None

    def release(self) -> None:
        """Drop the parser (and so the cycle through it); the reader parses nothing more."""
        self.parser = None

    def until_close(self) -> bool:
        """Whether the body ends when the connection does (no length, not chunked)."""
        for name, _ in self.headers:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                return False
        return True


class ResponseBody(httpx.AsyncByteStream):
    """The upstream body as it is parsed; the connection goes back to the pool once it ends cleanly.

    The transport puts it in the response's ``BODY`` extension, so the relay can
    ask whether the first part is already in hand (:attr:`ready`).
    """

    def __init__(
        self,
        conn: _Connection,
        reader: _Reader,
        reusable: bool,
        done: Callable[[_Connection, bool], None],
    ) -> None:
        self._conn = conn
        self._reader = reader
        self._reusable = reusable
        self._done: Callable[[_Connection, bool], None] | None = done

    def _finish(self, reuse: bool) -> None:
        self._reader.release()
        if self._done is not None:
            done, self._done = self._done, None
            done(self._conn, reuse)

    @property
    def ready(self) -> bool:
        """Whether the next part (or the end) is already parsed: iterating will not wait."""
        return bool(self._reader.chunks) or self._reader.done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader, stream = self._reader, self._conn.stream
        try:
            while True:
                if reader.chunks:
                    chunks, reader.chunks = reader.chunks, []
                    for chunk in chunks:
                        yield chunk
                if reader.done:
                    break
                try:
                    data = await stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise httpx.ReadError(str(exc) or "upstream connection broke") from exc
                if not data:
                    if reader.until_close():
                        self._reusable = False
                        break
                    raise httpx.RemoteProtocolError("upstream closed the connection before the body ended")
                reader.feed(data)
        except BaseException:
            self._finish(False)
            raise
        self._finish(self._reusable and reader.keep_alive and not reader.extra)

    async def aclose(self) -> None:
        self._finish(False)  # no-op when the body was read to its end


class ReleasingBody(httpx.AsyncByteStream):
    """A response body that gives its upstream slot back when closed (once)."""

    def __init__(self, inner: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()


class UpstreamSlots:
    """At most ``limit`` requests in flight per upstream: a semaphore per origin, created on use.

    One slow upstream must not take every pooled connection from the others. The
    caller holds a slot until the response body is closed. Origins with nothing in
    flight are forgotten once ``_ORIGINS_MAX`` are known.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[Origin, trio.Semaphore] = {}

    async def acquire(self, origin: Origin) -> trio.Semaphore:
        """Take ``origin``'s slot (waiting while all are taken); release it on the returned semaphore."""
        slot = self._slots.get(origin)
        if slot is None:
            if len(self._slots) >= _ORIGINS_MAX:
                for key in [k for k, s in self._slots.items() if s.value == self._limit]:
                    del self._slots[key]
            slot = self._slots[origin] = trio.Semaphore(self._limit)
        try:
            slot.acquire_nowait()  # the usual case: no checkpoint
        except trio.WouldBlock:
            await slot.acquire()
        return slot


def origin_of(url: httpx.URL) -> Origin:
    scheme = url.scheme
    return (scheme, url.host, url.port or (443 if scheme == "https" else 80))


class DirectTransport(httpx.AsyncBaseTransport):
    """The pool of direct upstream connections (see the module docstring for what it keeps)."""

    def __init__(
        self,
        tls: ssl.SSLContext,
        guard: Guard,
        fallback: httpx.AsyncBaseTransport,
        *,
        max_connections: int,
        max_idle: int,
        max_per_upstream: int,
        keepalive_expiry: float,
    ) -> None:
        tls.set_alpn_protocols(["http/1.1", "h2"])  # what httpcore offers on the same context
        self._tls = tls
        self._guard = guard
        self._fallback = fallback
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._open = trio.Semaphore(max_connections)  # a token per open connection, idle ones included
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._slots = UpstreamSlots(max_per_upstream)
        self._h2: set[Origin] = set()
        self._next_sweep = 0.0
        self._closed = False

    # ---- the request ------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = origin_of(request.url)
        slot = await self._slots.acquire(origin)
        try:
            if origin in self._h2 or request.method == "HEAD":
                return await self._via_fallback(request, slot)
            return await self._send(request, origin, slot)
        except BaseException:
            slot.release()
            raise

    async def _send(self, request: httpx.Request, origin: Origin, slot: trio.Semaphore) -> httpx.Response:
        head = _request_head(request)
        replayable = head.body is None and request.method in REPLAYABLE_METHODS
        attempts = REPLAY_ATTEMPTS if replayable else 1
        for attempt in range(attempts):
            conn = await self._connection(origin)
            if conn is None:  # the upstream chose HTTP/2
                return await self._via_fallback(request, slot)
            try:
                return await self._exchange(conn, head, request, slot)
            except _Stale as stale:
                if attempt + 1 == attempts:
                    raise stale.error from None
        raise AssertionError("unreachable")

    async def _exchange(
        self, conn: _Connection, head: _Head, request: httpx.Request, slot: trio.Semaphore
    ) -> httpx.Response:
        """Write the request, read the response head; the body is read as the caller iterates."""
        reader = _Reader()
        got_bytes = False
        try:
            try:
                if head.body is None:
                    await _send_all(conn.stream, head.data)
                else:
                    await _send_body(conn.stream, head, request.stream)
                write_error: httpx.WriteError | None = None
            except _WriteFailed as failed:
                # The upstream may have answered early (say 413) and closed: read what it said.
                write_error = failed.error
            while not reader.head_done:
                try:
                    data = await conn.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise write_error or httpx.ReadError(str(exc) or "upstream connection broke") from exc
                if not data:
                    raise write_error or httpx.RemoteProtocolError(
                        "upstream closed the connection without sending a response"
                    )
                got_bytes = True
                reader.feed(data)
        except BaseException as exc:
            reader.release()
            conn.close()
            self._open.release()
            if conn.reused and not got_bytes and isinstance(exc, CLOSED_UNDER_US):
                raise _Stale(exc) from None
            raise

        def done(conn: _Connection, reuse: bool) -> None:
            self._release(conn, reuse)
            slot.release()

        response_body = ResponseBody(conn, reader, write_error is None, done)
        return httpx.Response(
            reader.status,
            headers=reader.headers,
            stream=response_body,
            extensions={
                "http_version": b"HTTP/" + reader.version.encode("ascii"),
                "reason_phrase": reader.reason,
                BODY: response_body,
            },
        )

    async def _via_fallback(self, request: httpx.Request, slot: trio.Semaphore) -> httpx.Response:
        response = await self._fallback.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = ReleasingBody(response.stream, slot.release)
        return response

    # ---- the pool ---------------------------------------------------------------------

    async def _connection(self, origin: Origin) -> _Connection | None:
        """A quiet pooled connection to ``origin``, or a new one (None: the upstream chose HTTP/2)."""
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if now - conn.idle_since < self._expiry and not conn.socket.is_readable():
                conn.reused = True
                return conn
            conn.close()
            self._open.release()
        if self._open.value == 0:
            self._evict_one()
        await self._open.acquire()
        try:
            return await self._dial(origin)
        except BaseException:
            self._open.release()
            raise

    async def _dial(self, origin: Origin) -> _Connection | None:
        scheme, host, port = origin
        try:
            tcp = await open_tcp(host, port, self._guard)
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        if scheme != "https":
            return _Connection(tcp, tcp.socket, origin)
        tls = trio.SSLStream(tcp, self._tls, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException as exc:
            tcp.socket.close()
            if isinstance(exc, (ssl.SSLError, trio.BrokenResourceError, OSError)):
                raise httpx.ConnectError(str(exc.__cause__ or exc)) from exc
            raise
        if tls.selected_alpn_protocol() == "h2":
            tcp.socket.close()
            if len(self._h2) >= _ORIGINS_MAX:
                self._h2.clear()
            self._h2.add(origin)
            self._open.release()
            return None
        return _Connection(tls, tcp.socket, origin)

    def _release(self, conn: _Connection, reuse: bool) -> None:
        """A response ended: keep its connection for the next request, or close it."""
        if reuse and not self._closed and self._idle_count < self._max_idle:
            conn.idle_since = trio.current_time()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._idle_count += 1
        else:
            conn.close()
            self._open.release()

    def _evict_one(self) -> None:
        """Every connection is open: close the longest-idle one (of any upstream) to make room."""
        oldest: list[_Connection] | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[0].idle_since):
                oldest = conns
        if oldest is not None:
            oldest.pop(0).close()
            self._idle_count -= 1
            self._open.release()

    async def sweep_while_open(self, interval: float = SWEEP_INTERVAL) -> None:
        """Sweep the idle connections every ``interval`` without traffic too, until closed (or cancelled).

        Requests sweep as they take a connection. With none coming (a quiet
        worker, a night), a connection the upstream closed would stay
        half-closed (CLOSE_WAIT) and an expired one open until the next request.
        """
        while not self._closed:
            await trio.sleep(interval)
            if self._idle_count:
                self._sweep(trio.current_time())

    def _sweep(self, now: float) -> None:
        """Close idle connections past their expiry or closed by the upstream; drop empty lists."""
        self._next_sweep = now + SWEEP_INTERVAL
        for origin in list(self._idle):
            conns = self._idle[origin]
            keep = [c for c in conns if now - c.idle_since < self._expiry and not c.socket.is_readable()]
            for conn in conns:
                if conn not in keep:
                    conn.close()
                    self._open.release()
            self._idle_count -= len(conns) - len(keep)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        await self._fallback.aclose()


class _WriteFailed(Exception):
    """Writing to the upstream failed (the client's body errors pass through untouched)."""

    def __init__(self, error: httpx.WriteError) -> None:
        self.error = error


class _Head:
    """A request head ready to write, and how its body is framed (``body`` None: no body)."""

    __slots__ = ("body", "data")

    def __init__(self, data: bytes, body: int | str | None) -> None:
        self.data = data
        self.body = body  # Content-Length, "chunked", or None


def _request_head(request: httpx.Request) -> _Head:
    """The request line and headers as one block; refuses a target or header that would split it."""
    target = request.extensions.get("target") or request.url.raw_path
    if _BAD_TARGET.search(target):
        raise httpx.LocalProtocolError("request target holds a space or control character")
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    body: int | str | None = None
    for name, value in request.headers.raw:
        lines.append(name + b": " + value)
        lower = name.lower()
        if lower == b"content-length":
            body = int(value)
        elif lower == b"transfer-encoding":
            body = "chunked"
    lines.append(b"\r\n")
    data = b"\r\n".join(lines)
    # Exactly one CR and one LF per line, and no NUL: no header can split the head.
    if data.count(b"\n") != len(lines) or data.count(b"\r") != len(lines) or b"\0" in data:
        raise httpx.LocalProtocolError("header holds a CR, LF or NUL")
    return _Head(data, body)


async def _send_all(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await write_all(stream, data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _WriteFailed(httpx.WriteError(str(exc) or "upstream connection broke")) from exc


async def _send_body(stream: trio.abc.Stream, head: _Head, body: Any) -> None:
    """The head, then the body: chunked when the request says so, else exactly Content-Length bytes."""
    chunked = head.body == "chunked"
    expected = head.body if isinstance(head.body, int) else None
    sent = 0
    await _send_all(stream, head.data)
    async for chunk in body:
        if not chunk:
            continue
        sent += len(chunk)
        if chunked:
            await _send_all(stream, b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            if expected is not None and sent > expected:
                raise httpx.LocalProtocolError("request body longer than its Content-Length")
            await _send_all(stream, chunk)
    if chunked:
        await _send_all(stream, b"0\r\n\r\n")
    elif sent != expected:
        raise httpx.LocalProtocolError("request body shorter than its Content-Length")
