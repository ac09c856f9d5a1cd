"""The hypercorn workarounds in ``server.patches``: each one works, and each upstream bug still exists.

The ``*_still_exists`` tests exercise hypercorn's own classes. When one fails,
hypercorn has fixed that bug: drop the patch and lift the pin in pyproject.toml.
"""

from __future__ import annotations

import logging
from typing import Any

import h11
import hypercorn.protocol.h2
import hypercorn.protocol.h11
import hypercorn.trio.run
import pytest
import trio
from hypercorn.config import Config
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.run import WorkerContext, worker_serve
from hypercorn.trio.tcp_server import TCPServer

from aws_outbound_jwt_proxy.server import patches
from aws_outbound_jwt_proxy.server.binding import bind, hypercorn_config


class _BrokenStream:
    """A connection whose socket cannot even be inspected (stands in for any reader bug)."""

    closed = False

    @property
    def socket(self) -> Any:
        raise ValueError("boom")

    async def aclose(self) -> None:
        self.closed = True


def test_install_is_explicit_and_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", TCPServer)
    monkeypatch.setattr(hypercorn.protocol.h11, "WSStream", WSStream)
    monkeypatch.setattr(hypercorn.protocol.h2, "WSStream", WSStream)
    patches.install()
    patches.install()
    assert hypercorn.trio.run.TCPServer is patches.GuardedTCPServer  # type: ignore[attr-defined]
    assert hypercorn.protocol.h11.WSStream is patches.GuardedWSStream  # type: ignore[attr-defined]
    assert hypercorn.protocol.h2.WSStream is patches.GuardedWSStream  # type: ignore[attr-defined]


async def test_one_broken_connection_does_not_stop_the_server(caplog: pytest.LogCaptureFixture) -> None:
    stream = _BrokenStream()
    server = patches.GuardedTCPServer(None, Config(), WorkerContext(None), {}, stream)
    await server.run()  # returns instead of raising into hypercorn's serve loop
    assert stream.closed
    assert any(r.getMessage() == "connection failed" for r in caplog.records)


async def test_hypercorn_225_connection_error_escapes_serve_loop_still_exists() -> None:
    # pgjones/hypercorn#225: an unexpected error in one connection escapes TCPServer.run.
    with pytest.raises(ValueError, match="boom"):
        await TCPServer(None, Config(), WorkerContext(None), {}, _BrokenStream()).run()


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
FRAME = b"\x81\x85abcdabcde"  # a masked text frame, sent before any 101


async def _rejecting_app(scope: Any, receive: Any, send: Any) -> None:
    """Refuses every websocket handshake with a 403, answering over several sends."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()  # websocket.connect
    headers = [(b"content-length", b"7")]
    await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
    await trio.sleep(0.05)  # client bytes land while the refusal is being written
    await send({"type": "websocket.http.response.body", "body": b"denied\n", "more_body": False})


async def _hammer(port: int) -> None:
    for _ in range(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(HANDSHAKE)
            await stream.receive_some(4096)
            try:
                await stream.send_all(FRAME)
                await stream.receive_some(4096)
            except trio.BrokenResourceError:
                pass


async def _serve_rejecting_app_under_early_client_bytes(ws_stream: type[WSStream]) -> None:
    """Serve ``_rejecting_app`` with ``ws_stream`` and hypercorn's stock TCPServer; hammer it."""
    cfg = hypercorn_config("127.0.0.1", 0, graceful_timeout=0.5)
    sockets = bind(cfg, "test")
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: worker_serve(
                    _rejecting_app, cfg, sockets=sockets, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            await _hammer(port)
            stop.set()


async def test_guarded_ws_stream_answers_a_refused_handshake_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", TCPServer)
    monkeypatch.setattr(hypercorn.protocol.h11, "WSStream", patches.GuardedWSStream)
    await _serve_rejecting_app_under_early_client_bytes(patches.GuardedWSStream)  # no error escapes


async def test_hypercorn_second_websocket_answer_kills_the_server_still_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stock WSStream answers early client bytes with its own 400 while the app's refusal is
    # being written; the second response raises in the reader and ends the server.
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", TCPServer)
    monkeypatch.setattr(hypercorn.protocol.h11, "WSStream", WSStream)
    logging.getLogger("hypercorn.error").disabled = True
    try:
        with pytest.raises(BaseException) as info:
            await _serve_rejecting_app_under_early_client_bytes(WSStream)
    finally:
        logging.getLogger("hypercorn.error").disabled = False
    assert any(isinstance(e, h11.LocalProtocolError) for e in _leaves(info.value))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


async def _idle_connection_closed_after_fin(monkeypatch: pytest.MonkeyPatch, server: type[TCPServer]) -> bool:
    """Serve with ``server``; a client connects and sends FIN at once: is it closed within 1 s?"""
    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", server)
    cfg = hypercorn_config("127.0.0.1", 0, read_header_timeout=30.0)
    sockets = bind(cfg, "test")
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = trio.Event()
    closed = False
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: worker_serve(
                _rejecting_app, cfg, sockets=sockets, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_eof()
        with trio.move_on_after(1.0):
            while await stream.receive_some(1024):
                pass
            closed = True
        await stream.aclose()
        stop.set()
    return closed


async def test_guarded_server_closes_an_idle_connection_at_the_clients_fin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await _idle_connection_closed_after_fin(monkeypatch, patches.GuardedTCPServer)


async def test_hypercorn_idle_connection_waits_for_keep_alive_timer_after_fin_still_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # hypercorn 0.18 stops reading at the client's FIN but closes an idle connection only
    # when its keep-alive timer fires.
    assert not await _idle_connection_closed_after_fin(monkeypatch, TCPServer)


def test_hypercorn_read_loop_is_the_one_the_proxy_mirrors() -> None:
    """GuardedTCPServer reads with hypercorn's loop minus its per-read ``fail_after(inf)``.

    When hypercorn's loop changes, this fails: compare ``_read_without_timeout`` with it.
    """
    import inspect

    from hypercorn.trio.tcp_server import TCPServer

    source = inspect.getsource(TCPServer._read_data)
    assert "trio.fail_after(self.config.read_timeout or inf)" in source
    assert "await self.protocol.handle(RawData(bytes(data)))" in source
    assert "await self.protocol.handle(Closed())" in source
