"""CONNECT interception, before the HTTP layer: take the tunnel, terminate TLS, serve HTTP inside it.

ASGI cannot hand a CONNECT'ed socket to the app, so when the app offers
interception (:mod:`..proxy.tunnel`, found in the connection's lifespan
state) the per-connection server (``patches.GuardedTCPServer``) calls
:func:`open_connection` before hypercorn sees a byte. It reads the first
request head:

* not ``CONNECT`` (decided on the first bytes that differ): the bytes read are
  put back (:class:`ReplayStream`) and hypercorn serves the connection as ever;
* ``CONNECT host:port`` that the app admits (allow-list, loop and SSRF checks):
  ``200 Connection established``, then a server-side ``trio.SSLStream`` with a
  leaf for that host (ALPN ``h2``, ``http/1.1``) over the same connection;
* a CONNECT the app does not admit: put back too, so the app answers it like any
  request (403, 400, 508: with its access record and metrics), and nothing is called.

Inside the tunnel the *same* hypercorn connection code (its ``TCPServer``: h11
or h2 by ALPN, WebSocket upgrades, its timeouts and flow control) serves the
*same* app: ``GuardedTCPServer`` just carries on with the TLS stream, and with
a copy of the connection state that names the tunnel's target, which hypercorn
puts into every request's ``scope["state"]`` and the planner uses as the
upstream. We chose that over a second HTTP implementation (h11/h2 driven by
hand, or a separate listener the tunnel is spliced to) because everything a
request gets on the main listener — HTTP/2, streaming, WebSocket, the
hardening patches, access records and metrics — it then gets in the tunnel
too, with no second code path to keep in step.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from ..proxy.tunnel import Interception
from ..routing.target import Target

log = logging.getLogger("aws_outbound_jwt_proxy.serve")

CONNECT = b"CONNECT "
MAX_HEAD = 16 * 1024  # a longer CONNECT head goes to hypercorn, which refuses it
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_END = (b"\r\n\r\n", b"\n\n")


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first gives back bytes already read from it, then reads on.

    Anything else (``socket``, and a TLS listener's ``do_handshake``,
    ``selected_alpn_protocol``, ``transport_stream``) is the wrapped stream's,
    so hypercorn sees the connection it would have seen.
    """

    def __init__(self, stream: trio.abc.Stream, buffered: bytes) -> None:
        self.stream = stream
        self._buffered = buffered

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]  # AttributeError for TLS: hypercorn expects it

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def socket(self) -> Any:
        """The TCP socket underneath (hypercorn reads the peer and local addresses from it)."""
        stream: Any = self.stream
        while not isinstance(stream, trio.SocketStream):
            stream = stream.transport_stream
        return stream.socket

    def __getattr__(self, name: str) -> Any:
        if name == "stream":  # not set yet: never recurse
            raise AttributeError(name)
        return getattr(self.stream, name)


@dataclass(frozen=True)
class Opened:
    """What to serve: ``stream`` (HTTP as received, or TLS inside the tunnel) and the tunnel's target."""

    stream: trio.abc.Stream
    target: Target | None = None


async def _read_head(stream: trio.abc.Stream) -> bytes:
    """Bytes until it is clear this is no CONNECT, or its head is complete (or too long); b"" at EOF."""
    data = b""
    while True:
        chunk = await stream.receive_some(MAX_HEAD)
        if not chunk:
            return data
        data += chunk
        if data[: len(CONNECT)] != CONNECT[: len(data)]:
            return data  # not CONNECT
        if len(data) >= len(CONNECT) and (any(end in data for end in _END) or len(data) > MAX_HEAD):
            return data


def parse_connect(data: bytes) -> tuple[str, bytes] | None:
    """(authority, bytes after the head) of a complete ``CONNECT host:port HTTP/1.x`` head, else None."""
    ends = [(data.find(end), end) for end in _END if end in data]
    if not data.startswith(CONNECT) or not ends:
        return None
    at, end = min(ends)
    line = data[:at].split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isascii():
        return None
    return parts[1].decode("ascii"), data[at + len(end) :]


def _local_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    try:
        address = ReplayStream(stream, b"").socket.getsockname()
    except (AttributeError, OSError):
        return None
    return str(address[0]), int(address[1])


async def open_connection(
    stream: trio.abc.Stream, interception: Interception, config: Any, terminated: Any
) -> Opened | None:
    """Read the first request head and take the tunnel if it is an admitted CONNECT.

    ``config`` is hypercorn's (its header and TLS handshake timeouts apply);
    ``terminated`` its event set at shutdown. None when the connection ended
    (or timed out, or shutdown began) before there was anything to serve.
    """
    if isinstance(stream, trio.SSLStream):  # a TLS listener: CONNECT comes inside its TLS
        try:
            with trio.fail_after(config.ssl_handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            return None
        if stream.selected_alpn_protocol() == "h2":
            return Opened(stream)  # HTTP/2 to the proxy itself: no CONNECT tunnels there
    head: bytes | None = None
    async with trio.open_nursery() as nursery:

        async def stop_at_shutdown() -> None:
            await terminated.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_at_shutdown)
        # The same deadline hypercorn gives a new connection's request headers.
        with trio.move_on_after(config.keep_alive_timeout):
            try:
                head = await _read_head(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        nursery.cancel_scope.cancel()
    if not head:  # closed, timed out or shutting down before a request head
        return None
    connect = parse_connect(head)
    if connect is None:
        return Opened(ReplayStream(stream, head))
    authority, rest = connect
    target = interception.admit(authority, _local_address(stream))
    if target is None:
        return Opened(ReplayStream(stream, head))  # the app answers the refusal
    try:
        await stream.send_all(ESTABLISHED)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    tls = trio.SSLStream(
        ReplayStream(stream, rest), interception.tls_context(target), server_side=True, https_compatible=True
    )
    try:
        with trio.fail_after(config.ssl_handshake_timeout):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        reason = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        log.warning(
            "TLS handshake in an intercepted tunnel failed (does the client trust the interception CA?)",
            extra={"target": target.authority, "cause": _reason(reason)},
        )
        await trio.aclose_forcefully(tls)
        return None
    log.debug("intercepting", extra={"target": target.authority, "alpn": tls.selected_alpn_protocol()})
    return Opened(tls, target)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower()
    return type(exc).__name__
