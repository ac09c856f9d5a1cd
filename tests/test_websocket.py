"""WebSocket proxying end to end: client (trio-websocket) → proxy → real websocket upstream."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest
import trio
import trio_websocket

from tests.fixtures.emulator import StsEmulator
from tests.fixtures.process import ProxyFactory, base_env
from tests.fixtures.proxy import (
    FAKE_JWT,
    AccessLog,
    FailingTokens,
    FixedTokens,
    proxy_settings,
    running_proxy,
)
from tests.fixtures.upstreams import WsUpstream, refused_port

HTTP = ("--upstream-scheme", "http")


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


async def test_text_binary_subprotocol_and_bearer_on_handshake(
    ws_upstream: WsUpstream, access_log: AccessLog
) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with trio_websocket.open_websocket_url(
            ws_url(url, "/chat%2Froom?x=1&x=2"),
            subprotocols=["v2.chat", "v1.chat"],
            extra_headers=[
                (b"x-upstream-host", ws_upstream.host.encode()),
                (b"authorization", b"Basic aW5ib3VuZA=="),
                (b"x-app", b"yes"),
            ],
        ) as ws:
            assert ws.subprotocol == "v2.chat"
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01binary\xff")
            assert await ws.get_message() == b"\x00\x01binary\xff"
            await ws.send_message(b"")
            assert await ws.get_message() == b""
    headers = {n.lower(): v for n, v in ws_upstream.headers}
    assert headers["authorization"] == f"Bearer {FAKE_JWT}"
    assert ws_upstream.path == "/chat%2Froom?x=1&x=2"
    assert headers["x-app"] == "yes" and headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-upstream-host" not in headers
    assert [v for n, v in ws_upstream.headers if n.lower() == "authorization"] == [f"Bearer {FAKE_JWT}"]
    with trio.fail_after(5):
        rec = (await access_log.wait_for(1))[0]
    assert rec.__dict__["status"] == 101 and rec.__dict__["path"] == "/chat%2Froom"


async def test_upstream_close_code_reaches_client(ws_upstream: WsUpstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with trio_websocket.open_websocket_url(
            ws_url(url, "/"), extra_headers=[(b"x-upstream-host", ws_upstream.host.encode())]
        ) as ws:
            await ws.send_message("close:4001")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed, trio.fail_after(5):
                await ws.get_message()
    assert closed.value.reason.code == 4001 and closed.value.reason.reason == "bye"


async def test_client_close_is_a_clean_close_upstream(ws_upstream: WsUpstream) -> None:
    # hypercorn does not hand the client's close code to the app (it reports 1006 for any
    # client-initiated close), so the best the proxy can relay is a clean 1000, not an abnormal drop.
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        async with trio_websocket.open_websocket_url(
            ws_url(url, "/"), extra_headers=[(b"x-upstream-host", ws_upstream.host.encode())]
        ) as ws:
            await ws.send_message("ping")
            assert await ws.get_message() == "ping"
            await ws.aclose(4002, "done")
        with trio.fail_after(5):
            await ws_upstream.closed.wait()
    assert ws_upstream.close_codes == [1000]


async def _rejected(url: str, headers: list[tuple[bytes, bytes]]) -> trio_websocket.ConnectionRejected:
    with pytest.raises(trio_websocket.ConnectionRejected) as rej, trio.fail_after(10):
        async with trio_websocket.open_websocket_url(ws_url(url, "/"), extra_headers=headers):
            pass
    return rej.value


async def test_routing_and_token_rules_apply_to_handshake(ws_upstream: WsUpstream) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        rej = await _rejected(url, [])
        assert rej.status_code == 400 and b"X-Upstream-Host" in (rej.body or b"")
        rej = await _rejected(url, [(b"x-upstream-host", b"user@host")])
        assert rej.status_code == 400
    settings = proxy_settings(*HTTP, "--allowed-upstream-hosts", "other.example")
    async with running_proxy(settings, FixedTokens()) as url:
        rej = await _rejected(url, [(b"x-upstream-host", ws_upstream.host.encode())])
        assert rej.status_code == 403 and rej.body == b"upstream not allowed\n"
    tokens = FailingTokens("AccessDenied")
    async with running_proxy(proxy_settings(*HTTP), tokens) as url:
        rej = await _rejected(url, [(b"x-upstream-host", ws_upstream.host.encode())])
        assert rej.status_code == 502 and rej.body == b"token unavailable\n"
    assert tokens.asked == [("http://127.0.0.1",)]
    assert ws_upstream.headers == []


async def test_upstream_unreachable_rejects_handshake_with_502(caplog: pytest.LogCaptureFixture) -> None:
    port = refused_port()
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        rej = await _rejected(url, [(b"x-upstream-host", f"127.0.0.1:{port}".encode())])
    assert rej.status_code == 502 and rej.body == b"upstream unavailable\n"
    errors = [
        r for r in caplog.records if r.name == "aws_outbound_jwt_proxy.forward" and r.levelno == logging.ERROR
    ]
    assert errors and errors[0].__dict__["target"] == f"127.0.0.1:{port}"


async def test_wss_upstream_verified_with_ca_file(wss_upstream: WsUpstream) -> None:
    settings = proxy_settings("--upstream-scheme", "https", "--upstream-ca-file", wss_upstream.ca_file)
    async with running_proxy(settings, FixedTokens()) as url:
        async with trio_websocket.open_websocket_url(
            ws_url(url, "/secure"), extra_headers=[(b"x-upstream-host", wss_upstream.host.encode())]
        ) as ws:
            await ws.send_message("over tls")
            assert await ws.get_message() == "over tls"
    assert ("authorization", f"Bearer {FAKE_JWT}") in [(n.lower(), v) for n, v in wss_upstream.headers]


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
FRAME = b"\x81\x85abcdabcde"  # a masked text frame "hello"-sized, sent before any 101


def _refused_handshake_with_client_bytes(port: int, attempt: int) -> bytes:
    """One rejected upgrade with client bytes around the rejection; the status line that came back."""
    route = b"X-Upstream-Host: other.example\r\n" if attempt % 2 else b""
    request = HANDSHAKE + route + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if attempt % 3 == 0:  # the review's repro: frame right after the response started
            s.sendall(request)
            first = s.recv(4096)
            s.sendall(FRAME)
        elif attempt % 3 == 1:  # frame pipelined with the handshake
            s.sendall(request + FRAME)
            first = s.recv(4096)
        else:  # frames while the proxy decides
            s.sendall(request)
            s.sendall(FRAME * 20)
            first = s.recv(4096)
    return first.split(b"\r\n", 1)[0]


def test_client_bytes_during_refused_upgrade_never_kill_the_process(
    proxy_process: ProxyFactory, sts_emulator: StsEmulator
) -> None:
    # hypercorn answered client bytes that arrived while a refusal was being written with a second
    # response; h11 raised in the connection's reader task and the whole process exited.
    env = sts_emulator.subprocess_env(base_env())
    proc = proxy_process(["--upstream-scheme", "http", "--allowed-upstream-hosts", "allowed.example"], env)
    port = int(proc.url.rsplit(":", 1)[1])
    statuses = {_refused_handshake_with_client_bytes(port, i) for i in range(24)}
    assert statuses <= {b"HTTP/1.1 400 ", b"HTTP/1.1 403 "} and b"HTTP/1.1 403 " in statuses
    resp = httpx.get(proc.url + "/after", timeout=10)
    assert resp.status_code == 400 and "X-Upstream-Host" in resp.text
    assert proc.proc.poll() is None
    assert "Traceback" not in proc.stderr()


async def test_early_client_bytes_still_end_the_session_upstream(
    ws_upstream: WsUpstream, access_log: AccessLog
) -> None:
    # Bytes before the 101 get hypercorn's own 400; the session must still end (and close upstream)
    # rather than wait forever for a client that hypercorn no longer reports on.
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            route = f"X-Upstream-Host: {ws_upstream.host}\r\n".encode()
            await stream.send_all(HANDSHAKE + route + b"\r\n" + FRAME)
            with trio.fail_after(10):
                first = await stream.receive_some(4096)
                await ws_upstream.closed.wait()
    assert first.startswith(b"HTTP/1.1 400 ")
    assert ws_upstream.close_codes == [1000]
    (record,) = await access_log.wait_for(1)
    assert record.__dict__["status"] == 400  # what the client saw, not the 101 the session sent
