"""WebSocket (Upgrade) proxying: the client's ASGI websocket ↔ a trio-websocket upstream connection.

Same routing, allow-list and token rules as HTTP; the bearer token goes on
the upstream handshake. Text and binary messages are relayed both ways, close
codes are relayed, and the subprotocol the upstream picked is passed back.
Anything that fails before the upstream accepted is answered with an HTTP
status before the client's handshake is accepted (hypercorn's
``websocket.http.response`` extension).

Importing this module also swaps hypercorn's ``WSStream`` for
:class:`GuardedWSStream` (see there): without it, client bytes arriving while
a rejection is on its way make hypercorn answer a second time, and the
resulting h11 error takes the whole server process down.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import hypercorn.protocol.h2
import hypercorn.protocol.h11
import trio
import trio_websocket
from hypercorn.protocol.events import Body, Data
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    WebsocketResponseBodyEvent,
)

from ..routing.router import RouteError
from . import headers as hdr
from .forward import (
    BAD_TARGET,
    TOKEN_UNAVAILABLE,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    Exchange,
    Forwarder,
    cause,
    classify,
    client_ip,
    request_target,
    server_address,
)

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .app import ProxyApp

log = logging.getLogger("aws_outbound_jwt_proxy.forward")

MAX_MESSAGE = 16 * 1024 * 1024  # larger upstream messages close with 1009
QUEUE = 4  # upstream messages buffered before the reader stops reading (backpressure)
CLOSE_TIMEOUT = 5.0
BAD_GATEWAY = 1014  # the upstream went away without a close code we may send on


def close_code(code: int | None) -> int:
    """An upstream/client close code → one that may be sent in a Close frame."""
    if code is None or code == 1005:
        return 1000
    if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return BAD_GATEWAY


def client_close_code(code: int | None) -> int:
    """The close code to send upstream when the client left.

    hypercorn's ``websocket.disconnect`` never carries the client's own close
    code: any client-initiated close arrives as 1006, so that (and 1005) means
    a normal close here.
    """
    if code is None or code in (1005, 1006):
        return 1000
    return close_code(code)


class GuardedWSStream(WSStream):
    """hypercorn's websocket stream, with the handshake answered at most once.

    hypercorn (0.18) answers client bytes that arrive before the handshake is
    accepted with its own ``400``, even while the app's rejection (or its own
    403/500) is being written, and lets the app keep sending while that 400
    is being written. Either way a second response (or a close of the socket
    mid-write) raises in the connection's reader task, which nothing catches:
    the whole server exits (pgjones/hypercorn#225). Here whoever starts
    answering first wins: client bytes after the app's answer has started are
    dropped, and the app's messages are dropped while hypercorn writes its
    own 400 (after which hypercorn marks the stream closed, as it always did,
    and the app now gets a ``websocket.disconnect`` so that it ends).
    """

    answered = False  # a response to the handshake (the app's rejection or an error) has started
    reader_answering = False  # the reader task is writing hypercorn's own 400 for early client bytes

    async def handle(self, event: StreamEvent) -> None:
        if not isinstance(event, Body | Data) or self.closed or self.handshake.accepted:
            await super().handle(event)
        elif not self.answered:
            self.reader_answering = True
            try:
                await super().handle(event)  # hypercorn's 400, then the stream counts as closed
            finally:
                self.reader_answering = False
            if self.app_put is not None:  # hypercorn never tells the app; it would wait forever
                await self.app_put({"type": "websocket.disconnect", "code": 1006})
        # else: client bytes while the handshake is being refused: nobody reads them

    async def app_send(self, message: ASGISendEvent | None) -> None:
        if not self.reader_answering:
            await super().app_send(message)

    async def _send_error_response(self, status_code: int) -> None:
        if not self.answered:
            self.answered = True
            await super()._send_error_response(status_code)

    async def _send_rejection(self, message: WebsocketResponseBodyEvent) -> None:
        self.answered = True
        await super()._send_rejection(message)


for _module in (hypercorn.protocol.h11, hypercorn.protocol.h2):  # h3 needs aioquic, not served
    _module.WSStream = GuardedWSStream  # type: ignore[attr-defined]


async def reject(scope: Any, send: Any, status: int, body: bytes) -> None:
    """Answer the handshake with an HTTP response (or a plain close if unsupported)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008 if status < 500 else BAD_GATEWAY})


class ProxyWebsocketConnection:
    """asgi_websocket_class: one proxied websocket session, logged like a request (status 101)."""

    def __init__(self, app: QuartTrio, scope: Any) -> None:
        self.app = app
        self.scope = scope

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        forwarder: Forwarder = cast("ProxyApp", self.app).forwarder
        ex = forwarder.begin(self.scope)
        try:
            await proxy(forwarder, self.scope, receive, send, ex)
        finally:
            forwarder.finish(ex)


async def _reject(scope: Any, send: ASGISendCallable, ex: Exchange, status: int, text: str) -> None:
    ex.status = status
    await reject(scope, send, status, text.encode())


async def proxy(
    fwd: Forwarder, scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable, ex: Exchange
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    raw_target = request_target(scope)
    if raw_target is None:
        return await _reject(scope, send, ex, 400, BAD_TARGET)
    try:
        target = fwd.router.resolve(scope["headers"], server_address(scope))
    except RouteError as err:
        return await _reject(scope, send, ex, err.status, err.body)
    ex.target = target
    jwt = await fwd.token_for(target, ex)
    if jwt is None:
        return await _reject(scope, send, ex, 502, TOKEN_UNAVAILABLE)
    out, _ = hdr.outbound(
        scope["headers"],
        authority=target.authority.encode("ascii"),
        bearer=jwt.encode("ascii"),
        client_ip=client_ip(scope),
        drop=fwd.drop,
        websocket=True,
    )
    started = trio.current_time()
    try:
        async with trio_websocket.open_websocket(
            target.host.strip("[]"),
            target.effective_port,
            raw_target.decode("latin-1"),
            use_ssl=fwd.tls if target.scheme == "https" else False,
            subprotocols=scope.get("subprotocols") or None,
            extra_headers=out,
            message_queue_size=QUEUE,
            max_message_size=MAX_MESSAGE,
            connect_timeout=fwd.timeout,
            disconnect_timeout=CLOSE_TIMEOUT,
        ) as conn:
            ex.upstream_seconds = trio.current_time() - started
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": conn.subprotocol,
                    "headers": hdr.websocket_accept(conn.handshake_headers),
                }
            )
            ex.status = 101
            await _relay(conn, receive, send)
    except trio_websocket.ConnectionRejected as rej:
        ex.upstream_seconds = trio.current_time() - started
        log.error(
            "upstream websocket handshake rejected",
            extra={"target": target.authority, "cause": f"status {rej.status_code}"},
        )
        if ex.status == 0:
            ex.status = rej.status_code
            await reject(scope, send, rej.status_code, rej.body or b"")
    except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
        ex.upstream_seconds = trio.current_time() - started
        timeout = isinstance(exc, trio_websocket.ConnectionTimeout | trio.TooSlowError)
        ex.error_type = "timeout" if timeout else classify(exc)[2]
        log.error("upstream websocket failed", extra={"target": target.authority, "cause": cause(exc)})
        if ex.status == 0:
            await _reject(
                scope,
                send,
                ex,
                504 if timeout else 502,
                UPSTREAM_TIMEOUT if timeout else UPSTREAM_UNAVAILABLE,
            )


async def _relay(
    conn: trio_websocket.WebSocketConnection, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_upstream_to_client, conn, send, nursery.cancel_scope)
        while True:
            msg: Any = await receive()
            if msg["type"] == "websocket.receive":
                data: str | bytes | None = msg.get("bytes")
                if data is None:
                    data = msg.get("text") or ""
                try:
                    await conn.send_message(data)
                except trio_websocket.ConnectionClosed:
                    return  # the upstream side is closing; _upstream_to_client relays it
            elif msg["type"] == "websocket.disconnect":
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await conn.aclose(client_close_code(msg.get("code")), msg.get("reason") or None)
                nursery.cancel_scope.cancel()
                return


async def _upstream_to_client(
    conn: trio_websocket.WebSocketConnection, send: ASGISendCallable, done: trio.CancelScope
) -> None:
    try:
        while True:
            message = await conn.get_message()
            if isinstance(message, str):
                await send({"type": "websocket.send", "text": message, "bytes": None})
            else:
                await send({"type": "websocket.send", "bytes": message, "text": None})
    except trio_websocket.ConnectionClosed as closed:
        reason = closed.reason
        code = close_code(reason.code if reason is not None else None)
        text = (reason.reason if reason is not None else None) or ""
        await send({"type": "websocket.close", "code": code, "reason": text})
    done.cancel()
