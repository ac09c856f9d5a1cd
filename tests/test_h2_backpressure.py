"""HTTP/2 backpressure: a client whose flow-control window is closed makes the proxy wait, not buffer.

The ``*_still_exists`` test runs hypercorn's own h2 classes: when it fails,
hypercorn sends only what the window allows and ``server/h2limits.py``'s
buffer fix can go. The RSS tests run the real proxy in a child process
(``python -m aws_outbound_jwt_proxy``, patches installed as in production).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from hypercorn.trio.worker_context import EventWrapper

from aws_outbound_jwt_proxy.server import h2limits
from tests.fixtures.emulator import EmulatorProcess, StsEmulator
from tests.fixtures.process import ProxyProcess, base_env, spawn
from tests.fixtures.proxy import FixedTokens, proxy_settings, running_proxy
from tests.test_h2_client import MAX_WINDOW, H2Client, Peak, RawUpstream, port_of, serve_h2_with

HTTP = ("--upstream-scheme", "http")
MIB = 1 << 20
LOAD = 3.0  # seconds the upstream may push while the client's window stays closed (load shape, not sync)
RSS_BUDGET = 16 * MIB
STREAMS, SIZE = 4, 16 * MIB  # per download test: 64 MiB the stock proxy would hold


@pytest.fixture(scope="module")
def h2_proxy(sts_emulator_process: EmulatorProcess) -> Iterator[ProxyProcess]:
    """One real proxy process for this module's RSS measurements."""
    emu = StsEmulator(sts_emulator_process.url, sts_emulator_process.issuer)
    proxy = spawn([*HTTP, "--metrics-enabled", "false"], emu.subprocess_env(base_env()))
    yield proxy
    proxy.kill()


def _recording(base: type[Any]) -> tuple[type[Any], list[Any]]:
    """A subclass of ``base`` that keeps every instance (no other change)."""
    made: list[Any] = []

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    return Recording, made


def _queued(protocols: list[Any]) -> int:
    return sum(len(b.buffer) for p in protocols for b in p.stream_buffers.values())


async def test_hypercorn_h2_closed_window_buffers_the_whole_response_still_exists(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    # hypercorn's sender takes 0 bytes from a stream's buffer while the client's window is 0,
    # and its StreamBuffer counts that as drained: the app is let go and the buffer grows.
    protocol, made = _recording(h2limits.STOCK_H2_PROTOCOL)
    up = await RawUpstream(expect=8 * MIB).start(nursery)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        serve_h2_with(monkeypatch, protocol, h2limits.STOCK_STREAM_BUFFER)
        client = await H2Client.connect(port_of(url), window=0)
        nursery.start_soon(client.pump)
        client.get(f"/big/{8 * MIB}", [up.header()])
        await client.flush()
        with trio.move_on_after(LOAD):
            await up.all_sent.wait()
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        queued = _queued(made)
        await client.aclose()
    assert client.streams[1].received == 0  # the window never opened
    assert queued > 4 * MIB, queued


async def test_zero_take_from_a_closed_window_does_not_release_the_app() -> None:
    buffer = h2limits.FlowControlledStreamBuffer(EventWrapper)
    pushed = 0

    async def app() -> None:
        nonlocal pushed
        for _ in range(64):
            await buffer.push(b"x" * 16384)
            pushed += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(app)
        for _ in range(100):  # hypercorn's sender while the window is 0: takes nothing, again and again
            await trio.testing.wait_all_tasks_blocked()
            assert await buffer.pop(0) == b""
        assert pushed == 1 and len(buffer.buffer) == 2 * 16384  # waiting at the high-water mark
        while pushed < 64:  # the window opens: every byte flows, the app moves on
            await trio.testing.wait_all_tasks_blocked()
            await buffer.pop(16384)
        nursery.cancel_scope.cancel()
    assert len(buffer.buffer) <= 2 * 16384


async def test_one_connection_queues_at_most_its_cap_across_streams(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    protocol, made = _recording(h2limits.GuardedH2Protocol)
    streams = 40  # x two frames each would be 1.25 MiB: more than the connection may queue
    up = await RawUpstream().start(nursery)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        serve_h2_with(monkeypatch, protocol, h2limits.FlowControlledStreamBuffer)
        client = await H2Client.connect(port_of(url), window=0)
        nursery.start_soon(client.pump)
        sids = [client.get(f"/big/{MIB}", [up.header()]) for _ in range(streams)]
        await client.flush()
        with trio.fail_after(10):
            await client.wait_until(lambda: all(client.streams[s].status == 200 for s in sids))
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        queued = _queued(made)
        per_stream = max(len(b.buffer) for b in made[0].stream_buffers.values())
        for sid in sids:
            client.open_window(sid, MIB)
        client.open_window(None, streams * MIB)
        await client.flush()
        with trio.fail_after(15):
            await client.wait_until(lambda: all(client.streams[s].ended for s in sids))
        await client.aclose()
    assert h2limits.MAX_BUFFERED - h2limits.PIECE <= queued <= h2limits.MAX_BUFFERED + h2limits.PIECE, queued
    assert per_stream < 2 * 16384 + h2limits.PIECE
    assert [client.streams[s].received for s in sids] == [MIB] * streams


async def _warm_up(port: int, up: RawUpstream) -> None:
    """One small and one 1 MiB response over HTTP/2: tokens, pools and allocator are warm."""
    client = await H2Client.connect(port, window=MAX_WINDOW)
    client.auto_ack = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.pump)
        client.open_window(None, 4 * MIB)
        sids = [client.get("/warm", [up.header()]), client.get(f"/big/{MIB}", [up.header()])]
        await client.flush()
        with trio.fail_after(10):
            await client.wait_until(lambda: all(client.streams[s].ended for s in sids))
        await client.aclose()
    assert client.streams[sids[1]].received == MIB


@pytest.mark.parametrize("closed", ["stream window", "connection window"])
async def test_closed_window_download_keeps_proxy_rss_flat(
    closed: str, h2_proxy: ProxyProcess, nursery: trio.Nursery
) -> None:
    port = port_of(h2_proxy.url)
    up = await RawUpstream(expect=STREAMS * SIZE).start(nursery)
    await _warm_up(port, up)
    up.sent = 0
    with Peak(h2_proxy.proc.pid) as rss:
        # stream window: every stream starts at 0; connection window: streams may take 2 GiB
        # but the connection's 64 KiB is never given back
        client = await H2Client.connect(port, window=0 if closed == "stream window" else MAX_WINDOW)
        nursery.start_soon(client.pump)
        sids = [client.get(f"/big/{SIZE}", [up.header()]) for _ in range(STREAMS)]
        await client.flush()
        with trio.move_on_after(LOAD):
            await up.all_sent.wait()
    print(f"{closed} closed: upstream sent {up.sent / MIB:.1f} MiB, proxy RSS +{rss.growth / MIB:.1f} MiB")
    assert rss.growth < RSS_BUDGET, rss.growth
    assert not up.all_sent.is_set()  # the upstream is held back, not drained into memory

    if closed == "stream window":  # the window opens: every byte arrives
        for sid in sids:
            client.open_window(sid, SIZE)
    client.open_window(None, STREAMS * SIZE)
    await client.flush()
    with trio.fail_after(30):
        await client.wait_until(lambda: all(client.streams[s].ended for s in sids))
    await client.aclose()
    assert [client.streams[s].received for s in sids] == [SIZE] * STREAMS


async def test_h2_websocket_client_not_reading_keeps_proxy_rss_flat(
    h2_proxy: ProxyProcess, nursery: trio.Nursery
) -> None:
    messages, size = 64, MIB
    sent = 0
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal sent
        ws = await request.accept()
        try:
            for _ in range(messages):
                await ws.send_message(b"w" * size)
                sent += 1
            done.set()
            await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass

    server = await nursery.start(partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None))
    port = port_of(h2_proxy.url)
    await _warm_up(port, await RawUpstream().start(nursery))
    with Peak(h2_proxy.proc.pid) as rss:
        client = await H2Client.connect(port, window=0)
        nursery.start_soon(client.pump)
        with trio.fail_after(5):
            await client.remote_settings.wait()  # RFC 8441 CONNECT needs the proxy's settings first
        sid = client.websocket("/ws", [(b"x-upstream-host", f"127.0.0.1:{server.port}".encode())])
        await client.flush()
        with trio.fail_after(5):
            await client.wait_until(lambda: client.streams[sid].status != 0)
        with trio.move_on_after(LOAD):
            await done.wait()
    print(f"websocket: upstream sent {sent} MiB, proxy RSS +{rss.growth / MIB:.1f} MiB")
    assert client.streams[sid].status == 200
    assert rss.growth < RSS_BUDGET, rss.growth
    assert sent < messages

    client.open_window(sid, messages * (size + 16))  # the window opens: every message arrives
    client.open_window(None, messages * (size + 16))
    await client.flush()
    with trio.fail_after(30):
        await client.wait_until(lambda: client.streams[sid].received >= messages * size)
    await client.aclose()
    assert sent == messages
