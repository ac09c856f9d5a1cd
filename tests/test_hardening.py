"""Slow and odd clients: read-header timeout, request-body idle timeout, zone ids, cut responses."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
import trio

from aws_outbound_jwt_proxy.observe.logs import EveryInterval
from aws_outbound_jwt_proxy.proxy.upstream import PerUpstreamLimit
from aws_outbound_jwt_proxy.routing.target import parse_authority
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.process import ProxyFactory, base_env
from tests.fixtures.proxy import AccessLog, FixedTokens, proxy_settings, running_proxy
from tests.fixtures.upstreams import Upstream, serve_raw

HTTP = ("--upstream-scheme", "http")


async def _connect(url: str) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))


async def _closed_within(stream: trio.SocketStream, seconds: float) -> bytes:
    """Everything the proxy sent until it closed the connection (fails after ``seconds``)."""
    out = b""
    with trio.fail_after(seconds):
        while data := await stream.receive_some(65536):
            out += data
    return out


async def test_headers_dribbled_slowly_are_cut_at_the_read_header_timeout() -> None:
    s = proxy_settings(*HTTP, "--read-header-timeout", "500ms")
    async with running_proxy(s, FixedTokens()) as url:
        stream = await _connect(url)
        async with stream:
            started = trio.current_time()
            for chunk in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n"):
                await stream.send_all(chunk)  # a byte now and then never resets the timer
                with trio.move_on_after(0.2):
                    if await stream.receive_some(1) == b"":
                        break
            await _closed_within(stream, 5)
            assert trio.current_time() - started < 2.0


async def test_idle_keep_alive_connection_is_closed_after_the_read_header_timeout(upstream: Upstream) -> None:
    s = proxy_settings(*HTTP, "--read-header-timeout", "300ms")
    async with running_proxy(s, FixedTokens()) as url:
        stream = await _connect(url)
        async with stream:
            await stream.send_all(
                f"GET /ka HTTP/1.1\r\nHost: x\r\nX-Upstream-Host: {upstream.host}\r\n\r\n".encode()
            )
            answer = await _closed_within(stream, 5)  # the response, then the close
    assert answer.startswith(b"HTTP/1.1 200")


async def _response(stream: trio.SocketStream) -> bytes:
    """The head of one whole response (its body sized by Content-Length, or chunked)."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += await stream.receive_some(65536)
        else:
            while not body.endswith(b"0\r\n\r\n"):
                body += await stream.receive_some(65536)
    return head


async def test_the_keep_alive_timer_restarts_after_every_response(upstream: Upstream) -> None:
    s = proxy_settings(*HTTP, "--read-header-timeout", "400ms")
    request = f"GET /ka HTTP/1.1\r\nHost: x\r\nX-Upstream-Host: {upstream.host}\r\n\r\n".encode()
    async with running_proxy(s, FixedTokens()) as url:
        stream = await _connect(url)
        async with stream:
            started = trio.current_time()
            for _ in range(4):  # idle 250 ms each time: 1 s in all, well past one timeout
                await stream.send_all(request)
                assert (await _response(stream)).startswith(b"HTTP/1.1 200")
                await trio.sleep(0.25)
            assert trio.current_time() - started > 1.0
            last = trio.current_time()
            assert await _closed_within(stream, 5) == b""
            assert trio.current_time() - last < 2.0


async def test_stalled_upload_gets_408_and_frees_the_upstream(
    upstream: Upstream, access_log: AccessLog
) -> None:
    s = proxy_settings(*HTTP, "--request-body-timeout", "300ms")
    async with running_proxy(s, FixedTokens()) as url:
        stream = await _connect(url)
        async with stream:
            route = f"X-Upstream-Host: {upstream.host}\r\n"
            head = f"POST /slow HTTP/1.1\r\nHost: x\r\n{route}Content-Length: 100\r\n\r\n"
            await stream.send_all(head.encode() + b"0123456789")  # then nothing
            answer = b""
            with trio.fail_after(5):
                while b"request body timeout" not in answer:
                    answer += await stream.receive_some(65536)
        records = await access_log.wait_for(1)
    assert answer.startswith(b"HTTP/1.1 408")
    assert records[0].__dict__["status"] == 408
    # the upstream call was aborted: whatever reached the upstream is short of the body
    assert all(r["body_size"] < 100 for r in upstream.state.requests)


@pytest.mark.parametrize("value", ["[fe80::1%eth0]", "[fe80::1%25eth0]:443", "[::1%lo]"])
def test_ipv6_zone_ids_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="zone"):
        parse_authority("https", value)


async def test_a_response_cut_by_the_upstream_is_logged_incomplete(access_log: AccessLog) -> None:
    async def cut(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await serve_raw(nursery, cut)
        async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
            stream = await _connect(url)
            async with stream:
                await stream.send_all(
                    f"GET /c HTTP/1.1\r\nHost: x\r\nX-Upstream-Host: 127.0.0.1:{port}\r\n\r\n".encode()
                )
                await _closed_within(stream, 5)
            records = await access_log.wait_for(1)
        nursery.cancel_scope.cancel()
    assert records[0].__dict__["status"] == 200 and records[0].__dict__["complete"] is False


def test_sigterm_does_not_wait_for_an_idle_keep_alive_connection(
    proxy_process: ProxyFactory, sts_emulator: StsEmulator
) -> None:
    # One request, then the connection stays open and idle; shutdown must close it at once
    # instead of waiting the whole --shutdown-timeout.
    env = sts_emulator.subprocess_env(base_env())
    proc = proxy_process(
        [*HTTP, "--shutdown-timeout", "8s", "--read-header-timeout", "60s", "--upstream-host", "127.0.0.1:9"],
        env,
    )
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")  # 502: nothing on port 9; keep-alive
        started = time.monotonic()
        status = proc.stop()
        elapsed = time.monotonic() - started
    assert status == 0
    assert elapsed < 4.0, elapsed


def _get(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(url + "/loop", headers=headers, timeout=10)


def test_requests_aimed_at_our_own_listeners_are_refused_in_every_spelling(
    proxy_process: ProxyFactory, sts_emulator: StsEmulator
) -> None:
    env = sts_emulator.subprocess_env(base_env())
    proc = proxy_process([*HTTP, "--listen-addr", "0.0.0.0:0"], env)
    port = int(proc.url.rsplit(":", 1)[1])
    metrics_port = int(proc.metrics_url.rsplit(":", 1)[1])
    url = f"http://127.0.0.1:{port}"
    for host in ("127.1", "2130706433", "localhost", "[::ffff:127.0.0.1]", "127.0.0.2"):
        r = _get(url, {"X-Upstream-Host": f"{host}:{port}"})
        assert r.status_code == 508 and "loop" in r.text, host
    r = _get(url, {"X-Upstream-Host": f"127.0.0.1:{metrics_port}"})
    assert r.status_code == 403 and "metrics" not in r.text
    assert proc.proc.poll() is None  # and it did not forward to itself until fds ran out


def test_a_loop_through_another_proxy_is_caught_by_the_via_marker(
    proxy_process: ProxyFactory, sts_emulator: StsEmulator
) -> None:
    env = sts_emulator.subprocess_env(base_env())
    a = proxy_process([*HTTP], env)
    a_host = a.url.removeprefix("http://")
    b = proxy_process([*HTTP, "--upstream-host", a_host], env)  # B always forwards to A
    r = _get(a.url, {"X-Upstream-Host": b.url.removeprefix("http://")})  # A -> B -> A
    assert r.status_code == 508
    assert a.wait_for(lambda rec: rec.get("msg") == "request loop: our Via marker came back")


def test_repeated_accept_errors_are_one_line_per_interval_with_a_count() -> None:
    now = [0.0]
    limit = EveryInterval(interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("test.accept")
    logger.propagate = False
    logger.addFilter(limit)
    kept: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = kept.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    for i in range(250):  # 25 s of trio's 100 ms retries
        now[0] = i * 0.1
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.error("accept returned EMFILE", exc_info=True)
    assert len(kept) == 3  # at 0 s, 10 s and 20 s
    assert [r.__dict__["repeated"] for r in kept] == [0, 99, 99]
    assert all(r.exc_info is None for r in kept)


async def test_one_slow_upstream_cannot_take_every_upstream_connection(upstream: Upstream) -> None:
    release = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:  # answers headers, then holds the body open
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await release.wait()
        await stream.send_all(b"done")

    async with trio.open_nursery() as nursery:
        slow_port = await serve_raw(nursery, slow)
        transport = PerUpstreamLimit(httpx.AsyncHTTPTransport(), limit=2)
        async with httpx.AsyncClient(transport=transport) as client:
            held = [
                await client.send(client.build_request("GET", f"http://127.0.0.1:{slow_port}/"), stream=True)
                for _ in range(2)
            ]
            with trio.move_on_after(0.5) as waited:  # a third request to the slow upstream waits
                await client.get(f"http://127.0.0.1:{slow_port}/")
            assert waited.cancelled_caught
            with trio.fail_after(5):  # another upstream is not held up
                other = await client.get(upstream.url + "/free")
            assert other.status_code == 200
            release.set()
            for response in held:
                await response.aread()
                await response.aclose()
            with trio.fail_after(5):  # slots are back once the bodies are closed
                again = await client.get(f"http://127.0.0.1:{slow_port}/")
            assert again.content == b"done"
        nursery.cancel_scope.cancel()
