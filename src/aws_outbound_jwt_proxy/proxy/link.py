"""What the server and a request share about one HTTP/1.x client connection.

The server (``server.patches.GuardedTCPServer``) puts a :class:`Link` in each
connection's state, which every request's scope carries (:func:`link`). It
replaces two things ASGI would do per request:

* **Noticing that the client left** without a watcher task. ASGI reports it as
  ``http.disconnect`` on ``receive()``, which only a task waiting on it sees (a
  nursery and a task per request). On HTTP/1.x the server knows directly: the
  client left when the server stops reading the connection (FIN, reset, read
  error). A request registers its cancel scope (:meth:`Link.add`) and the
  server calls :meth:`Link.left` when reading ends.
* **One write for a response head and the body that follows it at once.**
  hypercorn writes the head as soon as the app sends ``http.response.start``;
  when the app knows the body is already in hand it calls
  :meth:`Link.hold_next_write`, and the server writes the head with the next
  write (:meth:`Link.write`): one system call instead of two.

HTTP/2 gets no Link: there a client can reset one stream and keep the
connection, which only the stream's ``http.disconnect`` tells, and streams
share the connection's writes.
"""

from __future__ import annotations

from typing import Any

import trio

from .exchange import Exchange

LINK = "aws_outbound_jwt_proxy.link"  # connection state key: the connection's Link


class Link:
    """One HTTP/1.x connection's requests in flight and its held response head."""

    __slots__ = ("_held", "_hold", "_requests")

    def __init__(self) -> None:
        self._requests: dict[trio.CancelScope, Exchange] = {}
        self._hold = False
        self._held = b""

    # ---- the client leaving -----------------------------------------------------------

    def add(self, scope: trio.CancelScope, ex: Exchange) -> None:
        self._requests[scope] = ex

    def discard(self, scope: trio.CancelScope) -> None:
        self._requests.pop(scope, None)

    def left(self) -> None:
        """The server stopped reading: cancel every request whose response was not handed over whole.

        A response whose last part is being sent (``ex.complete``) is left to finish.
        """
        requests, self._requests = self._requests, {}
        for scope, ex in requests.items():
            if not ex.complete:
                ex.client_gone = True
                scope.cancel()

    # ---- joining a head with its body -------------------------------------------------

    def hold_next_write(self) -> None:
        """The app's next message (a response head) is followed at once by more: write them together."""
        self._hold = True

    def write(self, data: bytes) -> bytes:
        """What the server writes for ``data``: held back (b""), or with the held head in front."""
        if self._hold:
            self._hold = False
            self._held = data
            return b""
        if self._held:
            data, self._held = self._held + data, b""
        return data


def link(scope: Any) -> Link | None:
    """The connection's Link for an HTTP/1.x request, when the server provides one."""
    if scope.get("http_version") == "2":
        return None
    state = scope.get("state")
    found = state.get(LINK) if isinstance(state, dict) else None
    return found if isinstance(found, Link) else None
