"""The direct upstream transport (proxy/h1.py) over real sockets: framing, keep-alive, limits, fallbacks.

Each test drives :class:`DirectTransport` through an httpx client against a raw
upstream on loopback that counts its connections and says exactly what it
writes, or against the fixtures' hypercorn upstreams (TLS with ALPN h2).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from aws_outbound_jwt_proxy.proxy.h1 import DirectTransport
from aws_outbound_jwt_proxy.routing.guard import Guard
from tests.fixtures.upstreams import Upstream, make_tls, read_request_head, serve_raw

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


Answer = Callable[[bytes, bytes], bytes | None]


class Raw:
    """A raw upstream: ``answer(head, rest)`` returns the bytes to write (None: close)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        while True:
            try:
                head, rest = await read_request_head(stream)
            except (EOFError, trio.BrokenResourceError):
                return
            rest = await _read_body(stream, head, rest)
            self.heads.append(head)
            self.bodies.append(rest)
            reply = self.answer(head, rest)
            if reply is None:
                await stream.aclose()
                return
            await stream.send_all(reply)


async def _read_body(stream: trio.SocketStream, head: bytes, rest: bytes) -> bytes:
    """The raw body bytes after the head: Content-Length bytes, or chunks up to the last one."""
    lower = head.lower()
    if b"content-length:" in lower:
        size = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < size:
            rest += await stream.receive_some(65536)
    elif b"transfer-encoding: chunked" in lower:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += await stream.receive_some(65536)
    return rest


@asynccontextmanager
async def client(
    fallback: httpx.AsyncBaseTransport | None = None,
    tls: ssl.SSLContext | None = None,
    **limits: int,
) -> AsyncIterator[tuple[httpx.AsyncClient, DirectTransport]]:
    options = {"max_connections": 16, "max_idle": 8, "max_per_upstream": 8} | limits
    transport = DirectTransport(
        tls or ssl.create_default_context(),
        Guard(()),
        fallback or httpx.AsyncHTTPTransport(),
        keepalive_expiry=60.0,
        **options,
    )
    async with httpx.AsyncClient(transport=transport) as c:
        yield c, transport


async def raw_upstream(
    nursery: trio.Nursery, answer: Callable[[bytes, bytes], bytes | None]
) -> tuple[Raw, str]:
    raw = Raw(answer)
    port = await serve_raw(nursery, raw.handler)
    return raw, f"http://127.0.0.1:{port}"


async def test_keep_alive_reuses_one_connection(nursery: trio.Nursery) -> None:
    raw, url = await raw_upstream(nursery, lambda head, body: OK)
    async with client() as (c, _):
        bodies = [(await c.get(f"{url}/{i}")).content for i in range(5)]
    assert bodies == [b"hello"] * 5
    assert raw.connections == 1


async def test_connection_close_and_http_1_0_are_not_reused(nursery: trio.Nursery) -> None:
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            OK,
        ]
    )
    raw, url = await raw_upstream(nursery, lambda head, body: next(answers))
    async with client() as (c, _):
        statuses = [(await c.get(url)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert raw.connections == 3


async def test_chunked_response_is_dechunked_and_the_connection_kept(nursery: trio.Nursery) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    raw, url = await raw_upstream(nursery, lambda head, body: chunked)
    async with client() as (c, _):
        first, second = await c.get(url), await c.get(url)
    assert first.content == second.content == b"abcde"
    assert raw.connections == 1


async def test_body_without_length_ends_with_the_connection(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\nuntil")
        await stream.send_all(b" close")
        await stream.aclose()

    port = await serve_raw(nursery, handler)
    async with client() as (c, transport):
        response = await c.get(f"http://127.0.0.1:{port}/")
        assert response.content == b"until close"
        assert transport._idle_count == 0


async def test_informational_responses_are_skipped(nursery: trio.Nursery) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    _raw, url = await raw_upstream(nursery, lambda head, body: early + OK)
    async with client() as (c, _):
        response = await c.get(url)
    assert (response.status_code, response.content) == (200, b"hello")
    assert "link" not in response.headers


@pytest.mark.parametrize(
    "reply",
    [b"HTTP/1.1 2OO OK\r\n\r\n", b"NOT HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
)
async def test_a_malformed_response_is_a_protocol_error(nursery: trio.Nursery, reply: bytes) -> None:
    _raw, url = await raw_upstream(nursery, lambda head, body: reply)
    async with client() as (c, transport):
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)
        assert transport._open.value == 16  # the connection was closed and its token returned


async def test_a_body_cut_short_is_an_error_and_the_connection_dropped(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await stream.aclose()

    port = await serve_raw(nursery, handler)
    async with client() as (c, transport):
        async with c.stream("GET", f"http://127.0.0.1:{port}/") as response:
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
        assert (transport._idle_count, transport._open.value) == (0, 16)


async def test_request_bodies_are_framed_by_length_or_chunked(nursery: trio.Nursery) -> None:
    raw, url = await raw_upstream(nursery, lambda head, body: OK)

    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"de"

    async with client() as (c, _):
        await c.post(url, content=b"fixed")
        await c.post(url, content=parts())
    assert raw.bodies == [b"fixed", b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"]
    assert b"transfer-encoding: chunked" in raw.heads[1].lower()
    assert raw.connections == 1


@pytest.mark.parametrize("value", ["a\r\nInjected: yes", "a\rb", "a\nb", "a\x00b"])
async def test_a_header_that_would_split_the_head_is_refused_before_sending(
    nursery: trio.Nursery, value: str
) -> None:
    raw, url = await raw_upstream(nursery, lambda head, body: OK)
    async with client() as (c, _):
        with pytest.raises(httpx.LocalProtocolError):
            await c.get(url, headers={"x-evil": value})
        with pytest.raises(httpx.LocalProtocolError):
            await c.get(url, headers={"x-evil\r\nInjected": "yes"})
    assert raw.heads == []


async def test_the_upstream_closing_an_idle_connection_gets_a_new_one(nursery: trio.Nursery) -> None:
    closers: list[trio.SocketStream] = []

    async def closes_after_one(stream: trio.SocketStream) -> None:
        closers.append(stream)
        await read_request_head(stream)
        await stream.send_all(OK)
        await stream.aclose()  # keep-alive promised, then closed while idle

    port = await serve_raw(nursery, closes_after_one)
    async with client() as (c, _):
        first = await c.get(f"http://127.0.0.1:{port}/")
        await trio.testing.wait_all_tasks_blocked()
        second = await c.get(f"http://127.0.0.1:{port}/")
    assert first.content == second.content == b"hello"
    assert len(closers) == 2


async def test_idle_connections_the_upstream_closed_are_swept_without_traffic(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def closes_after_one(stream: trio.SocketStream) -> None:
        await read_request_head(stream)
        await stream.send_all(OK)
        await stream.aclose()
        closed.set()

    port = await serve_raw(nursery, closes_after_one)
    async with client() as (c, transport):
        assert (await c.get(f"http://127.0.0.1:{port}/")).content == b"hello"
        await closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert transport._idle_count == 1  # half-closed, and no request comes to sweep it
        nursery.start_soon(transport.sweep_while_open, 0.01)
        with trio.fail_after(5):
            while transport._idle_count:  # noqa: ASYNC110
                await trio.sleep(0.01)  # polling the pool, bounded by fail_after
        assert transport._open.value == 16  # closed, its slot back


async def test_requests_in_flight_per_upstream_are_capped_until_bodies_close(nursery: trio.Nursery) -> None:
    _raw, url = await raw_upstream(nursery, lambda head, body: OK)
    async with client(max_per_upstream=2) as (c, _):
        first = await c.send(c.build_request("GET", url), stream=True)
        second = await c.send(c.build_request("GET", url), stream=True)
        third_done = trio.Event()

        async def third() -> None:
            await c.get(url)
            third_done.set()

        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert not third_done.is_set()  # both slots are held by open response bodies
        await first.aclose()
        with trio.fail_after(5):
            await third_done.wait()
        await second.aclose()


async def test_idle_connections_beyond_the_cap_are_closed(nursery: trio.Nursery) -> None:
    _raw, url = await raw_upstream(nursery, lambda head, body: OK)
    async with client(max_idle=1) as (c, transport):
        responses = [await c.send(c.build_request("GET", url), stream=True) for _ in range(3)]
        for response in responses:
            await response.aread()
            await response.aclose()
        assert transport._idle_count == 1
        assert transport._open.value == 15  # the other two were closed


async def test_head_goes_through_the_fallback_transport(nursery: trio.Nursery) -> None:
    raw, url = await raw_upstream(nursery, lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    async with client(max_per_upstream=1) as (c, _):
        response = await c.head(url)
        assert (response.status_code, response.headers["content-length"], response.content) == (200, "5", b"")
        with trio.fail_after(5):  # the one slot came back: the next request does not wait for it
            await c.head(url)
    assert raw.heads[0].startswith(b"HEAD / HTTP/1.1")


async def test_an_upstream_that_picks_h2_is_served_by_the_fallback(tls_upstream: Upstream) -> None:
    tls = ssl.create_default_context(cafile=tls_upstream.ca_file)
    fallback = httpx.AsyncHTTPTransport(verify=tls, http2=True)
    async with client(fallback, tls) as (c, transport):
        first, second = await c.get(f"{tls_upstream.url}/a"), await c.get(f"{tls_upstream.url}/b")
        assert first.status_code == second.status_code == 200
        assert len(transport._h2) == 1
    assert [r["http_version"] for r in tls_upstream.state.requests] == ["2", "2"]


async def test_tls_is_verified(tls_upstream: Upstream) -> None:
    async with client(tls=ssl.create_default_context()) as (c, _):  # the test CA is not trusted
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await c.get(tls_upstream.url)


async def test_http_1_1_over_tls_is_served_and_kept(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server_tls.set_alpn_protocols(["http/1.1"])
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        tls_stream = trio.SSLStream(stream, server_tls, server_side=True, https_compatible=True)
        while True:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await tls_stream.receive_some(65536)
                if not data:
                    return
                buf += data
            await tls_stream.send_all(OK)

    port = await serve_raw(nursery, handler)
    async with client(tls=ssl.create_default_context(cafile=ca)) as (c, _):
        bodies = [(await c.get(f"https://127.0.0.1:{port}/")).content for _ in range(3)]
    assert bodies == [b"hello"] * 3
    assert connections == 1
