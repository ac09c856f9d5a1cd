"""Tokens: the supervisor that owns the JWT cache and every STS call.

One task (:meth:`Supervisor.run`, started in the server's root nursery) holds
the cache. Request handlers never touch it: :meth:`Supervisor.get` sends an
ask over a memory channel and waits on events the supervisor owns. Each fetch
runs as a child task calling the blocking STS client in a worker thread (bounded
by a CapacityLimiter, abandoned on cancel) and reports back over the same
channel, so every change to the cache happens in the supervisor's loop.

Per audience set: at most one STS call in flight; refreshed in the background
at ``exp - skew`` (with jitter) and served until its real ``exp``; failures
back off (see :mod:`.schedule`) while a still-valid token keeps being served.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from ..routing import audience
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

INBOX_SIZE = 4096
STS_THREADS = 10  # concurrent STS calls across all sets (matches the client's pool)


def _notify(hook: Callable[..., None], *args: object) -> None:
    """Call an observer hook; a bug in metrics must never stop token supervision."""
    try:
        hook(*args)
    except Exception as exc:
        fields = {"hook": getattr(hook, "__name__", "?"), "exception": type(exc).__name__}
        log.error("token observer hook failed", extra=fields)


@dataclass(eq=False)
class _Flight:
    """One STS call for one set; requests without a valid token wait on ``done``."""

    background: bool
    started: float
    done: trio.Event = field(default_factory=trio.Event)
    jwt: str | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(eq=False)
class _Entry:
    key: str
    audiences: tuple[str, ...]
    static: bool
    created: float
    jwt: str | None = field(default=None, repr=False)
    exp: float = -math.inf  # trio clock
    flight: _Flight | None = None
    due: float = math.inf  # next planned fetch attempt
    last_asked: float = -math.inf
    failures: int = 0
    error: str | None = None  # class of the last failure, None after success
    failed_at: float = -math.inf
    wake_seq: int = -1  # heap item that is current for this entry (-1: none)
    wake_at: float = math.inf
    logged: str | None = None  # last error state logged (log once per change)
    expiry_logged: bool = False

    def valid(self, now: float) -> bool:
        return self.jwt is not None and now < self.exp

    @property
    def last_used(self) -> float:
        return max(self.created, self.last_asked)


@dataclass(eq=False)
class _Ask:
    key: str
    audiences: tuple[str, ...]
    answered: trio.Event = field(default_factory=trio.Event)
    jwt: str | None = field(default=None, repr=False)
    error: str | None = None
    flight: _Flight | None = None


@dataclass(eq=False)
class _Result:
    key: str
    flight: _Flight
    seconds: float = 0.0
    jwt: str | None = field(default=None, repr=False)
    exp: float = -math.inf  # trio clock
    error: str | None = None
    transient: bool = True
    throttled: bool = False


class Supervisor:
    """Owns the token cache and all STS traffic; implements :class:`TokenSource`.

    Start it with ``await nursery.start(sup.run)``; cancel that nursery to stop.
    """

    def __init__(
        self,
        settings: TokenPolicy,
        fetcher: Fetcher,
        observer: TokenObserver | None = None,
        *,
        sts_threads: int = STS_THREADS,
    ) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._observer: TokenObserver = observer or NullObserver()
        self._static = [audience.normalize(settings.token_audiences)] if settings.token_audiences else []
        self._send, self._recv = trio.open_memory_channel[_Ask | _Result](INBOX_SIZE)
        self._limiter = trio.CapacityLimiter(sts_threads)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._rand = random.Random()
        self._nursery: trio.Nursery | None = None

    # ---- request side -------------------------------------------------

    async def get(self, audiences: tuple[str, ...]) -> str:
        """A valid JWT for the set, or :class:`TokenUnavailable`.

        Answers at once from the cache; waits (at most --upstream-timeout) only
        when no valid token exists and a fetch is in flight.
        """
        ask = _Ask(audience.key(audiences), audiences)
        with trio.move_on_after(self._settings.upstream_timeout):
            try:
                await self._send.send(ask)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise TokenUnavailable(SHUTDOWN) from None
            await ask.answered.wait()
            if ask.jwt is not None:
                return ask.jwt
            if ask.flight is None:
                raise TokenUnavailable(ask.error or schedule.UNKNOWN)
            await ask.flight.done.wait()
            if ask.flight.jwt is not None:
                return ask.flight.jwt
            raise TokenUnavailable(ask.flight.error or schedule.UNKNOWN)
        raise TokenUnavailable(TIMEOUT)

    def ready(self) -> bool:
        """Every static audience set holds a valid token (True when there are none)."""
        now = trio.current_time()
        for auds in self._static:
            entry = self._entries.get(audience.key(auds))
            if entry is None or not entry.valid(now):
                return False
        return True

    def snapshot(self) -> list[SetState]:
        """Read-only state of every cached set."""
        now = trio.current_time()
        return [
            SetState(
                audience=e.key,
                static=e.static,
                seconds_left=(e.exp - now) if e.valid(now) else None,
                fetching=e.flight is not None,
                error_class=e.error,
            )
            for e in self._entries.values()
        ]

    # ---- the supervisor task ------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the cache until cancelled. Static sets are fetched at once (not awaited)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                now = trio.current_time()
                for auds in self._static:
                    entry = self._add(auds, static=True, now=now)
                    self._start_fetch(entry, background=True, now=now)
                task_status.started()
                await self._loop()
        finally:
            self._close()

    async def _loop(self) -> None:
        while True:
            msg: _Ask | _Result | None = None
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                msg = await self._recv.receive()
            now = trio.current_time()
            if isinstance(msg, _Ask):
                self._on_ask(msg, now)
            elif isinstance(msg, _Result):
                self._on_result(msg, now)
            if self._heap and self._heap[0][0] <= now:
                self._on_timers(now)

    def _close(self) -> None:
        """Wake everyone still waiting; later asks fail with ``shutdown``."""
        while True:
            try:
                msg = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(msg, _Ask):
                msg.error = SHUTDOWN
                msg.answered.set()
            else:
                self._finish_flight(msg.flight, None, SHUTDOWN)
        self._recv.close()
        for entry in self._entries.values():
            if entry.flight is not None:
                self._finish_flight(entry.flight, None, SHUTDOWN)
                entry.flight = None
        self._nursery = None

    # ---- message handling (supervisor task only) ------------------------

    def _on_ask(self, ask: _Ask, now: float) -> None:
        entry = self._entries.get(ask.key)
        created = entry is None
        if entry is None:
            entry = self._add(ask.audiences, static=False, now=now)
        entry.last_asked = now
        self._entries.move_to_end(entry.key)
        if entry.valid(now):
            ask.jwt = entry.jwt
            _notify(self._observer.cache_hit, entry.key)
        else:
            _notify(self._observer.cache_miss, entry.key)
            if entry.flight is None:
                if entry.error is not None:
                    entry.due = schedule.pull_in(entry.due, entry.failed_at, entry.failures)
                if entry.error is not None and now < entry.due:
                    ask.error = entry.error
                    self._log_no_token(entry)
                    self._arm(entry)
                else:
                    self._start_fetch(entry, background=False, now=now)
            ask.flight = entry.flight
        ask.answered.set()
        if created:
            self._enforce_max()

    def _on_result(self, res: _Result, now: float) -> None:
        entry = self._entries.get(res.key)
        current = entry is not None and entry.flight is res.flight
        error = res.error
        if error is None and res.exp <= now:
            error, res.transient = EXPIRED_ON_ARRIVAL, True
        if entry is not None and current:
            entry.flight = None
            if error is None:
                self._succeeded(entry, res, now)
            else:
                self._failed(entry, res, error, now)
            self._arm(entry)
        self._finish_flight(res.flight, res.jwt if error is None else None, error)
        ok, background = error is None, res.flight.background
        _notify(self._observer.fetch_finished, res.key, ok, error, res.seconds, background)
        if current:
            self._enforce_max()

    def _succeeded(self, entry: _Entry, res: _Result, now: float) -> None:
        entry.jwt, entry.exp = res.jwt, res.exp
        entry.due = schedule.refresh_at(now, res.exp, self._settings.token_refresh_skew, self._rand.random())
        if entry.logged is not None:
            log.info(
                "token fetch recovered",
                extra={
                    "audience": entry.key,
                    "previous_error_class": entry.logged,
                    "failures": entry.failures,
                },
            )
        entry.failures, entry.error, entry.logged, entry.expiry_logged = 0, None, None, False
        log.debug(
            "token fetched",
            extra={
                "audience": entry.key,
                "expires_in_s": round(res.exp - now, 1),
                "refresh_in_s": round(entry.due - now, 1),
                "background": res.flight.background,
            },
        )

    def _failed(self, entry: _Entry, res: _Result, error: str, now: float) -> None:
        entry.failures += 1
        entry.error, entry.failed_at = error, now
        held = entry.exp if entry.valid(now) else None
        requested = entry.last_asked >= res.flight.started - schedule.EXPIRED_RETRY_CAP
        delay = schedule.backoff(entry.failures, res.transient, self._rand.random(), res.throttled)
        entry.due = schedule.retry_at(now, delay, held, requested, entry.failures)
        fields = {
            "audience": entry.key,
            "error_class": error,
            "transient": res.transient,
            "failures": entry.failures,
            "retry_in_s": round(entry.due - now, 1),
            "token_valid_for_s": None if held is None else round(held - now, 1),
        }
        if entry.logged != error:
            entry.logged = error
            level = logging.WARNING if res.transient and held is not None else logging.ERROR
            log.log(level, "token fetch failed", extra=fields)
        else:
            log.debug("token fetch failed again", extra=fields)

    def _log_no_token(self, entry: _Entry) -> None:
        if not entry.expiry_logged:
            entry.expiry_logged = True
            log.error(
                "no valid token for audience set; answering token unavailable until a fetch succeeds",
                extra={"audience": entry.key, "error_class": entry.error},
            )

    def _on_timers(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.wake_seq != seq:
                continue
            entry.wake_seq = -1
            if entry.flight is not None:
                continue
            if not entry.static and now >= entry.last_used + self._settings.token_cache_idle_ttl:
                self._drop(entry, "idle")
            elif now >= entry.due:
                self._start_fetch(entry, background=True, now=now)
            else:
                self._arm(entry)

    # ---- cache bookkeeping ------------------------------------------------

    def _add(self, audiences: tuple[str, ...], *, static: bool, now: float) -> _Entry:
        entry = _Entry(key=audience.key(audiences), audiences=audiences, static=static, created=now)
        self._entries[entry.key] = entry
        _notify(self._observer.cached_sets, len(self._entries))
        return entry

    def _drop(self, entry: _Entry, reason: str) -> None:
        del self._entries[entry.key]
        log.debug("audience set dropped", extra={"audience": entry.key, "reason": reason})
        _notify(self._observer.cached_sets, len(self._entries))

    def _enforce_max(self) -> None:
        """Evict least recently used sets (never static, never mid-fetch) down to the cap."""
        while len(self._entries) > self._settings.token_cache_max_entries:
            victim = next((e for e in self._entries.values() if not e.static and e.flight is None), None)
            if victim is None:
                return
            self._drop(victim, "max_entries")

    def _arm(self, entry: _Entry) -> None:
        """(Re)schedule the entry's next timer: its due fetch, or its idle check."""
        if entry.flight is not None:
            return
        when = entry.due
        if not entry.static:
            when = min(when, entry.last_used + self._settings.token_cache_idle_ttl)
        if entry.wake_seq >= 0 and entry.wake_at == when:
            return
        entry.wake_seq, entry.wake_at = next(self._seq), when
        heapq.heappush(self._heap, (when, entry.wake_seq, entry.key))

    # ---- fetching -----------------------------------------------------

    def _start_fetch(self, entry: _Entry, *, background: bool, now: float) -> None:
        assert self._nursery is not None
        flight = _Flight(background=background, started=now)
        entry.flight, entry.due = flight, math.inf
        self._nursery.start_soon(self._fetch, entry.key, entry.audiences, flight)

    async def _fetch(self, key: str, audiences: tuple[str, ...], flight: _Flight) -> None:
        s = self._settings
        call = partial(
            self._fetcher.fetch, audiences, s.token_signing_algorithm, s.token_duration, s.token_tags
        )
        res = _Result(key, flight)
        try:
            token = await trio.to_thread.run_sync(call, limiter=self._limiter, abandon_on_cancel=True)
        except sts.StsError as err:
            res.error, res.transient = err.code, err.transient
            res.throttled = schedule.is_throttle(err.code)
        except Exception as exc:  # a bug or an unexpected library error: keep supervising
            log.error(
                "token fetch raised unexpectedly", extra={"audience": key, "exception": type(exc).__name__}
            )
            res.error = INTERNAL
        else:
            res.jwt = token.jwt
            res.exp = trio.current_time() + (token.expires_at - time.time())
        res.seconds = trio.current_time() - flight.started
        try:
            await self._send.send(res)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    def _finish_flight(flight: _Flight, jwt: str | None, error: str | None) -> None:
        if not flight.done.is_set():
            flight.jwt, flight.error = jwt, error
            flight.done.set()
