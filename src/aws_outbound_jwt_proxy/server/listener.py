"""A TCP listener that takes every connection already waiting in the kernel's backlog at once.

trio's ``SocketListener.accept`` returns one connection per call and passes
through the scheduler each time, even when more are waiting. Under load a
pass of the scheduler is every ready task's step (10-20 ms at 64 busy
connections here), so a burst of new connections was accepted one per pass:
64 clients connecting together waited up to 0.7 s for their first byte, and
a client that opens a connection per request got one accepted per pass.

:class:`BacklogListener` accepts the first connection as trio does (waiting
for it, one scheduling point), then takes what else is already in the backlog
without waiting (up to :data:`ACCEPT_BURST`) and hands those out from memory
on the next calls, which still are cancellation points. Connections
taken but not yet handed out are closed with the listener. A failing
``accept`` while taking the backlog (a connection reset before it was
accepted, or no file descriptor left) ends the take: the next call goes
through trio's ``accept``, which skips the routine errors and reports the
rest, so ``trio.serve_listeners`` backs off from ``EMFILE`` as before.

hypercorn builds its listeners inside ``worker_serve``; :func:`install` has it
build this one for plain TCP (a TLS listener wraps it). The console script
installs it: its one process owns its listening socket. Under
``hypercorn -w N`` the workers share one socket and trio's one connection per
pass stays: there it is what spreads connections over the workers (a busy
worker comes back for the next one later). A worker taking a burst whole
would serve it alone: with two workers at 64 connections, one of them served
all 64.
"""

from __future__ import annotations

import socket
import types
from collections import deque
from typing import Any

import hypercorn.trio.run
import trio

# Connections taken per scheduling point, at most (accepting one costs ~20 µs: a pass stays short).
ACCEPT_BURST = 128


class BacklogListener(trio.abc.Listener[trio.SocketStream]):
    """``trio.SocketListener`` that takes the whole backlog per scheduling point."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._listener = trio.SocketListener(sock)  # validates: a listening SOCK_STREAM socket
        self.socket = sock
        # A second descriptor on the same listening socket, for accept() without the scheduler
        # (trio's socket only offers an async accept). It shares the socket's non-blocking mode.
        self._backlog = socket.socket(fileno=socket.dup(sock.fileno()))
        self._backlog.setblocking(False)
        self._taken: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._taken:
            await trio.lowlevel.checkpoint_if_cancelled()
            return self._taken.popleft()
        stream = await self._listener.accept()
        self._take_backlog()
        return stream

    def _take_backlog(self) -> None:
        for _ in range(ACCEPT_BURST - 1):
            try:
                conn, _ = self._backlog.accept()
            except OSError:  # BlockingIOError: nothing waiting; anything else: trio's accept handles it
                return
            self._taken.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))

    async def aclose(self) -> None:
        while self._taken:
            self._taken.popleft().socket.close()
        self._backlog.close()
        await self._listener.aclose()


class _TrioForHypercorn(types.ModuleType):
    """trio as ``hypercorn.trio.run`` sees it: the same module, with :class:`BacklogListener`
    as its ``SocketListener``."""

    SocketListener = BacklogListener

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> None:
    """Make hypercorn's ``worker_serve`` listen through :class:`BacklogListener` (idempotent)."""
    if not isinstance(hypercorn.trio.run.trio, _TrioForHypercorn):  # type: ignore[attr-defined]
        hypercorn.trio.run.trio = _TrioForHypercorn("trio")  # type: ignore[attr-defined]
