"""Bare ASGI "hello" app: the ceiling of hypercorn's trio worker with no framework and no upstream.

Served by bench/run.py as `hypercorn --worker-class trio --config bench/hello.toml bench/hello.py:app`.
It answers every HTTP request with the same ~100-byte body the bench's nginx upstream returns, so
the rows compare like with like.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b"hello from the benchmark: a fixed body of about one hundred bytes, the same as the nginx upstream.\n"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge start-up and shutdown: the whole lifespan protocol of a bare bench app."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
