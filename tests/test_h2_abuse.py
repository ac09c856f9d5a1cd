"""HTTP/2 abuse: rapid reset is cut off; CONTINUATION, HPACK and SETTINGS/PING floods stay harmless.

Rapid reset (CVE-2023-44487): a client opening and resetting streams as fast
as it can gets GOAWAY (ENHANCE_YOUR_CALM) and its connection closed, and a
stream reset in the read that opened it never starts the app. The flood tests
are regression guards for limits the ``h2`` library and TCP backpressure
already enforce: each attack runs against the real proxy process while
another client keeps being served, and the proxy's RSS stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator

import h2.errors
import hpack
import pytest
import trio
import trio.testing
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from aws_outbound_jwt_proxy.server import h2limits
from tests.fixtures.emulator import EmulatorProcess, StsEmulator
from tests.fixtures.process import ProxyProcess, base_env, spawn
from tests.fixtures.proxy import FixedTokens, RecordingObserver, proxy_settings, running_proxy
from tests.test_h2_client import H2Client, Peak, RawUpstream, cpu_seconds, port_of, serve_h2_with

HTTP = ("--upstream-scheme", "http")
MIB = 1 << 20
RSS_BUDGET = 16 * MIB
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RESET_LOG = "HTTP/2 client resets streams too fast: connection closed"


@pytest.fixture(scope="module")
def h2_proxy(sts_emulator_process: EmulatorProcess) -> Iterator[ProxyProcess]:
    """One real proxy process for this module's attacks."""
    emu = StsEmulator(sts_emulator_process.url, sts_emulator_process.issuer)
    proxy = spawn([*HTTP, "--metrics-enabled", "false"], emu.subprocess_env(base_env()))
    yield proxy
    proxy.kill()


async def _open_and_reset(client: H2Client, up: RawUpstream, pairs: int) -> None:
    """Queue ``pairs`` GETs, each followed by its RST_STREAM (CANCEL), and send them in one write."""
    for _ in range(pairs):
        sid = client.get("/reset", [up.header()])
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await client.flush()


async def _get_ok(client: H2Client, up: RawUpstream) -> float:
    """One GET on ``client``; its latency in seconds (fails unless it is a 200)."""
    start = trio.current_time()
    sid = client.get("/ok", [up.header()])
    await client.flush()
    with trio.fail_after(10):
        await client.wait_until(lambda: client.streams[sid].ended)
    assert client.streams[sid].status == 200
    return trio.current_time() - start


async def test_hypercorn_146_reset_flood_goes_unchecked_still_exists(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    # pgjones/hypercorn#146 (rapid reset) was answered with keep_alive_max_requests, which a
    # proxy turns off: hypercorn itself takes any number of resets on one connection.
    up = await RawUpstream().start(nursery)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        serve_h2_with(monkeypatch, h2limits.STOCK_H2_PROTOCOL, h2limits.STOCK_STREAM_BUFFER)
        client = await H2Client.connect(port_of(url))
        nursery.start_soon(client.pump)
        for _ in range(5):  # 500: more than twice the burst the proxy allows
            await _open_and_reset(client, up, 100)
        await _get_ok(client, up)
        await client.aclose()
    assert client.goaway is None


async def test_stream_reset_in_the_read_that_opened_it_never_starts_the_app(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery
) -> None:
    up = await RawUpstream().start(nursery)
    observer = RecordingObserver()
    async with running_proxy(proxy_settings(*HTTP), FixedTokens(), observer=observer) as url:
        serve_h2_with(monkeypatch, h2limits.GuardedH2Protocol, h2limits.FlowControlledStreamBuffer)
        client = await H2Client.connect(port_of(url))
        nursery.start_soon(client.pump)
        await _open_and_reset(client, up, 150)  # within the burst a connection may reset
        await _get_ok(client, up)  # the connection keeps serving
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        await client.aclose()
    assert client.goaway is None
    assert [c["status"] for c in observer.calls] == [200]  # only the GET reached the app ...
    assert up.heads == 1  # ... and the upstream


async def test_rapid_reset_gets_goaway_and_costs_the_proxy_little_cpu(
    h2_proxy: ProxyProcess, nursery: trio.Nursery
) -> None:
    up = await RawUpstream().start(nursery)
    port = port_of(h2_proxy.url)
    victim = await H2Client.connect(port)
    nursery.start_soon(victim.pump)
    await _get_ok(victim, up)  # warm: tokens and upstream pool ready
    attacker = await H2Client.connect(port)
    nursery.start_soon(attacker.pump)
    latencies: list[float] = []
    cpu = cpu_seconds(h2_proxy.proc.pid)
    sent = 0
    with trio.move_on_after(8):
        # CVE-2023-44487's shape, 100 pairs per write, until the proxy says GOAWAY (or closes)
        while sent < 5000 and not attacker.closed and attacker.goaway is None:
            await _open_and_reset(attacker, up, 100)
            sent += 100
            if sent % 500 == 0:
                latencies.append(await _get_ok(victim, up))
    with trio.move_on_after(5):
        await attacker.wait_until(lambda: attacker.goaway is not None)
    cpu = cpu_seconds(h2_proxy.proc.pid) - cpu
    latencies.append(await _get_ok(victim, up))
    print(f"rapid reset: {sent} pairs, proxy CPU {cpu:.2f} s, victim worst {max(latencies) * 1000:.0f} ms")
    assert attacker.goaway is not None
    assert attacker.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert sent <= 1000
    assert cpu < 1.0
    assert h2_proxy.wait_for(lambda r: r.get("msg") == RESET_LOG, timeout=5)["resets"] > h2limits.RESET_BURST
    await victim.aclose()


# ---- floods the h2 library already bounds: regression guards ------------------------------------


class RawAttacker:
    """Writes raw frames and never reads until asked; ``frames()`` parses what the proxy sent."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.broken = False

    @classmethod
    async def connect(cls, port: int) -> RawAttacker:
        attacker = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await attacker.send(PREFACE + SettingsFrame(0).serialize())
        return attacker

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True

    async def frames(self) -> list[Frame]:
        """Everything the proxy sent until it closed (or 5 s of silence), parsed."""
        data = b""
        try:
            while True:
                with trio.fail_after(5):
                    chunk = await self.stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        out = []
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            if len(data) < 9 + length:
                break
            frame.parse_body(memoryview(data[9 : 9 + length]))
            out.append(frame)
            data = data[9 + length :]
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


def _goaway_code(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None


async def _flood(
    h2_proxy: ProxyProcess, nursery: trio.Nursery, frames: bytes, count: int, first: bytes = b""
) -> RawAttacker:
    """Send ``first``, then ``frames`` up to ``count`` times (for at most 3 s), never reading.

    Meanwhile a victim on another connection keeps being served quickly, and
    the proxy's RSS stays flat.
    """
    up = await RawUpstream().start(nursery)
    port = port_of(h2_proxy.url)
    victim = await H2Client.connect(port)
    nursery.start_soon(victim.pump)
    await _get_ok(victim, up)
    latencies: list[float] = []
    with Peak(h2_proxy.proc.pid) as rss:
        attacker = await RawAttacker.connect(port)
        await attacker.send(first)

        async def attack() -> None:
            with trio.move_on_after(3):
                for _ in range(count // 100):
                    await attacker.send(frames * 100)
                    if attacker.broken:
                        return

        async with trio.open_nursery() as inner:
            inner.start_soon(attack)
            for _ in range(5):
                latencies.append(await _get_ok(victim, up))
    print(f"flood: proxy RSS +{rss.growth / MIB:.1f} MiB, victim worst {max(latencies) * 1000:.0f} ms")
    assert rss.growth < RSS_BUDGET, rss.growth
    assert max(latencies) < 2.0, latencies
    await victim.aclose()
    return attacker


async def test_continuation_flood_is_cut_off(h2_proxy: ProxyProcess, nursery: trio.Nursery) -> None:
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", "/")])
    head = HeadersFrame(1, data=block).serialize()  # no END_HEADERS: CONTINUATION frames follow
    cont = ContinuationFrame(1, data=b"\x00" * 16000).serialize()
    attacker = await _flood(h2_proxy, nursery, cont, 2000, first=head)  # 32 MB if nothing stopped it
    frames = await attacker.frames()
    print(f"continuation: broken={attacker.broken} GOAWAY {_goaway_code(frames)}")
    await attacker.aclose()
    assert attacker.broken or _goaway_code(frames) == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_hpack_bomb_is_refused(h2_proxy: ProxyProcess, nursery: trio.Nursery) -> None:
    # One 4 KB header goes into the dynamic table, then a block of 16,000 one-byte references
    # to it: 64 MB of headers once decoded.
    encoder = hpack.Encoder()
    first = encoder.encode(
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            NeverIndexedHeaderTuple(":authority", "x"),
            ("x-bomb", "a" * 4000),
        ]
    )
    bomb = b"\x82\x86\x84" + b"\x01\x01x" + b"\xbe" * 16000  # :authority x, then index 62 (x-bomb)
    attacker = await RawAttacker.connect(port_of(h2_proxy.url))
    with Peak(h2_proxy.proc.pid) as rss:
        await attacker.send(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]).serialize())
        await attacker.send(HeadersFrame(3, data=bomb, flags=["END_HEADERS", "END_STREAM"]).serialize())
        frames = await attacker.frames()
    await attacker.aclose()
    print(f"hpack bomb: GOAWAY {_goaway_code(frames)}, proxy RSS +{rss.growth / MIB:.1f} MiB")
    assert _goaway_code(frames) in (
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
    )
    assert rss.growth < RSS_BUDGET, rss.growth


async def test_settings_flood_from_a_client_not_reading_stays_bounded(
    h2_proxy: ProxyProcess, nursery: trio.Nursery
) -> None:
    attacker = await _flood(h2_proxy, nursery, SettingsFrame(0).serialize(), 200_000)
    assert not attacker.broken  # the proxy stopped reading (backpressure) rather than dropping it
    await attacker.aclose()


async def test_ping_flood_from_a_client_not_reading_stays_bounded(
    h2_proxy: ProxyProcess, nursery: trio.Nursery
) -> None:
    attacker = await _flood(h2_proxy, nursery, PingFrame(0, opaque_data=b"12345678").serialize(), 200_000)
    assert not attacker.broken
    await attacker.aclose()
