"""The least a forwarding app does on this stack: hypercorn-trio plus one raw upstream round trip per request.

Served by bench/scaling.py (its "fetch" pair) as `hypercorn --worker-class trio --config bench/hello.toml
bench/fetch.py:app` with BENCH_UPSTREAM=127.0.0.1:<port of the bench's nginx>. For every request it takes
an idle keep-alive connection to that nginx (or opens one), sends one fixed GET, reads the answer by its
Content-Length and returns the body. No framework, no HTTP client library, no header copied, no token:
the control for how an app that waits on an upstream living on the client's CPU scales with workers.
"""

from __future__ import annotations

import os

import trio
from hello import Receive, Scope, Send, lifespan  # hypercorn puts bench/ on sys.path for a file path app

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "127.0.0.1:80")
HOST, _, PORT = UPSTREAM.rpartition(":")
REQUEST = f"GET / HTTP/1.1\r\nHost: {UPSTREAM}\r\n\r\n".encode()
idle: list[trio.SocketStream] = []  # keep-alive connections to the upstream, one per request in flight


async def fetch() -> bytes:
    """One GET over an idle (or new) upstream connection; the connection goes back when the body is whole."""
    stream = idle.pop() if idle else await trio.open_tcp_stream(HOST, int(PORT))
    try:
        await stream.send_all(REQUEST)
        data = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("the upstream closed the connection mid-response")
            data += chunk
            head, found, body = data.partition(b"\r\n\r\n")
            if not found:
                continue
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"content-length:")
            )
            if len(body) >= length:
                idle.append(stream)
                return body[:length]
    except BaseException:  # cancelled (the client went away) or broken: the connection is not reused
        await trio.aclose_forcefully(stream)
        raise


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await fetch()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
