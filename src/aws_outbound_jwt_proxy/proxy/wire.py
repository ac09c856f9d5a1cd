"""Writes to a TCP stream that return at once when the kernel takes every byte.

trio's ``SocketStream.send_all`` ends every write with a scheduling point, even
when the kernel took all the bytes without waiting: the writing task goes to
the back of the run queue. With many requests in flight that is a whole pass
of the scheduler (every other ready task's step) before the task does what
comes next: read the upstream's answer, or let the client connection parse
the request already waiting behind the response just written. At 64
connections those passes were about a third of a request's latency.

:func:`write_all` tries one non-blocking ``write`` first and hands only what
the kernel did not take to trio, which waits for the socket to drain. It stays
a cancellation point (a cancelled task writes nothing), and every caller still
reaches a scheduling point each time round its loop: reading the next chunk
of a body is one.

Only plain TCP streams (``trio.SocketStream``) take the shortcut; TLS and any
other stream go through their own ``send_all``. The caller owns the stream's
sending side, as for ``send_all`` (the server's writes hold its send lock).
"""

from __future__ import annotations

import os

import trio


async def write_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``, without a trip through the scheduler when the kernel takes it all."""
    if type(stream) is trio.SocketStream and data:
        fd = stream.socket.fileno()
        # Closed, or shut for writing: trio's send_all below raises ClosedResourceError.
        if fd >= 0 and not stream.socket.did_shutdown_SHUT_WR:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # EPIPE, ECONNRESET: what trio reports as a broken stream
                raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
    await stream.send_all(data)
