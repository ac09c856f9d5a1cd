"""``proxy.wire.write_all``: trio's ``send_all`` without a scheduler pass when the kernel takes it all."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from aws_outbound_jwt_proxy.proxy.wire import write_all


async def _connected_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


async def _read_exactly(stream: trio.SocketStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(1 << 16)
        assert chunk, "stream ended early"
        got += chunk
    return bytes(got)


async def test_a_write_the_kernel_takes_whole_does_not_pass_through_the_scheduler() -> None:
    client, server = await _connected_pair()
    async with client, server:
        # Each round a second task is made ready, then we write. Had write_all passed through
        # the scheduler, the other task would run before we resume in about half the rounds.
        for i in range(20):
            ran = trio.Event()

            async def mark(ran: trio.Event = ran) -> None:
                ran.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(mark)
                await write_all(client, b"round %d\n" % i)
                assert not ran.is_set()
        expected = b"".join(b"round %d\n" % i for i in range(20))
        assert await _read_exactly(server, len(expected)) == expected


async def test_what_the_kernel_does_not_take_is_sent_once_the_peer_reads() -> None:
    client, server = await _connected_pair()
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers hold
    async with client, server, trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def read_all() -> None:
            received.append(await _read_exactly(server, len(payload)))

        nursery.start_soon(read_all)
        with trio.fail_after(30):
            await write_all(client, payload)
    assert received == [payload]


async def test_a_peer_that_reset_the_connection_is_a_broken_stream() -> None:
    client, server = await _connected_pair()
    server.socket.setsockopt(
        trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    await server.aclose()  # linger 0: the peer answers with RST
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(client.socket)  # the RST has arrived
    with pytest.raises(trio.BrokenResourceError):
        await write_all(client, b"x" * 1024)
    await client.aclose()


async def test_a_closed_stream_is_reported_as_trio_does() -> None:
    client, server = await _connected_pair()
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await write_all(client, b"late")
    await server.aclose()


async def test_a_cancelled_task_writes_nothing() -> None:
    client, server = await _connected_pair()
    async with client, server:
        with trio.CancelScope() as scope:
            scope.cancel()
            await write_all(client, b"never")
        assert scope.cancelled_caught
        await client.send_eof()
        assert await server.receive_some(100) == b""


async def test_other_streams_use_their_own_send_all() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await write_all(send, b"through the stream's own send_all")
    assert await receive.receive_some(100) == b"through the stream's own send_all"
