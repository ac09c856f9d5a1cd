"""HTTP/2 limits hypercorn (0.18) lacks: flow-control backpressure and a stream-reset rate.

Installed by :func:`install`, which ``server.patches.install`` calls; nothing
runs on import.

**Backpressure.** hypercorn queues what the app sends on an HTTP/2 stream in a
``StreamBuffer`` that should make the app wait once two frames are queued. But
when the client's flow-control window (the stream's or the connection's) is 0,
hypercorn's sender takes 0 bytes from the buffer and that empty take counts as
"drained": the app is let go and the buffer grows by whatever the upstream
sends. A client that opens a zero window (or simply stops reading) makes the
proxy hold whole downloads and WebSocket streams in memory (hundreds of MB per
connection, measured). No upstream issue found for this in pgjones/hypercorn
(searched its tracker for HTTP/2 flow control / window / memory);
``tests/test_h2_backpressure.py`` has the ``*_still_exists`` test that fails
once hypercorn fixes it. :class:`FlowControlledStreamBuffer` lets the app go
only when bytes actually left for the client, and :class:`GuardedH2Protocol`
caps what one connection may have queued across all its streams. The app's
send then waits, so the upstream read stops and TCP holds the upstream back.
Streams whose window the client keeps closed count against that client's own
cap: one that stalls more than about 20 of its streams slows its other streams
on that connection, and nobody else's.

**Stream resets.** Each HTTP/2 stream starts an app task; a client that opens
and resets streams as fast as it can (CVE-2023-44487, "rapid reset") costs the
proxy CPU for every one while its own cost is a few bytes.
pgjones/hypercorn#146 was settled by ``keep_alive_max_requests``, which a
proxy turns off (a long-lived connection must not be cut after 1,000
requests). :class:`GuardedH2Protocol` allows a burst of resets and a
sustained rate per connection; past that it sends GOAWAY (ENHANCE_YOUR_CALM)
and closes the connection (``tests/test_h2_abuse.py`` has the
``*_still_exists`` test for hypercorn's side). A stream reset in the same read
that opened it never starts the app: no task, no upstream call, no access-log
line. A reset arriving later reaches the app as ``http.disconnect``, as before.

CONTINUATION floods, HPACK bombs and SETTINGS/PING floods are already bounded by
the ``h2`` library and TCP backpressure; ``tests/test_h2_abuse.py`` keeps it so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import h2.errors
import h2.events
import hypercorn.protocol
import hypercorn.protocol.h2
from hypercorn.events import Closed
from hypercorn.events import Event as IOEvent
from hypercorn.protocol.events import Body, Data
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_HIGH_WATER, BUFFER_LOW_WATER, H2Protocol, StreamBuffer

log = logging.getLogger("aws_outbound_jwt_proxy.serve")

PIECE = 16 * 1024  # the app's data is queued at most this much at a time (one default frame)
MAX_BUFFERED = 1024 * 1024  # bytes one connection may have queued for its client, all streams together
RESET_BURST = 200  # stream resets a connection may make at once ...
RESET_RATE = 100.0  # ... and per second, sustained; more: GOAWAY (ENHANCE_YOUR_CALM) and close

STOCK_STREAM_BUFFER = StreamBuffer
STOCK_H2_PROTOCOL = H2Protocol


class FlowControlledStreamBuffer(StreamBuffer):
    """hypercorn's per-stream send buffer, but ``push`` waits until bytes really left.

    ``push`` returns once the buffer is under the high-water mark (two frames);
    ``pop`` lets a waiting ``push`` go only when what is left is under the
    low-water mark, so a take of 0 bytes (closed window) no longer counts.
    """

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise hypercorn.protocol.h2.BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        while len(self.buffer) >= BUFFER_HIGH_WATER and not self._complete:
            await self._paused.clear()
            await self._paused.wait()  # set by pop (drained) or close (stream gone)

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if len(self.buffer) == 0:
            await self._is_empty.set()
        return data


class ResetBudget:
    """A token bucket: ``burst`` resets at once, refilled at ``rate`` per second."""

    def __init__(self, now: float, burst: float = RESET_BURST, rate: float = RESET_RATE) -> None:
        self.burst, self.rate = burst, rate
        self.tokens, self.stamp = burst, now
        self.spent = 0

    def spend(self, count: int, now: float) -> bool:
        """Take ``count`` resets; False once the budget is overdrawn."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= count
        self.spent += count
        return self.tokens >= 0


class GuardedH2Protocol(H2Protocol):
    """hypercorn's HTTP/2 connection with a cap on queued bytes and on the stream-reset rate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resets = ResetBudget(self.context.time())
        self._room = self.context.event_class()  # pulsed when queued bytes fall under MAX_BUFFERED
        self._waiting = 0  # app sends waiting for room

    def buffered(self) -> int:
        """Bytes queued for the client on this connection, all streams together."""
        return sum(len(b.buffer) for b in self.stream_buffers.values())

    async def handle(self, event: IOEvent) -> None:
        await super().handle(event)
        if isinstance(event, Closed):
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()  # frees the bytes now and lets any waiting push return
            await self._pulse_room()

    async def stream_send(self, event: StreamEvent) -> None:
        if not isinstance(event, Body | Data):
            await super().stream_send(event)
            return
        data = event.data
        for start in range(0, max(len(data), 1), PIECE):
            while not self.closed and self.buffered() >= MAX_BUFFERED:
                self._waiting += 1
                try:
                    await self._room.wait()
                finally:
                    self._waiting -= 1
            buffer = self.stream_buffers.get(event.stream_id)
            if self.closed or buffer is None or buffer._complete:
                return  # the stream or connection is gone: as hypercorn does, drop it
            await super().stream_send(dataclasses.replace(event, data=data[start : start + PIECE]))

    async def _send_data(self, stream_id: int) -> None:
        await super()._send_data(stream_id)
        if self._waiting and self.buffered() < MAX_BUFFERED:
            await self._pulse_room()

    async def _pulse_room(self) -> None:
        await self._room.set()
        await self._room.clear()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        resets = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        if resets and not self.resets.spend(len(resets), self.context.time()):
            await self._calm_down()
            return
        unborn: set[int] = set()  # opened and reset in this read: the app is never started
        kept: list[h2.events.Event] = []
        for event in events:
            stream_id = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.RequestReceived) and stream_id in resets:
                unborn.add(event.stream_id)
                continue
            if stream_id in unborn:
                if isinstance(event, h2.events.DataReceived):  # unread, but the window gets it back
                    self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.DataReceived | h2.events.StreamEnded | h2.events.StreamReset):
                    continue
            kept.append(event)
        await super()._handle_events(kept)

    async def _calm_down(self) -> None:
        host, port = self.client or ("", 0)
        log.warning(
            "HTTP/2 client resets streams too fast: connection closed",
            extra={"client": f"{host}:{port}", "resets": self.resets.spent},
        )
        self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await self._flush()
        await self.send(Closed())


def install() -> None:
    """Serve HTTP/2 with :class:`GuardedH2Protocol` and :class:`FlowControlledStreamBuffer` (idempotent)."""
    hypercorn.protocol.h2.StreamBuffer = FlowControlledStreamBuffer  # type: ignore[misc]
    hypercorn.protocol.H2Protocol = GuardedH2Protocol  # type: ignore[attr-defined]
