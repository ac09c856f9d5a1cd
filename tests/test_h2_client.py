"""A raw HTTP/2 client (the ``h2`` library over a trio socket) for the h2 tests; no tests here.

It speaks prior-knowledge h2c to the proxy (hypercorn switches to HTTP/2 when
a connection starts with the client preface), so a test controls every frame:
a zero receive window, a window it never reopens, a stream reset straight after
its HEADERS. ``pump()`` reads the socket and records what the proxy sent;
nothing is acknowledged unless the test asks (``auto_ack``). Also here:
``RawUpstream`` (a fast HTTP/1.1 upstream that counts what it sent), ``Peak``
(a child process's peak RSS) and ``serve_h2_with`` (which h2 classes serve).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import h2.settings
import hypercorn.protocol
import hypercorn.protocol.h2
import pytest
import trio

from tests.fixtures.process import memory
from tests.fixtures.upstreams import serve_raw

Headers = list[tuple[bytes, bytes]]
MAX_WINDOW = 2**31 - 1


def serve_h2_with(monkeypatch: pytest.MonkeyPatch, protocol: type, buffer: type) -> None:
    """Serve new HTTP/2 connections with these hypercorn classes (until the test ends).

    ``running_proxy`` installs every patch as it starts, and hypercorn looks
    both names up per connection: call this inside the ``running_proxy`` block.
    """
    monkeypatch.setattr(hypercorn.protocol, "H2Protocol", protocol)
    monkeypatch.setattr(hypercorn.protocol.h2, "StreamBuffer", buffer)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peak:
    """``with Peak(pid) as rss:`` resets the process's peak RSS; afterwards ``rss.growth`` is peak - start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.peak = 0

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> Peak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.baseline = memory(self.pid)["VmRSS"]
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.peak = memory(self.pid)["VmHWM"]


@dataclass
class StreamRecord:
    status: int = 0
    received: int = 0  # DATA payload bytes
    ended: bool = False
    reset: bool = False


class H2Client:
    """One HTTP/2 connection to ``127.0.0.1:port``; what arrived is in ``streams`` / ``goaway``."""

    def __init__(self, stream: trio.SocketStream, conn: h2.connection.H2Connection, authority: str) -> None:
        self.stream = stream
        self.conn = conn
        self.authority = authority.encode()
        self.streams: defaultdict[int, StreamRecord] = defaultdict(StreamRecord)
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False  # the proxy closed the socket
        self.remote_settings = trio.Event()  # the proxy's SETTINGS arrived
        self.auto_ack = False  # give received DATA back to the flow-control windows
        self._changed = trio.Event()
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, port: int, *, window: int | None = None) -> H2Client:
        """Connect and send the preface; ``window`` is SETTINGS_INITIAL_WINDOW_SIZE for every stream."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        settings = {h2.settings.SettingCodes.ENABLE_PUSH: 0}
        if window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
        conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        conn.initiate_connection()
        client = cls(stream, conn, f"127.0.0.1:{port}")
        await client.flush()
        return client

    async def flush(self) -> None:
        async with self._send_lock:  # the pump answers PINGs/SETTINGS while a test sends
            data = self.conn.data_to_send()
            if data and not self.closed:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.closed = True

    def request_headers(
        self, path: str, extra: Sequence[tuple[bytes, bytes]] = (), method: str = "GET"
    ) -> Headers:
        return [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", self.authority),
            (b":path", path.encode()),
            *extra,
        ]

    def get(self, path: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """Queue a GET (HEADERS with END_STREAM) on a new stream; its id. ``flush()`` sends it."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, self.request_headers(path, extra), end_stream=True)
        self.streams[sid]
        return sid

    def websocket(self, path: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """Queue an RFC 8441 CONNECT for a WebSocket on a new stream; its id."""
        sid = self.conn.get_next_available_stream_id()
        headers = self.request_headers(path, [(b"sec-websocket-version", b"13"), *extra], method="CONNECT")
        headers.insert(1, (b":protocol", b"websocket"))
        self.conn.send_headers(sid, headers)
        self.streams[sid] = StreamRecord()
        return sid

    def open_window(self, sid: int | None, increment: int) -> None:
        """Queue a WINDOW_UPDATE (``sid`` None: the connection)."""
        self.conn.increment_flow_control_window(increment, sid)

    async def pump(self) -> None:
        """Read until the proxy closes the connection, recording every event (run it in a nursery)."""
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.closed = True
                    return
                self._record(self.conn.receive_data(data))
                await self.flush()
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self.closed = True
            self._changed.set()

    def _record(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                for name, value in event.headers or []:
                    if name == b":status":
                        self.streams[event.stream_id].status = int(value)
            elif isinstance(event, h2.events.DataReceived):
                rec = self.streams[event.stream_id]
                rec.received += len(event.data or b"")
                if self.auto_ack and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.streams[event.stream_id].ended = True
            elif isinstance(event, h2.events.StreamReset):
                self.streams[event.stream_id].reset = True
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.remote_settings.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event

    async def wait_until(self, done: object) -> None:
        """Wait (put a ``trio.fail_after`` around it) until ``done()`` is true or the proxy closed."""
        assert callable(done)
        while not done() and not self.closed:
            await self._changed.wait()

    async def aclose(self) -> None:
        self.closed = True
        await self.stream.aclose()


class RawUpstream:
    """An HTTP/1.1 upstream on a raw socket (keep-alive): ``GET /big/N`` streams N bytes fast, else ``ok``.

    ``heads`` counts request heads received (any path), ``sent`` the body bytes
    written for ``/big``; ``all_sent`` is set once ``expect`` body bytes went out.
    """

    def __init__(self, expect: int = 0) -> None:
        self.heads = 0
        self.sent = 0
        self.expect = expect
        self.all_sent = trio.Event()
        self.host = ""

    async def start(self, nursery: trio.Nursery) -> RawUpstream:
        self.host = f"127.0.0.1:{await serve_raw(nursery, self._serve)}"
        return self

    def header(self) -> tuple[bytes, bytes]:
        return (b"x-upstream-host", self.host.encode())

    async def _serve(self, stream: trio.SocketStream) -> None:
        block = b"d" * 65536
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads += 1
                target = head.split(b" ", 2)[1]
                if not target.startswith(b"/big/"):
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                size = int(target[5:])
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                left = size
                while left:
                    chunk = block[: min(left, len(block))]
                    await stream.send_all(chunk)
                    left -= len(chunk)
                    self.sent += len(chunk)
                    if self.expect and self.sent >= self.expect:
                        self.all_sent.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
