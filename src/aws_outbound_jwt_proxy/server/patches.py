"""Workarounds for hypercorn bugs, installed by one explicit call: :func:`install`.

Nothing here runs on import. The serving code (``server.serve.run`` for the
console script, ``asgi`` for the ``hypercorn`` command) calls :func:`install`
before it serves. Each patch names the upstream issue, and
``tests/test_patches.py`` has a test that fails once upstream fixes the bug, so
the version pins in pyproject.toml (hypercorn < 0.19) can be lifted then.
The third one is not a bug but a missing hook: under the ``hypercorn`` command
its ``-`` (stderr) loggers get a line format of their own; we route them
through ours so every stderr line is JSON in JSON mode.

``GuardedTCPServer`` also keeps hypercorn's keep-alive timer cheaper
(:class:`KeepAliveTimer`, not a bug: a cost per request), and is where
CONNECT interception starts, when the app offers it (:mod:`.tunnel`): the one
place that sees a connection before hypercorn's HTTP code does.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import hypercorn.logging
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Body, Data
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import ASGISendEvent, WebsocketResponseBodyEvent

from ..proxy.link import LINK, Link
from ..proxy.tunnel import Interception, offered
from ..proxy.websocket import WS_ANSWERED_BY_SERVER
from ..proxy.wire import write_all
from . import tunnel

log = logging.getLogger("aws_outbound_jwt_proxy.serve")

ANSWERED_BY_SERVER = WS_ANSWERED_BY_SERVER  # scope key: the status hypercorn itself sent


class GuardedTCPServer(TCPServer):
    """hypercorn's per-connection server, but an error in one connection ends only that one.

    hypercorn lets an unexpected exception in a connection's reader escape its
    serve loop, which stops the whole server (pgjones/hypercorn#225): one
    misbehaving client must never take the proxy down.

    When the app offers CONNECT interception, the connection's first request
    head is read here first (:func:`.tunnel.open_connection`); inside an
    intercepted tunnel hypercorn then serves the TLS stream, with the tunnel's
    target in the connection state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = KeepAliveTimer(self)  # type: ignore[assignment]
        self.link = Link()

    async def run(self) -> None:
        try:
            interception = offered(self.state)
            if interception is None or await self._open(interception):
                self.state = {**self.state, LINK: self.link}
                await super().run()
        except Exception as exc:  # not Cancelled: shutdown still propagates
            log.error("connection failed", extra={"error_class": type(exc).__name__})
            with trio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except Exception:
                    pass

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = self.link.write(event.data)  # a held response head goes out with its body
            # hypercorn ends every Content-Length response with a write of nothing: a lock, a
            # shielded cancel scope and a scheduler round trip for no bytes.
            if not data:
                return
            await self._write(data)
            return
        await super().protocol_send(event)

    async def _write(self, data: bytes) -> None:
        """hypercorn's write (under the send lock, shielded; a broken socket is the client gone),
        taking an uncontended lock without a checkpoint: under load every checkpoint sends the
        task to the back of the run queue, and the write itself is one already."""
        lock = self.send_lock
        await trio.lowlevel.checkpoint_if_cancelled()  # as Lock.acquire: a cancelled task writes nothing
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            try:
                with trio.CancelScope(shield=True):
                    await write_all(self.stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            lock.release()

    async def _read_data(self) -> None:
        if self.config.read_timeout:
            await super()._read_data()
        else:
            await self._read_without_timeout()
        self.link.left()  # cancels HTTP/1.x requests still in flight (proxy.link)
        # The client sent FIN (or the read failed). hypercorn 0.18 then only stops reading; an
        # idle connection (its keep-alive timer running, nothing in flight) would sit in
        # CLOSE_WAIT until that timer fires. Close it now. A request in progress finishes.
        timer = cast(KeepAliveTimer, self.idle_task)
        idle = timer.idle
        timer.finish()
        if idle:
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()

    async def _read_without_timeout(self) -> None:
        """hypercorn's read loop without its per-read ``fail_after(inf)`` (a cancel scope per read).

        hypercorn sets no read timeout by default, and neither does the proxy: idle and
        slow-header connections are bounded by the keep-alive timer (--read-header-timeout).
        """
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            await self.protocol.handle(RawData(data=bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())

    async def _open(self, interception: Interception) -> bool:
        """Take a CONNECT tunnel if this connection starts with one; False: nothing left to serve."""
        opened = await tunnel.open_connection(self.stream, interception, self.config, self.context.terminated)
        if opened is None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            return False
        self.stream = opened.stream  # type: ignore[assignment]  # hypercorn serves any trio stream
        if opened.target is not None:
            self.state = interception.tunnel_state(self.state, opened.target)
        return True


class KeepAliveTimer:
    """A connection's keep-alive timer: one task for the connection's life, whose deadline moves.

    hypercorn (0.18) restarts its idle timer after every response by cancelling
    one task and starting another through ``nursery.start`` (a lock, a task,
    two cancel scopes), about a tenth of the proxy's CPU per request on a
    keep-alive connection. Here ``restart``/``stop`` (the same interface,
    ``TrioSingleTask``'s) only move the deadline of one watcher task. What the
    timer does is hypercorn's ``TCPServer._idle_timeout``: close the connection
    after ``keep_alive_timeout`` idle, or at once when the server is shutting
    down and the connection is idle (a busy one closes when its response ends).
    """

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._done = False
        self._became_idle = trio.Event()
        self.idle = False

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection went idle: close it after keep_alive_timeout unless a request comes."""
        self.idle = True
        if self._done:
            return
        if self._scope is None:
            await task_group._nursery.start(self._watch)
        assert self._scope is not None
        self._scope.deadline = trio.current_time() + self._server.config.keep_alive_timeout
        self._became_idle.set()

    async def stop(self) -> None:
        """A request is in flight: no idle timeout until it ends."""
        self.idle = False
        if self._scope is not None:
            self._scope.deadline = math.inf

    def finish(self) -> None:
        """Reading ended (FIN, error or close): no request can follow, so no timer either.

        The connection ends when the request in flight, if any, does.
        """
        self._done = True
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            task_status.started()
            await self._server.context.terminated.wait()
            while not self.idle:  # shutting down: wait until the response in flight ends
                self._became_idle = trio.Event()
                await self._became_idle.wait()
        self._scope = None
        if self._done:  # finish(): nothing to close here
            return
        self._done = True
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


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
            # The app may have "accepted" meanwhile (its messages were dropped): tell it what the
            # client really got, for its access record, in the scope both share.
            cast(dict[str, Any], self.scope)[ANSWERED_BY_SERVER] = 400
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


def _route_hypercorn_logs_to_ours() -> None:
    """hypercorn's ``-`` (stderr) loggers use its own line format; send them through ours.

    hypercorn builds its loggers lazily, after importing the app, so replacing
    its factory here keeps every stderr line in the configured (JSON) format.
    """
    original = hypercorn.logging._create_logger

    def create(
        name: str, target: Any, level: str | None, sys_default: Any, *, propagate: bool = True
    ) -> logging.Logger | None:
        if target == "-":
            return logging.getLogger(name)  # no handler of its own: propagates to ours
        return original(name, target, level, sys_default, propagate=propagate)

    create.routed = True  # type: ignore[attr-defined]
    hypercorn.logging._create_logger = create


def install() -> None:
    """Install every workaround (idempotent). Call before serving."""
    # worker_serve looks TCPServer up in its module at call time.
    hypercorn.trio.run.TCPServer = GuardedTCPServer  # type: ignore[attr-defined]
    for module in (hypercorn.protocol.h11, hypercorn.protocol.h2):  # h3 needs aioquic, not served
        module.WSStream = GuardedWSStream  # type: ignore[attr-defined]
    if not getattr(hypercorn.logging._create_logger, "routed", False):
        _route_hypercorn_logs_to_ours()
    from . import h2limits  # HTTP/2 backpressure and reset-rate limit (see that module)

    h2limits.install()
