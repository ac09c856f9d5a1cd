"""The metrics listener's tiny ASGI app: the scrape path, /healthz, /readyz, 404 elsewhere.

Raw ASGI, no framework: it answers a few fixed paths. The scrape body is
rendered in a worker thread so a large registry never stalls the proxy's
event loop (both listeners share one trio loop).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import trio

from ..tokens.supervisor import SetState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Render = Callable[[str], tuple[bytes, str]]  # Accept header -> (body, content type)
Ready = Callable[[], tuple[bool, str]]  # -> (ready, reason)

HEALTHZ = "/healthz"
READYZ = "/readyz"
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"
GZIP_MIN = 1024  # smaller scrape bodies are sent as they are


class Readiness:
    """``/readyz``: listeners up, every static audience set holds a valid token, not draining."""

    def __init__(
        self,
        tokens_ready: Callable[[], bool],
        snapshot: Callable[[], Sequence[SetState]] | None = None,
    ) -> None:
        self._tokens_ready = tokens_ready  # Supervisor.ready
        self._snapshot = snapshot  # Supervisor.snapshot: names the sets still missing a token
        self._listening = False
        self._draining = False

    def listening(self) -> None:
        """Every listener is bound and serving."""
        self._listening = True

    def draining(self) -> None:
        """Shutdown began: report not ready so load balancers stop sending traffic."""
        self._draining = True

    def __call__(self) -> tuple[bool, str]:
        if self._draining:
            return False, "shutting down"
        if not self._listening:
            return False, "listeners not up yet"
        if self._tokens_ready():
            return True, "ready"
        missing = (
            [s for s in self._snapshot() if s.static and s.seconds_left is None] if self._snapshot else []
        )
        if not missing:
            return False, "no valid token yet for the --token-audience set"
        parts = [f"{s.audience} ({s.error_class or 'fetching'})" for s in missing]
        return False, "no valid token for audience set " + "; ".join(parts)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], head: bool
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _scrape(render: Render, accept: str, gzip_ok: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body, content_type = render(accept)
    headers = [(b"content-type", content_type.encode()), (b"vary", b"Accept, Accept-Encoding")]
    if gzip_ok and len(body) >= GZIP_MIN:
        body = gzip.compress(body, compresslevel=1)
        headers.append((b"content-encoding", b"gzip"))
    return body, headers


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(
    render: Render, ready: Ready, path: str, *, prepare: Callable[[], None] | None = None
) -> ASGIApp:
    """Serve ``render`` at ``path``, liveness at /healthz, ``ready`` at /readyz, 404 elsewhere.

    ``prepare`` runs on the event loop before each scrape; ``render`` runs in a worker thread.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websocket: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        method, target = scope["method"], scope["path"]
        head = method == "HEAD"
        if target not in (path, HEALTHZ, READYZ):
            await _respond(send, 404, b"not found\n", [(b"content-type", _TEXT)], head)
            return
        if method not in ("GET", "HEAD"):
            headers = [(b"content-type", _TEXT), (b"allow", b"GET, HEAD")]
            await _respond(send, 405, b"method not allowed\n", headers, head)
            return
        if target == path:
            accept = _header(scope, b"accept")
            gzip_ok = "gzip" in _header(scope, b"accept-encoding")
            if prepare is not None:
                prepare()
            body, headers = await trio.to_thread.run_sync(_scrape, render, accept, gzip_ok)
            await _respond(send, 200, body, headers, head)
        elif target == HEALTHZ:
            await _respond(send, 200, b"ok\n", [(b"content-type", _TEXT)], head)
        else:
            ok, reason = ready()
            body = json.dumps({"status": "ready" if ok else "not ready", "reason": reason}).encode() + b"\n"
            await _respond(send, 200 if ok else 503, body, [(b"content-type", _JSON)], head)

    return app
