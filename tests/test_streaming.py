"""Streaming both ways: SSE chunk by chunk, client disconnect cancels the upstream, flat memory for 1 GB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import httpx
import pytest
import trio

from tests.fixtures.emulator import StsEmulator
from tests.fixtures.process import ProxyFactory, ProxyProcess, base_env, memory
from tests.fixtures.proxy import AccessLog, FixedTokens, proxy_settings, running_proxy
from tests.fixtures.upstreams import Silent, Upstream, read_request_head, serve_raw

HTTP = ("--upstream-scheme", "http")
GIB = 1 << 30
MIB = 1 << 20
RSS_BUDGET = 32 * MIB
PAUSE = 2.0  # seconds one side stops reading while the other keeps pushing (load shape, not sync)


async def test_sse_reaches_client_event_by_event(upstream: Upstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url, httpx.AsyncClient() as client:
        async with client.stream("GET", url + "/sse", headers={"X-Upstream-Host": upstream.host}) as r:
            assert r.headers["content-type"] == "text/event-stream"
            chunks = r.aiter_raw()
            with trio.fail_after(5):
                first = await chunks.__anext__()
            assert first == b"data: one\n\n"
            assert not upstream.state.sse_go.is_set()  # the second event has not been sent yet
            upstream.state.sse_go.set()
            rest = b"".join([c async for c in chunks])
    assert rest == b"data: two\n\n"


async def test_client_disconnect_cancels_upstream_call(upstream: Upstream, access_log: AccessLog) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with httpx.AsyncClient() as client:
            async with client.stream(
                "GET", url + "/endless", headers={"X-Upstream-Host": upstream.host}
            ) as r:
                got = 0
                async for chunk in r.aiter_raw():
                    got += len(chunk)
                    if got > 8192:
                        break
        # the client connection is closed now; the proxy must close its upstream connection
        with trio.fail_after(5):
            await upstream.state.endless_closed.wait()
        with trio.fail_after(5):
            rec = (await access_log.wait_for(1))[0]
    assert rec.__dict__["path"] == "/endless" and rec.__dict__["status"] == 200


async def test_client_disconnect_during_upload_closes_upstream(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    reading = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some(65536):
                reading.set()
        finally:
            closed.set()

    port = await serve_raw(nursery, upstream)

    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        host, pport = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(pport))
        head = (
            "POST /up HTTP/1.1\r\nHost: p\r\n"
            f"X-Upstream-Host: 127.0.0.1:{port}\r\nContent-Length: 100000000\r\n\r\n"
        )
        await stream.send_all(head.encode() + b"x" * 100_000)
        with trio.fail_after(5):
            await reading.wait()
        await stream.aclose()
        with trio.fail_after(5):
            await closed.wait()


# ---- 1 GB through a proxy in a child process, peak RSS sampled from /proc ----------------------


@pytest.fixture
def real_proxy(proxy_process: ProxyFactory, sts_emulator: StsEmulator) -> ProxyProcess:
    """The real proxy process (tokens from the STS emulator), for RSS measurements."""
    env = sts_emulator.subprocess_env(base_env())
    return proxy_process([*HTTP, "--metrics-enabled", "false"], env)


@asynccontextmanager
async def _measured(proxy: ProxyProcess, upstream_host: str) -> AsyncIterator[dict[str, int]]:
    """Warm the proxy up, reset its peak RSS, yield; afterwards the dict holds the numbers."""
    url, pid = proxy.url, proxy.proc.pid
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            await client.post(url + "/warm", headers={"X-Upstream-Host": upstream_host}, content=b"w" * MIB)
    with open(f"/proc/{pid}/clear_refs", "w") as f:  # noqa: ASYNC230 (procfs write, instant)
        f.write("5")  # reset VmHWM to the current RSS
    numbers = {"baseline": memory(pid)["VmRSS"]}
    start = trio.current_time()
    yield numbers
    numbers["seconds"] = int(trio.current_time() - start)
    numbers["peak"] = memory(pid)["VmHWM"]
    numbers["growth"] = numbers["peak"] - numbers["baseline"]
    print(
        f"RSS baseline {numbers['baseline'] / MIB:.1f} MiB, peak {numbers['peak'] / MIB:.1f} MiB, "
        f"growth {numbers['growth'] / MIB:.1f} MiB, {numbers['seconds']} s"
    )


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.slow
async def test_1gb_upload_to_slow_upstream_keeps_rss_flat(
    nursery: trio.Nursery, real_proxy: ProxyProcess
) -> None:
    received: list[int] = []

    async def slow_reader(stream: trio.SocketStream) -> None:
        """Reads requests; on the big one, stops reading for PAUSE s after 32 MB."""
        try:
            while True:
                head, rest = await read_request_head(stream)
                length = _content_length(head)
                got, paused = len(rest), length < 64 * MIB
                while got < length:
                    if not paused and got > 32 * MIB:
                        paused = True
                        await trio.sleep(PAUSE)
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    got += len(data)
                received.append(got)
                body = str(got).encode()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (EOFError, trio.BrokenResourceError):
            return

    port = await serve_raw(nursery, slow_reader)
    host = f"127.0.0.1:{port}"
    block = b"u" * MIB

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(GIB // MIB):
            yield block

    url = real_proxy.url
    async with _measured(real_proxy, host) as numbers, httpx.AsyncClient(timeout=120) as client:
        r = await client.post(
            url + "/upload",
            headers={"X-Upstream-Host": host, "Content-Length": str(GIB)},
            content=upload(),
        )
    assert r.status_code == 200 and r.text == str(GIB)
    assert received[-1] == GIB
    assert numbers["growth"] < RSS_BUDGET, numbers


@pytest.mark.slow
async def test_1gb_download_to_slow_client_keeps_rss_flat(
    nursery: trio.Nursery, real_proxy: ProxyProcess
) -> None:
    block = b"d" * MIB

    async def big_sender(stream: trio.SocketStream) -> None:
        try:
            while True:
                head, _ = await read_request_head(stream)
                if b" /big " not in head.split(b"\r\n")[0]:
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
                for _ in range(GIB // MIB):
                    await stream.send_all(block)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    port = await serve_raw(nursery, big_sender)
    host = f"127.0.0.1:{port}"
    url = real_proxy.url
    async with _measured(real_proxy, host) as numbers, httpx.AsyncClient(timeout=120) as client:
        got, paused = 0, False
        async with client.stream("GET", url + "/big", headers={"X-Upstream-Host": host}) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(GIB)
            async for chunk in r.aiter_raw():
                got += len(chunk)
                if not paused and got > 32 * MIB:
                    paused = True
                    await trio.sleep(PAUSE)  # the client stops reading; the upstream keeps sending
    assert got == GIB
    assert numbers["growth"] < RSS_BUDGET, numbers


async def test_client_leaving_while_waiting_for_headers_closes_upstream(
    silent_upstream: Silent, access_log: AccessLog
) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"GET /wait HTTP/1.1\r\nHost: p\r\nX-Upstream-Host: {silent_upstream.host}\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            await silent_upstream.connected.wait()
        await stream.aclose()
        with trio.fail_after(5):
            await silent_upstream.closed.wait()
            rec = (await access_log.wait_for(1))[0]
    assert rec.__dict__["status"] == 499 and rec.__dict__["target"] == silent_upstream.host


async def test_h2_stream_reset_while_waiting_for_headers_closes_upstream(
    silent_upstream: Silent, access_log: AccessLog
) -> None:
    # On HTTP/2 the connection stays: only the stream's reset says the client gave up on it.
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            request = [(":method", "GET"), (":scheme", "http"), (":authority", "p"), (":path", "/wait")]
            conn.send_headers(1, [*request, ("x-upstream-host", silent_upstream.host)], end_stream=True)
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(5):
                await silent_upstream.connected.wait()
            conn.reset_stream(1)
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(5):
                await silent_upstream.closed.wait()
                rec = (await access_log.wait_for(1))[0]
    assert rec.__dict__["status"] == 499 and rec.__dict__["target"] == silent_upstream.host
