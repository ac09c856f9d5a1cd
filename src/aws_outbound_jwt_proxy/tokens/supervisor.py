"""Tokens: the trio driver around the token cache (:mod:`.core`) and every STS call.

:meth:`Supervisor.run` (started in the server's root nursery) owns a nursery
and the cache's timer. :meth:`Supervisor.get` asks the cache directly — every
caller runs on the same trio thread — so a cached token is answered without
awaiting anything. Only a miss waits: on the :class:`trio.Event` of the set's
one fetch in flight, at most ``--upstream-timeout``. Each fetch runs as a task
calling the blocking STS client in a worker thread (bounded by a
CapacityLimiter, abandoned on cancel) and hands its result back to the cache.

What to fetch and when (refresh at ``exp - skew`` with jitter, backoff while a
still-valid token keeps being served, idle and LRU eviction) is decided by
:class:`.core.TokenCache`; this module only does what it returns.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from functools import partial

import trio

from . import schedule, sts
from .api import (
    EXPIRED_ON_ARRIVAL,
    INTERNAL,
    SHUTDOWN,
    TIMEOUT,
    Fetcher,
    NullObserver,
    SetState,
    TokenObserver,
    TokenPolicy,
    TokenSource,
    TokenUnavailable,
)
from .core import Actions, Flight, Miss, Result, TokenCache

__all__ = [
    "EXPIRED_ON_ARRIVAL",
    "INTERNAL",
    "SHUTDOWN",
    "STS_THREADS",
    "TIMEOUT",
    "Fetcher",
    "NullObserver",
    "SetState",
    "Supervisor",
    "TokenObserver",
    "TokenPolicy",
    "TokenSource",
    "TokenUnavailable",
]

log = logging.getLogger("aws_outbound_jwt_proxy.tokens")

STS_THREADS = 10  # concurrent STS calls across all sets (matches the client's pool)


class Supervisor:
    """Runs the token cache's fetches and timers; implements :class:`TokenSource`.

    Start it with ``await nursery.start(sup.run)``; cancel that nursery to stop.
    ``draw`` (tests) replaces the uniform [0, 1) random numbers used for jitter.
    """

    def __init__(
        self,
        settings: TokenPolicy,
        fetcher: Fetcher,
        observer: TokenObserver | None = None,
        *,
        sts_threads: int = STS_THREADS,
        draw: Callable[[], float] | None = None,
    ) -> None:
        self._policy = settings
        self._fetcher = fetcher
        self._core = TokenCache(settings, observer or NullObserver(), draw or random.Random().random)
        self._limiter = trio.CapacityLimiter(sts_threads)
        self._done: dict[Flight, trio.Event] = {}  # per fetch in flight: set when it ends
        self._nursery: trio.Nursery | None = None
        self._timer: trio.CancelScope | None = None
        self._running = trio.Event()  # set once run() has started (or ended)
        self._closed = False

    # ---- request side -------------------------------------------------

    async def get(self, audiences: tuple[str, ...]) -> str:
        """A valid JWT for the set, or :class:`TokenUnavailable`.

        Answers at once from the cache; waits (at most --upstream-timeout) only
        when no valid token exists and a fetch is in flight.
        """
        if self._nursery is None:
            return await self._get_once_running(audiences)
        got = self._core.ask(audiences, trio.current_time())
        if isinstance(got, str):
            return got
        return await self._wait(got, trio.current_time() + self._policy.upstream_timeout)

    async def _get_once_running(self, audiences: tuple[str, ...]) -> str:
        """``get`` before :meth:`run` has started waits for it; after it has ended: shutdown."""
        deadline = trio.current_time() + self._policy.upstream_timeout
        if not self._closed:
            with trio.move_on_at(deadline):
                await self._running.wait()
        if self._nursery is None:
            raise TokenUnavailable(SHUTDOWN if self._closed else TIMEOUT)
        got = self._core.ask(audiences, trio.current_time())
        if isinstance(got, str):
            return got
        return await self._wait(got, deadline)

    async def _wait(self, miss: Miss, deadline: float) -> str:
        self._apply(miss.actions)
        flight = miss.flight
        if flight is None:
            raise TokenUnavailable(miss.error, miss.retry_after)
        done = self._done.get(flight)
        if done is not None:
            with trio.move_on_at(deadline):
                await done.wait()
            if not flight.done:
                raise TokenUnavailable(TIMEOUT)
        if flight.jwt is not None:
            return flight.jwt
        raise TokenUnavailable(flight.error or schedule.UNKNOWN)

    def ready(self) -> bool:
        """Every static audience set holds a valid token (True when there are none)."""
        return self._core.ready(trio.current_time())

    def snapshot(self) -> list[SetState]:
        """Read-only state of every cached set."""
        return self._core.snapshot(trio.current_time())

    # ---- the driver -----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the cache until cancelled. Static sets are fetched at once (not awaited)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    self._apply(self._core.start(trio.current_time()))
                    self._running.set()
                    task_status.started()
                    while True:
                        with trio.CancelScope(deadline=self._core.deadline) as self._timer:
                            await trio.sleep_forever()
                        self._apply(self._core.on_timer(trio.current_time()))
                finally:
                    self._nursery, self._closed = None, True  # no new fetches while the nursery closes
        finally:
            self._timer = None
            self._apply(self._core.close())  # wakes everyone still waiting with ``shutdown``
            self._running.set()

    def _apply(self, actions: Actions) -> None:
        """Do what the cache asked: start fetches, wake waiters, move the timer."""
        for flight in actions.fetches:
            assert self._nursery is not None, "the cache started a fetch while not running"
            self._done[flight] = trio.Event()
            self._nursery.start_soon(self._fetch, flight)
        for flight in actions.finished:
            done = self._done.pop(flight, None)
            if done is not None:
                done.set()
        if self._timer is not None:
            self._timer.deadline = actions.deadline

    async def _fetch(self, flight: Flight) -> None:
        p = self._policy
        call = partial(
            self._fetcher.fetch, flight.audiences, p.token_signing_algorithm, p.token_duration, p.token_tags
        )
        try:
            token = await trio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)
        except sts.StsError as err:
            result = Result(error=err.code, transient=err.transient)
        except Exception as exc:  # a bug or an unexpected library error: keep supervising
            log.error(
                "token fetch raised unexpectedly",
                extra={"audience": flight.key, "exception": type(exc).__name__},
            )
            result = Result(error=INTERNAL)
        else:
            # STS's Expiration is wall-clock; the cache runs on the trio clock.
            result = Result(jwt=token.jwt, exp=trio.current_time() + (token.expires_at - time.time()))
        self._apply(self._core.fetched(flight, result, trio.current_time()))
