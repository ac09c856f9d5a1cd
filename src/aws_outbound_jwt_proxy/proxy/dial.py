"""Opening connections to upstreams: the SSRF guard's dialer and egress-proxy tunnels.

* :func:`checked_addresses` resolves a name once and keeps only the addresses
  the :class:`~..routing.guard.Guard` allows; :func:`open_tcp` connects to
  one of those (never a second lookup, so no DNS-rebinding window).
* :class:`GuardedBackend` puts that dialer under httpcore, so the httpx
  client connects the same way (TLS still verifies and sends SNI for the name).
* :func:`open_tunnel` opens an HTTP ``CONNECT`` tunnel through an egress proxy.
* :func:`open_websocket` is trio-websocket's client over a stream we opened,
  with the ``Host`` header written from the target (IPv6 in brackets).

Raises :class:`~.exchange.DeniedUpstream` when every address is denied, and
``OSError`` (or trio-websocket's errors) otherwise.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit

import httpcore
import trio
import trio_websocket
from httpcore._backends.base import SOCKET_OPTION
from httpcore._backends.trio import TrioBackend, TrioStream

from ..routing.guard import Guard, IPAddress
from ..routing.target import Target
from .exchange import DeniedUpstream, LoopDetected

MAX_TUNNEL_RESPONSE = 16 * 1024


async def checked_addresses(host: str, port: int, guard: Guard) -> list[str]:
    """The addresses ``host`` resolves to that the guard allows (all of them when it is off).

    Raises :class:`~.exchange.LoopDetected` when one of them is our own listener and
    :class:`~.exchange.DeniedUpstream` when the deny list refuses them all.
    """
    if not guard.active:
        return [host]
    infos = await trio.socket.getaddrinfo(host.strip("[]"), port, type=trio.socket.SOCK_STREAM)
    allowed: list[str] = []
    for *_, sockaddr in infos:
        address: IPAddress = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        own = guard.own(address, port)
        if own is not None:
            raise LoopDetected(own)
        text = str(address)
        if not guard.denied(address) and text not in allowed:
            allowed.append(text)
    if not allowed:
        raise DeniedUpstream(host)
    return allowed


_local_cache: dict[IPAddress, bool] = {}


def is_local_address(address: IPAddress) -> bool:
    """Whether ``address`` belongs to this machine: binding a socket to it succeeds. Cached."""
    known = _local_cache.get(address)
    if known is None:
        if address.is_loopback or address.is_unspecified:
            known = True
        else:
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((str(address), 0))
                known = True
            except OSError:
                known = False
        if len(_local_cache) >= 4096:
            _local_cache.clear()
        _local_cache[address] = known
    return known


async def open_tcp(host: str, port: int, guard: Guard) -> trio.SocketStream:
    """A TCP connection to the first allowed address of ``host`` that accepts."""
    error: OSError | None = None
    for address in await checked_addresses(host, port, guard):
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError as exc:
            error = exc
    assert error is not None
    raise error


class GuardedBackend(TrioBackend):
    """httpcore's trio backend, connecting only to addresses the guard allows."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        error: Exception | None = None
        for address in await checked_addresses(host, port, self.guard):
            try:
                return await super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error


class TunnelBackend(TrioBackend):
    """httpcore's trio backend where every "TCP connection" is a CONNECT tunnel through ``proxy``.

    httpx's own proxy support puts the request's ``target`` extension (our byte-exact
    path) on the CONNECT line too; tunnelling below httpcore keeps both right, and
    httpcore then runs TLS to the upstream inside the tunnel as on any connection.
    """

    def __init__(self, proxy: str, proxy_tls: ssl.SSLContext) -> None:
        self.proxy = proxy
        self.proxy_tls = proxy_tls

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        target = Target(scheme="https", host=host, port=port, authority=f"{host}:{port}")
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                return TrioStream(await open_tunnel(self.proxy, target, self.proxy_tls))
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout("egress proxy tunnel timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc


async def open_tunnel(proxy_url: str, target: Target, proxy_tls: ssl.SSLContext) -> trio.abc.Stream:
    """A stream to ``target`` through the egress proxy's ``CONNECT`` (TLS to an https:// proxy)."""
    proxy = urlsplit(proxy_url)
    port = proxy.port or (443 if proxy.scheme == "https" else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(proxy.hostname or "", port)
    try:
        if proxy.scheme == "https":
            tls_stream = trio.SSLStream(stream, proxy_tls, server_hostname=proxy.hostname)
            await tls_stream.do_handshake()
            stream = tls_stream
        authority = f"{target.host}:{target.effective_port}".encode("ascii")
        head = b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n"
        if proxy.username is not None:
            user = unquote(proxy.username) + ":" + unquote(proxy.password or "")
            head += b"Proxy-Authorization: Basic " + base64.b64encode(user.encode("utf-8")) + b"\r\n"
        await stream.send_all(head + b"\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            data = await stream.receive_some(4096)
            if not data or len(response) > MAX_TUNNEL_RESPONSE:
                raise OSError("egress proxy closed the CONNECT tunnel")
            response += data
        status_line = response.split(b"\r\n", 1)[0].split(b" ")
        if len(status_line) < 2 or not status_line[1].startswith(b"2"):
            code = status_line[1].decode("ascii", "replace") if len(status_line) > 1 else "?"
            raise OSError(f"egress proxy refused CONNECT with status {code}")
        return stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _single(exc: BaseException) -> BaseException:
    """The one meaningful exception inside a nursery's group (Cancelled leaves ignored)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(leaves) != 1:
            return exc
        exc = leaves[0]
    return exc


async def open_upstream(
    target: Target, *, guard: Guard, proxy: str | None, tls: ssl.SSLContext
) -> trio.abc.Stream:
    """A stream to ``target``: direct through the guard, or tunnelled through ``proxy``; TLS for https."""
    stream: trio.abc.Stream
    if proxy is not None:
        stream = await open_tunnel(proxy, target, tls)
    else:
        stream = await open_tcp(target.host, target.effective_port, guard)
    if target.scheme != "https":
        return stream
    tls_stream = trio.SSLStream(stream, tls, server_hostname=target.host.strip("[]"), https_compatible=True)
    try:
        await tls_stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls_stream)
        raise
    return tls_stream


@asynccontextmanager
async def open_websocket(
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    host_header: str,
    resource: str,
    *,
    subprotocols: Sequence[str] | None,
    extra_headers: list[tuple[bytes, bytes]],
    message_queue_size: int,
    max_message_size: int,
    connect_timeout: float,
    disconnect_timeout: float,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's client over the stream ``connect`` opens; closes the session on exit.

    Connecting and the handshake together get ``connect_timeout``
    (``trio_websocket.ConnectionTimeout`` after that).
    """
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    stream = await connect()
                    conn = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]  # any trio stream works
                        host_header,
                        resource,
                        subprotocols=subprotocols,
                        extra_headers=extra_headers,
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
            except trio.TooSlowError:
                raise trio_websocket.ConnectionTimeout from None
            try:
                yield conn
            finally:
                with trio.move_on_after(disconnect_timeout) as scope:
                    scope.shield = True
                    await conn.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None
