"""One HTTP request's lifecycle on the client connection: the only writer of its Exchange.

:class:`ProxyHTTPConnection` is the app's ``asgi_http_class``. Per request it
opens the :class:`~.exchange.Exchange`, runs the request through Quart
(``app.handle_request``: context, hooks, dispatch to the
:class:`~.forward.Forwarder`), records how it went, streams the response
(an upstream body chunk by chunk, no response timeout), and finishes the
exchange. A client that leaves cancels its request, and so the upstream
call: on HTTP/1.x the server says so (:mod:`.link`, which also lets a response
head go out in one write with its body); on HTTP/2, once the request body is
consumed, a task watches ``receive()`` for ``http.disconnect``.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import httpx
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection

from .body import ProxyRequest, ProxyResponse, RequestBody, close_upstream
from .exchange import CLIENT_GONE, Exchange, cause, classify
from .forward import ForwardingApp
from .h1 import BODY, ResponseBody
from .link import Link, link

log = logging.getLogger("aws_outbound_jwt_proxy.forward")


class ProxyHTTPConnection(TrioASGIHTTPConnection):
    """asgi_http_class: one request through Quart, streamed both ways, cancelled if the client leaves."""

    response: Any = None
    link: Link | None = None

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        forwarder = cast(ForwardingApp, self.app).forwarder
        ex = forwarder.begin(self.scope)
        request: ProxyRequest | None = None
        try:
            request = cast(ProxyRequest, self._create_request_from_scope(send))
            request.body.attach(receive, self.scope, forwarder.body_timeout)
            connection = self.link = link(self.scope)
            if connection is not None:  # HTTP/1.x: the server cancels us when the client leaves
                with trio.CancelScope() as cancel:
                    connection.add(cancel, ex)
                    try:
                        await self._exchange(request, send, ex)
                    finally:
                        connection.discard(cancel)
            else:  # HTTP/2 (or a server without the hook): watch receive() for http.disconnect
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, request.body, nursery.cancel_scope, ex)
                    await self._exchange(request, send, ex)
                    nursery.cancel_scope.cancel()
        finally:
            if request is not None:
                ex.target, ex.token_result = request.target, request.token_result
            response = self.response
            if isinstance(response, ProxyResponse) and response.upstream is not None:
                await close_upstream(response.upstream)  # no-op when relayed to the end
            if ex.client_gone and ex.status == 0:
                ex.status = CLIENT_GONE
            forwarder.finish(ex)

    async def _exchange(self, request: ProxyRequest, send: ASGISendCallable, ex: Exchange) -> None:
        """The request through Quart, then the response to the client (unless it left)."""
        response = self.response = await self.app.handle_request(request)
        ex.target, ex.token_result = request.target, request.token_result
        if isinstance(response, ProxyResponse):
            _record(ex, response)
        if not ex.client_gone:
            await self._send(send, response, ex)

    async def _send(self, send: ASGISendCallable, response: Any, ex: Exchange) -> None:
        ex.status = response.status_code
        if not isinstance(response, ProxyResponse):  # Quart made it (error handler, hook)
            await _send_quart_response(send, response, ex)
            return
        if self.link is not None and _body_in_hand(response):
            self.link.hold_next_write()  # the head goes out with the body's first bytes
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
        )
        if response.upstream is not None:
            await _relay(response.upstream, send, ex)
        else:
            ex.complete = True  # before the last send: see _watch_disconnect
            await send({"type": "http.response.body", "body": response.payload, "more_body": False})


def _body_in_hand(response: ProxyResponse) -> bool:
    """Whether the response's first body message can follow its head without waiting."""
    if response.upstream is None:
        return True  # the proxy's own short body
    body = response.upstream.extensions.get(BODY)
    return isinstance(body, ResponseBody) and body.ready


def _record(ex: Exchange, response: ProxyResponse) -> None:
    ex.denied = response.denied
    ex.error_type = response.error_type
    ex.upstream_seconds = response.upstream_seconds
    ex.client_gone = ex.client_gone or response.client_gone


async def _watch_disconnect(body: RequestBody, scope: trio.CancelScope, ex: Exchange) -> None:
    """Cancel the request when the client leaves before the whole response was handed over.

    hypercorn also reports ``http.disconnect`` while it finishes a complete response
    (from inside the last ``send``, where it restarts the connection's keep-alive
    timer); cancelling then would cancel that restart and leave the connection with
    no idle timeout at all. So a disconnect after the last send began is ignored.
    """
    await body.finished.wait()
    while True:
        msg = await body.receive()
        if msg["type"] == "http.disconnect":
            if not ex.complete:
                ex.client_gone = True
                scope.cancel()
            return


async def _relay(response: httpx.Response, send: ASGISendCallable, ex: Exchange) -> None:
    """Stream the upstream body to the client as it arrives (raw, no decoding, no timeout).

    An upstream failure mid-body is logged and the client response is left
    unfinished, so hypercorn aborts it instead of ending it cleanly.
    """
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError as exc:
        ex.error_type = classify(exc).error_type
        log.error(
            "upstream response failed mid-body",
            extra={"target": ex.target.authority if ex.target else "", "cause": cause(exc)},
        )
        return
    finally:
        await close_upstream(response)
    ex.complete = True  # before the last send: see _watch_disconnect
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_quart_response(send: ASGISendCallable, response: Any, ex: Exchange) -> None:
    """Quart's own responses (error handlers, hooks), sent without RESPONSE_TIMEOUT."""
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
    ex.complete = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})
