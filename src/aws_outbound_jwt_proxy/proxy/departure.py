"""Noticing that an HTTP/1.x client left, without a watcher task per request.

A request whose client has gone must be cancelled (and with it the upstream
call). ASGI reports that as an ``http.disconnect`` message on ``receive()``,
which only a task waiting on it sees: a nursery and a task per request. On an
HTTP/1.x connection the server knows it directly: the client left when the
server stops reading the connection (FIN, reset, read error). So the server
(``server.patches.GuardedTCPServer``) gives each connection a
:class:`Departure` in its connection state, which every request's scope
carries; a request registers its cancel scope there, and the server calls
:meth:`Departure.left` when reading ends.

HTTP/2 keeps the watcher task: there a client can reset one stream and keep
the connection, which only the stream's ``http.disconnect`` tells.
"""

from __future__ import annotations

from typing import Any

import trio

from .exchange import Exchange

DEPARTURE = "aws_outbound_jwt_proxy.departure"  # connection state key: the connection's Departure


class Departure:
    """The requests in flight on one HTTP/1.x connection, cancelled when its client leaves."""

    __slots__ = ("_requests",)

    def __init__(self) -> None:
        self._requests: dict[trio.CancelScope, Exchange] = {}

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


def departure(scope: Any) -> Departure | None:
    """The connection's Departure for an HTTP/1.x request, when the server provides one."""
    if scope.get("http_version") == "2":
        return None
    state = scope.get("state")
    found = state.get(DEPARTURE) if isinstance(state, dict) else None
    return found if isinstance(found, Departure) else None
