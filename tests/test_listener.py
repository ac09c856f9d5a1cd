"""``server.listener``: a burst of connections is accepted in one scheduler pass, and nothing leaks."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import hypercorn.trio.run
import pytest
import trio

from aws_outbound_jwt_proxy.server import listener as listener_module
from aws_outbound_jwt_proxy.server import patches
from aws_outbound_jwt_proxy.server.listener import ACCEPT_BURST, BacklogListener


def _listening() -> tuple[BacklogListener, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return BacklogListener(trio.socket.from_stdlib_socket(sock)), sock.getsockname()[1]


@contextlib.contextmanager
def _clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """Clients whose connections wait in the kernel's backlog (connect completes without accept)."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


async def test_connections_waiting_together_are_accepted_without_passing_through_the_scheduler() -> None:
    listener, port = _listening()
    with _clients(port, 10) as clients:
        async with listener:
            streams = [await listener.accept()]  # waits for the first, as trio's listener does
            # The other nine were taken with it: handing them out lets no other task run first.
            ran = trio.Event()

            async def mark() -> None:
                ran.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(mark)
                for _ in range(9):
                    streams.append(await listener.accept())
                assert not ran.is_set()
            for i, client in enumerate(clients):
                client.sendall(b"client %d" % i)
            got = {await s.receive_some(100) for s in streams}
            assert got == {b"client %d" % i for i in range(10)}
            for s in streams:
                await s.aclose()


async def test_one_pass_takes_at_most_the_burst() -> None:
    listener, port = _listening()
    with _clients(port, ACCEPT_BURST + 5):
        async with listener:
            first = await listener.accept()
            assert len(listener._taken) == ACCEPT_BURST - 1
            streams = [first] + [await listener.accept() for _ in range(ACCEPT_BURST + 4)]
            assert len({s.socket.getpeername() for s in streams}) == ACCEPT_BURST + 5
            for s in streams:
                await s.aclose()


async def test_connections_taken_but_not_handed_out_are_closed_with_the_listener() -> None:
    listener, port = _listening()
    with _clients(port, 3) as clients:
        async with listener:
            first = await listener.accept()
        await first.aclose()
        for client in clients:  # every client sees its connection end, none is left open
            assert client.recv(10) == b""


async def test_a_cancelled_accept_keeps_the_connection_for_the_next_call() -> None:
    listener, port = _listening()
    with _clients(port, 2) as clients:
        async with listener:
            first = await listener.accept()
            with trio.CancelScope() as scope:
                scope.cancel()
                await listener.accept()
            assert scope.cancelled_caught
            second = await listener.accept()
            assert {first.socket.getpeername(), second.socket.getpeername()} == {
                c.getsockname() for c in clients
            }
            await first.aclose()
            await second.aclose()


async def test_a_closed_listener_raises_what_trio_raises() -> None:
    listener, _ = _listening()
    await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


def test_the_hypercorn_command_keeps_trios_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under `hypercorn -w N` the workers share one socket: one connection per pass spreads them.
    monkeypatch.setattr(hypercorn.trio.run, "trio", trio)
    patches.install()  # what the asgi module does
    assert hypercorn.trio.run.trio is trio  # type: ignore[attr-defined]


def test_install_makes_hypercorn_listen_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.trio.run, "trio", trio)
    listener_module.install()
    listener_module.install()
    seen = hypercorn.trio.run.trio  # type: ignore[attr-defined]
    assert seen.SocketListener is BacklogListener
    assert seen.serve_listeners is trio.serve_listeners  # everything else is trio's own
    assert seen.SSLListener is trio.SSLListener
