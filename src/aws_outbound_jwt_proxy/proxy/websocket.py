"""WebSocket (Upgrade) proxying: the client's ASGI websocket ↔ a trio-websocket upstream connection.

Same routing, allow-list and token rules as HTTP; the bearer token goes on
the upstream handshake. Text and binary messages are relayed both ways, close
codes are relayed, and the subprotocol the upstream picked is passed back.
Anything that fails before the upstream accepted is answered with an HTTP
status before the client's handshake is accepted (hypercorn's
``websocket.http.response`` extension). Planning (route → token → headers) is
the same :class:`~.plan.Planner` step as for HTTP; this module owns the
session's lifecycle and is the only writer of its Exchange.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, cast

import trio
import trio_websocket
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from . import headers as hdr
from .dial import open_upstream, open_websocket
from .exchange import (
    DENIED_CIDR,
    NOT_ALLOWED,
    TOKEN_OK,
    DeniedUpstream,
    Exchange,
    LoopDetected,
    Refusal,
    cause,
    classify,
    own_listener_refusal,
)
from .forward import Forwarder, ForwardingApp
from .plan import Plan

log = logging.getLogger("aws_outbound_jwt_proxy.forward")

MAX_MESSAGE = 16 * 1024 * 1024  # larger upstream messages close with 1009
QUEUE = 4  # upstream messages buffered before the reader stops reading (backpressure)
CLOSE_TIMEOUT = 5.0
BAD_GATEWAY = 1014  # the upstream went away without a close code we may send on
# Scope key the server sets when it answered the handshake itself (early client bytes: 400),
# whatever the session did: the status the client saw, for the access record.
WS_ANSWERED_BY_SERVER = "aws_outbound_jwt_proxy.answered_by_server"


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

    def __init__(self, app: object, scope: Any) -> None:
        self.app = app
        self.scope = scope

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        forwarder = cast(ForwardingApp, self.app).forwarder
        ex = forwarder.begin(self.scope)
        try:
            first = await receive()
            if first["type"] != "websocket.connect":
                return
            plan = await forwarder.planner.plan(self.scope, websocket=True)
            if isinstance(plan, Refusal):
                ex.refused(plan)
                await reject(self.scope, send, plan.status, plan.body.encode())
            else:
                ex.target, ex.token_result = plan.target, TOKEN_OK
                await _session(forwarder, plan, self.scope, receive, send, ex)
            ex.complete = True  # not reached when the session was cut (shutdown, cancellation)
        finally:
            ex.status = self.scope.get(WS_ANSWERED_BY_SERVER, ex.status)
            forwarder.finish(ex)


async def _session(
    fwd: Forwarder,
    plan: Plan,
    scope: Any,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
    ex: Exchange,
) -> None:
    target, upstream = plan.target, fwd.upstream
    proxy = upstream.egress.proxy_for(target)  # always a CONNECT tunnel for websockets
    connect = partial(open_upstream, target, guard=upstream.direct_guard, proxy=proxy, tls=upstream.tls)
    started = trio.current_time()
    try:
        async with open_websocket(
            connect,
            target.authority,
            plan.path.decode("latin-1"),
            subprotocols=scope.get("subprotocols") or None,
            extra_headers=plan.headers,
            message_queue_size=QUEUE,
            max_message_size=MAX_MESSAGE,
            connect_timeout=upstream.timeout,
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
    except LoopDetected as loop:
        refusal = own_listener_refusal(loop.kind, target)
        ex.upstream_seconds = trio.current_time() - started
        ex.status, ex.denied = refusal.status, refusal.denied
        await reject(scope, send, refusal.status, refusal.body.encode())
    except DeniedUpstream:
        ex.upstream_seconds = trio.current_time() - started
        ex.denied, ex.status = DENIED_CIDR, 403
        log.warning("upstream address denied", extra={"target": target.authority, "reason": DENIED_CIDR})
        await reject(scope, send, 403, NOT_ALLOWED.encode())
    except (trio_websocket.HandshakeError, OSError, trio.TooSlowError) as exc:
        ex.upstream_seconds = trio.current_time() - started
        failure = classify(exc)
        ex.error_type = failure.error_type
        log.error("upstream websocket failed", extra={"target": target.authority, "cause": cause(exc)})
        if ex.status == 0:
            ex.status = failure.status
            await reject(scope, send, failure.status, failure.body.encode())


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
