"""The per-connection Link between the server and a request (proxy/link.py).

Pure tests of its two jobs, and over real sockets: a response whose body is in
hand leaves the proxy in one write, head and body together; one whose body is
not (a streamed upstream body) still sends its head at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import trio

from aws_outbound_jwt_proxy.proxy import h1
from aws_outbound_jwt_proxy.proxy.exchange import Exchange
from aws_outbound_jwt_proxy.proxy.link import Link
from aws_outbound_jwt_proxy.server import patches
from tests.fixtures.proxy import FixedTokens, proxy_settings, running_proxy
from tests.fixtures.upstreams import read_request_head, serve_raw

HTTP = ("--upstream-scheme", "http")
Writes = list[tuple[int, bytes]]


def test_a_held_head_goes_out_with_the_next_write() -> None:
    link = Link()
    assert link.write(b"plain") == b"plain"
    link.hold_next_write()
    assert link.write(b"HEAD") == b""
    assert link.write(b"body") == b"HEADbody"
    assert link.write(b"more") == b"more"


def test_a_held_head_is_not_lost_when_only_the_empty_end_follows() -> None:
    link = Link()
    link.hold_next_write()
    assert link.write(b"HEAD") == b""
    assert link.write(b"") == b"HEAD"


async def test_left_cancels_unfinished_requests_only() -> None:
    link = Link()
    open_, done = trio.CancelScope(), trio.CancelScope()
    ex_open, ex_done = Exchange("GET", "/a", 0.0), Exchange("GET", "/b", 0.0)
    ex_done.complete = True
    link.add(open_, ex_open)
    link.add(done, ex_done)
    link.left()
    assert open_.cancel_called and ex_open.client_gone
    assert not done.cancel_called and not ex_done.client_gone


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Writes]:
    """Every write to a TCP socket in this process: (its local port, the bytes), in order.

    The server and the upstream transport write through ``write_all``, everything else
    through trio's ``send_all``. Both are replaced by one recorder that sends with trio's
    own ``send_all``: each write is recorded once, whichever way it came.
    """
    seen: Writes = []
    original = trio.SocketStream.send_all

    async def recording(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
        assert isinstance(stream, trio.SocketStream)
        seen.append((stream.socket.getsockname()[1], bytes(data)))
        await original(stream, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    monkeypatch.setattr(patches, "write_all", recording)
    monkeypatch.setattr(h1, "write_all", recording)
    yield seen


async def _exchange(url: str, request: bytes, until: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    async with stream:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(5):
            while until not in answer:
                answer += await stream.receive_some(65536)
    return answer


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_response_in_hand_is_one_write(nursery: trio.Nursery, writes: Writes) -> None:
    async def whole(stream: trio.SocketStream) -> None:
        with contextlib.suppress(EOFError):  # until the proxy closes its pooled connection
            while True:
                await read_request_head(stream)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    upstream = await serve_raw(nursery, whole)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        request = f"GET /one HTTP/1.1\r\nHost: x\r\nX-Upstream-Host: 127.0.0.1:{upstream}\r\n\r\n".encode()
        answer = await _exchange(url, request, b"hello")
        ours = [data for port, data in writes if port == _port(url)]
    assert answer.startswith(b"HTTP/1.1 200")
    assert ours == [answer]


async def test_the_proxys_own_answer_is_one_write(writes: Writes) -> None:
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        answer = await _exchange(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"X-Upstream-Host")
        ours = [data for port, data in writes if port == _port(url)]
    assert answer.startswith(b"HTTP/1.1 400")
    assert ours == [answer]


async def test_a_head_whose_body_is_not_in_hand_goes_out_at_once(
    nursery: trio.Nursery, writes: Writes
) -> None:
    go = trio.Event()

    async def head_then_wait(stream: trio.SocketStream) -> None:
        await read_request_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await go.wait()
        await stream.send_all(b"4\r\nlate\r\n0\r\n\r\n")

    port = await serve_raw(nursery, head_then_wait)
    async with running_proxy(proxy_settings(*HTTP), FixedTokens()) as url:
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        async with stream:
            await stream.send_all(
                f"GET / HTTP/1.1\r\nHost: x\r\nX-Upstream-Host: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            head = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)  # before the upstream sends any body
            go.set()
            rest = b""
            with trio.fail_after(5):
                while b"late" not in rest:
                    rest += await stream.receive_some(65536)
        ours = [data for port, data in writes if port == _port(url)]
    assert head.startswith(b"HTTP/1.1 200")
    assert ours[0] == head  # the head alone, then the body
