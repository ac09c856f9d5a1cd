"""Request and response bodies for a streaming proxy on Quart-Trio (plumbing, no policy).

Quart-Trio's own request reads the body in a background task into an
unbounded buffer. :class:`RequestBody` instead pulls each chunk from ASGI
``receive()`` only when the consumer (httpx) asks, so hypercorn's bounded
receive queue and TCP give real backpressure; no size limit, no body timeout.
:class:`ProxyResponse` carries raw headers and either a short body of the
proxy's own or the upstream response to stream; the request and the response
carry how the request went (target, token result, error type) for the
connection's owner to record.

Uses two Quart internals (``TrioBody`` with its ``__init__`` skipped, the
``body_class`` hook), which is why Quart is pinned to one minor version.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import httpx
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent
from quart.wrappers import Response
from quart_trio.wrappers import TrioRequest
from quart_trio.wrappers.request import TrioBody

from ..routing.target import Target
from . import headers as hdr

CLOSE_GRACE = 5.0  # seconds a cancelled request may spend closing its upstream response
_DETACHED = httpx.ByteStream(b"")  # what a closed upstream response keeps as its body stream


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


class ClientBodyTimeout(Exception):
    """The client sent no request body byte for --request-body-timeout."""


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
        self._idle_timeout = math.inf
        self.finished = trio.Event()

    def attach(self, receive: ASGIReceiveCallable, scope: Any, idle_timeout: float = math.inf) -> None:
        """Bind to the connection; decide from the headers whether a body follows.

        While the body streams, a gap of ``idle_timeout`` between two messages raises
        :class:`ClientBodyTimeout` (so a stalled upload frees its upstream connection).
        """
        self._receive = receive
        self._idle_timeout = idle_timeout
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
            with trio.move_on_after(self._idle_timeout) as idle:
                msg: Any = await self.receive()
            if idle.cancelled_caught:
                raise ClientBodyTimeout()
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
    """Quart request whose body is pulled on demand.

    ``target`` and ``token_result`` are set once the request is planned, before
    the upstream call (so they are known even if the client leaves during it).
    """

    body_class = RequestBody
    body: RequestBody
    target: Target | None = None
    token_result: str | None = None


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
        # How the upstream call went, for the connection's owner to record.
        self.error_type: str | None = None
        self.upstream_seconds: float | None = None
        self.client_gone = False
        self.denied: str | None = None


async def close_upstream(response: httpx.Response) -> None:
    """Close an upstream response (and so free or drop its connection), even while cancelled.

    Then detach its body stream: httpx's client binds the stream back to the
    response, a reference cycle that would leave every response (with its
    request, headers and buffers) to the cyclic garbage collector instead of
    being freed when the request ends.
    """
    try:
        if not response.is_closed:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
                await response.aclose()
    finally:
        response.stream = _DETACHED


def plain(status: int, text: str, retry_after: int | None = None) -> ProxyResponse:
    """A short text/plain answer from the proxy itself."""
    body = text.encode("utf-8")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode("ascii")))
    return ProxyResponse(status, headers, body)
