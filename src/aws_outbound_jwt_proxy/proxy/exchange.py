"""The record of one proxied request, the observer that receives it, and the error vocabulary.

A leaf of the request path (it imports nothing from the rest of the project).

Everything that can go wrong on the way to the upstream ends in one of two
answers, both plain values::

    Refusal(status, body)        the proxy answers itself; the upstream is never called
      400 invalid target / missing or bad routing header, 403 not allowed,
      508 loop, 502 token unavailable
    UpstreamFailure(...)         the upstream call failed: :func:`classify` maps the
      lower layers' exceptions (httpx/httpcore, trio-websocket, OSError, our own
      header deadline) once, here, for HTTP, WebSocket and metrics alike:
        UpstreamTimeout / any timeout        -> 504 "upstream timeout",     error_type timeout
        connection refused (errno anywhere)  -> 502 "upstream unavailable", connection_refused
        anything else (reset, TLS, DNS ...)  -> 502 "upstream unavailable", unknown

:class:`Exchange` is filled in by the module that owns the connection's
lifecycle (``proxy.http`` or ``proxy.websocket``) from those values, and handed
whole to the :class:`RequestObserver` when the request ends.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio
import trio_websocket

from ..routing.target import Target

# Bodies of the answers the proxy gives itself (text/plain).
BAD_TARGET = "invalid request target\n"
NOT_ALLOWED = "upstream not allowed\n"
REQUEST_BODY_TIMEOUT = "request body timeout\n"
TOKEN_UNAVAILABLE = "token unavailable\n"
TOKEN_RATE_LIMITED = "token unavailable: STS rate limit reached, retry later\n"
UPSTREAM_UNAVAILABLE = "upstream unavailable\n"
UPSTREAM_TIMEOUT = "upstream timeout\n"

# error_type label values (metrics) for a failed upstream call.
TIMEOUT = "timeout"
CONNECTION_REFUSED = "connection_refused"
UNKNOWN = "unknown"

# token_result label values: how the token step of a routed request ended.
TOKEN_OK = "ok"
TOKEN_FETCH_ERROR = "fetch_error"
TOKEN_RESOLVER_ERROR = "resolver_error"

CLIENT_GONE = 499  # status recorded when the client left before a response was sent


@dataclass(frozen=True, slots=True)
class Refusal:
    """The proxy answers ``status`` with ``body`` itself; nothing was sent upstream.

    ``target``/``token_result`` say how far the request got (for metrics and logs).
    """

    status: int
    body: str
    target: Target | None = None
    token_result: str | None = None
    denied: str | None = None  # DENIED_* when the target is not allowed
    retry_after: int | None = None  # seconds, sent as Retry-After (503)


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """A failed upstream call, classified: what to answer and the ``error_type`` label."""

    status: int
    body: str
    error_type: str


# Why a target was refused with 403 (the ``reason`` label of the denial counter).
DENIED_ALLOW_LIST = "allow_list"  # not in --allowed-upstream-hosts
DENIED_CIDR = "denied_cidr"  # an address in --denied-upstream-cidrs (literal or resolved)
DENIED_OWN_LISTENER = "own_listener"  # the proxy's own metrics listener


LOOP = "loop detected: the upstream is this proxy\n"


class LoopDetected(Exception):
    """The target is one of our own listeners (``kind``: proxy → 508, metrics → 403)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def own_listener_refusal(kind: str, target: Target | None) -> Refusal:
    """508 for a request aimed back at the proxy, 403 for one aimed at its metrics listener."""
    if kind == "metrics":
        return Refusal(403, NOT_ALLOWED, target, denied=DENIED_OWN_LISTENER)
    return Refusal(508, LOOP, target)


class DeniedUpstream(Exception):
    """Every address the target's name resolved to is in the deny list: nothing was connected."""


class UpstreamTimeout(Exception):
    """No response headers within --upstream-timeout (our own deadline, not a library's)."""


_TIMEOUTS = (UpstreamTimeout, httpx.TimeoutException, trio_websocket.ConnectionTimeout, trio.TooSlowError)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything chained to it (causes, contexts, exception-group members)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        if isinstance(e, BaseExceptionGroup):
            todo += list(e.exceptions)
    return seen


def classify(exc: BaseException) -> UpstreamFailure:
    """Any exception from an upstream call → the answer and its ``error_type``. Pure."""
    if isinstance(exc, _TIMEOUTS):
        return UpstreamFailure(504, UPSTREAM_TIMEOUT, TIMEOUT)
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
            return UpstreamFailure(502, UPSTREAM_UNAVAILABLE, CONNECTION_REFUSED)
    return UpstreamFailure(502, UPSTREAM_UNAVAILABLE, UNKNOWN)


def cause(exc: BaseException) -> str:
    """Exception class and a short message, for the error record (never headers or tokens)."""
    # httpx often wraps with an empty message; the first non-empty one down the chain says why.
    text = next((str(e) for e in _chain(exc) if str(e)), "").replace("\n", " ")[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True, eq=False)
class Exchange:
    """What happened to one request; written by its connection's owner, observed when it ends."""

    method: str
    path: str
    started: float
    target: Target | None = None
    status: int = 0
    token_result: str | None = None  # TOKEN_*; None = the token step was not reached
    error_type: str | None = None  # TIMEOUT / CONNECTION_REFUSED / UNKNOWN on upstream failure
    upstream_seconds: float | None = None  # time to the upstream's response headers (or failure)
    complete: bool = False  # the whole response reached the server
    client_gone: bool = False
    denied: str | None = None  # DENIED_* when the target was refused as not allowed

    def refused(self, refusal: Refusal) -> None:
        self.status = refusal.status
        self.target = refusal.target
        self.token_result = refusal.token_result
        self.denied = refusal.denied


class RequestObserver(Protocol):
    """Metrics hook. ``started`` when a request arrives, ``finished`` once when it ends,
    with ``duration`` in seconds. Must be cheap and must not raise."""

    def started(self) -> None: ...

    def finished(self, exchange: Exchange, duration: float) -> None: ...


class NullObserver:
    """Records nothing (metrics off)."""

    def started(self) -> None:
        pass

    def finished(self, exchange: Exchange, duration: float) -> None:
        pass
