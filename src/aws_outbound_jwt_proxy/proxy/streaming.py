"""Quart-Trio plumbing for a streaming proxy: request body on demand, response without timeouts.

Quart-Trio's own connection reads the request body in a background task into
an unbounded buffer and cuts responses after RESPONSE_TIMEOUT. Here instead:

* :class:`RequestBody` pulls each chunk from ASGI ``receive()`` only when the
  consumer (httpx) asks, so hypercorn's bounded receive queue and TCP give
  real backpressure. No size limit, no body timeout.
* :class:`ProxyHTTPConnection` runs the request through Quart
  (``app.handle_request``: context, hooks, dispatch), then streams the
  :class:`ProxyResponse` chunk by chunk with no response timeout. Once the
  request body is consumed it watches ``receive()`` for ``http.disconnect``
  and cancels the request, which cancels the upstream call.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable
from quart.utils import encode_headers
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers import TrioRequest
from quart_trio.wrappers.request import TrioBody

from . import headers as hdr

if TYPE_CHECKING:
    import httpx

    from .app import ProxyApp
    from .forward import Exchange, Forwarder

CLIENT_GONE = 499  # status recorded when the client left before a response was sent
CLOSE_GRACE = 5.0  # seconds a cancelled request may spend closing its upstream response


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


class RequestBody(TrioBody):
    """A request body read from ``receive()`` on demand (async-iterate it exactly once).

    ``finished`` is set once the last chunk was received (or there is no body),
    after which ``receive()`` belongs to the disconnect watcher.
    """

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        # Quart's Body.__init__ sets up a buffer we never use; not called on purpose.
        self._receive: ASGIReceiveCallable | None = None
        self._present: bool | None = None  # None: unknown until the first message (h2 without length)
        self._first: bytes = b""
        self._done = False
        self._timer: trio.CancelScope | None = None
        self._timeout = math.inf
        self.finished = trio.Event()

    def attach(self, receive: ASGIReceiveCallable, scope: Any) -> None:
        """Bind to the connection; decide from the headers whether a body follows."""
        self._receive = receive
        length = hdr.value(scope["headers"], b"content-length")
        if length is not None:
            self._present = length.strip() not in (b"0", b"")
        elif hdr.value(scope["headers"], b"transfer-encoding") is not None:
            self._present = True
        elif scope["http_version"] in ("1.0", "1.1"):
            self._present = False
        if self._present is False:
            self._done = True
            self.finished.set()

    async def present(self) -> bool:
        """Whether the request has a body (may read the first message on HTTP/2)."""
        if self._present is None:
            msg: Any = await self.receive()
            if msg["type"] == "http.disconnect":
                self._finish()
                raise ClientDisconnected()
            self._first = bytes(msg.get("body", b""))
            more = bool(msg.get("more_body", False))
            if not more:
                self._finish()
            self._present = more or self._first != b""
        return self._present

    def header_timer(self, scope: trio.CancelScope, timeout: float) -> None:
        """While the body streams, ``scope`` has no deadline; when it ends, ``timeout`` starts."""
        self._timer, self._timeout = scope, timeout

    async def receive(self) -> ASGIReceiveEvent:
        assert self._receive is not None, "RequestBody.attach() was not called"
        return await self._receive()

    def _finish(self) -> None:
        self._done = True
        self.finished.set()
        if self._timer is not None:
            self._timer.deadline = trio.current_time() + self._timeout

    def __aiter__(self) -> RequestBody:
        if self._timer is not None:
            self._timer.deadline = math.inf
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        while not self._done:
            msg: Any = await self.receive()
            if msg["type"] == "http.request":
                if not msg.get("more_body", False):
                    self._finish()
                data = msg.get("body", b"")
                if data:
                    return bytes(data)
            elif msg["type"] == "http.disconnect":
                self._done = True
                self.finished.set()
                raise ClientDisconnected()
        if self._timer is not None and self._timer.deadline == math.inf:
            self._timer.deadline = trio.current_time() + self._timeout
        raise StopAsyncIteration

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("a proxied request body is streamed: use `async for`, never buffer it")

    def append(self, data: bytes) -> None:
        raise TypeError("RequestBody pulls from receive(); nothing may push into it")

    def set_complete(self) -> None:
        raise TypeError("RequestBody pulls from receive(); nothing may push into it")


class ProxyRequest(TrioRequest):
    """Quart request whose body is pulled on demand; carries the exchange record."""

    body_class = RequestBody
    body: RequestBody
    exchange: Exchange


class ProxyResponse(Response):
    """A response with raw ASGI headers, and either a small body or an upstream stream.

    No default Content-Type and no computed Content-Length: what the upstream
    sent is what the client gets.
    """

    default_mimetype = None  # type: ignore[assignment]  # no Content-Type invented
    automatically_set_content_length = False

    def __init__(
        self,
        status: int,
        raw_headers: hdr.Headers,
        payload: bytes = b"",
        upstream: httpx.Response | None = None,
    ) -> None:
        super().__init__(None, status)
        self.timeout = None
        self.raw_headers = raw_headers
        self.payload = payload
        self.upstream = upstream


async def close_upstream(response: httpx.Response) -> None:
    """Close an upstream response (and so free or drop its connection), even while cancelled."""
    if not response.is_closed:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
            await response.aclose()


def plain(status: int, text: str) -> ProxyResponse:
    """A short text/plain answer from the proxy itself."""
    body = text.encode("utf-8")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    return ProxyResponse(status, headers, body)


class ProxyHTTPConnection(TrioASGIHTTPConnection):
    """asgi_http_class: one request through Quart, streamed both ways, cancelled if the client leaves."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        forwarder: Forwarder = cast("ProxyApp", self.app).forwarder
        ex = forwarder.begin(self.scope)
        response: Any = None
        try:
            request = cast(ProxyRequest, self._create_request_from_scope(send))
            request.body.attach(receive, self.scope)
            request.exchange = ex
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, request.body, nursery.cancel_scope, ex)
                response = await self.app.handle_request(request)
                if not ex.client_gone:
                    await self._send(send, response, ex)
                nursery.cancel_scope.cancel()
        finally:
            if isinstance(response, ProxyResponse) and response.upstream is not None:
                await close_upstream(response.upstream)  # no-op when relay() already closed it
            if ex.client_gone and ex.status == 0:
                ex.status = CLIENT_GONE
            forwarder.finish(ex)

    @staticmethod
    async def _watch_disconnect(body: RequestBody, scope: trio.CancelScope, ex: Exchange) -> None:
        await body.finished.wait()
        while True:
            msg = await body.receive()
            if msg["type"] == "http.disconnect":
                if not ex.complete:
                    ex.client_gone = True
                scope.cancel()
                return

    async def _send(self, send: ASGISendCallable, response: Any, ex: Exchange) -> None:
        if not isinstance(response, ProxyResponse):  # Quart made it (error handler, hook)
            ex.status = response.status_code
            await self._send_response(send, response)
            ex.complete = True
            return
        ex.status = response.status_code
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
        )
        if response.upstream is not None:
            await cast("ProxyApp", self.app).forwarder.relay(response.upstream, send, ex)
        else:
            await send({"type": "http.response.body", "body": response.payload, "more_body": False})
            ex.complete = True

    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        """Quart's own responses, sent without RESPONSE_TIMEOUT."""
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encode_headers(response.headers),
            }
        )
        async with response.response as body:
            async for data in body:
                chunk = data.encode() if isinstance(data, str) else data
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
