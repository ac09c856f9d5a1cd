"""The token cache as a plain state machine: no trio, no I/O, no clock of its own.

:class:`TokenCache` holds every audience set (an LRU ``OrderedDict`` bounded by
``--token-cache-max-entries``, dynamic sets dropped after
``--token-cache-idle-ttl`` unused, static sets never), decides when to fetch
(at most one STS call per set, refresh at ``exp - skew`` with jitter, backoff
after failures; the rules are in :mod:`.schedule`) and what to answer.

Every handler takes ``now`` (seconds on the caller's clock) and returns what
the caller must do: the fetches to start (:class:`Flight`), the flights that
just ended (wake whoever waits on them) and when to call :meth:`TokenCache.on_timer`
next. Random draws come from the ``draw`` callable passed in. The driver
(:mod:`.supervisor`) runs the fetches and owns the clock; tests drive this
class with plain floats.

The cache still calls its observer and logs, in the order the events happen.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..routing import audience
from . import schedule
from .api import EXPIRED_ON_ARRIVAL, RATE_LIMITED, SHUTDOWN, SetState, TokenObserver, TokenPolicy

log = logging.getLogger("aws_outbound_jwt_proxy.tokens")


@dataclass(eq=False)
class Flight:
    """One STS call for one set. ``done`` once it has a ``jwt`` or an ``error``."""

    key: str
    audiences: tuple[str, ...]
    background: bool
    started: float
    done: bool = False
    jwt: str | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(frozen=True)
class Result:
    """What a fetch came back with: a JWT and its ``exp`` (on the cache's clock), or an error class."""

    jwt: str | None = field(default=None, repr=False)
    exp: float = -math.inf
    error: str | None = None
    transient: bool = True


@dataclass(frozen=True)
class Actions:
    """What the driver must do after a handler: start ``fetches``, wake the waiters of
    ``finished`` (each has its ``jwt`` or ``error`` set), call ``on_timer`` at ``deadline``."""

    fetches: tuple[Flight, ...] = ()
    finished: tuple[Flight, ...] = ()
    deadline: float = math.inf


@dataclass(frozen=True)
class Miss:
    """No valid token for the set: wait for ``flight``, or (when it is None) fail with ``error``."""

    flight: Flight | None
    error: str
    actions: Actions
    retry_after: float = 0.0  # with RATE_LIMITED: seconds until STS may be called again


@dataclass(eq=False)
class _Entry:
    key: str
    audiences: tuple[str, ...]
    static: bool
    created: float
    jwt: str | None = field(default=None, repr=False)
    exp: float = -math.inf
    flight: Flight | None = None
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


def _notify(hook: Callable[..., None], *args: object) -> None:
    """Call an observer hook; a bug in metrics must never stop token supervision."""
    try:
        hook(*args)
    except Exception as exc:
        fields = {"hook": getattr(hook, "__name__", "?"), "exception": type(exc).__name__}
        log.error("token observer hook failed", extra=fields)


class TokenCache:
    """Every audience set's token, fetch and timer state. Not thread-safe: one caller at a time."""

    def __init__(self, policy: TokenPolicy, observer: TokenObserver, draw: Callable[[], float]) -> None:
        """``draw`` returns a uniform random number in [0, 1) (jitter for refreshes and backoff)."""
        self._policy = policy
        self._observer = observer
        self._draw = draw
        static = audience.normalize(policy.token_audiences)
        self._static = [static] if static else []
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._fetches: list[Flight] = []
        self._finished: list[Flight] = []
        self._rate = schedule.RateLimit(policy.sts_max_rate)
        # Background fetches the rate limit postponed: they go before any new foreground fetch.
        self._postponed: set[str] = set()

    # ---- handlers -----------------------------------------------------------

    def start(self, now: float) -> Actions:
        """Add the static sets and fetch them (in the background: nobody waits yet)."""
        for auds in self._static:
            entry = self._add(auds, static=True, now=now)
            self._start_fetch(entry, background=True, now=now)
        return self._actions()

    def lookup(self, key: str, now: float) -> str | None:
        """The hit path: the set's valid JWT (now the most recently used set), or None and no change."""
        entry = self._entries.get(key)
        if entry is None or not entry.valid(now):
            return None
        entry.last_asked = now
        self._entries.move_to_end(key)
        _notify(self._observer.cache_hit, key)
        return entry.jwt

    def ask(self, audiences: tuple[str, ...], now: float) -> str | Miss:
        """A request for a normalized set: its JWT (a hit), or a :class:`Miss`.

        A miss starts a foreground fetch unless one is in flight, or unless the
        last attempt failed and the next is not due yet: then the miss says fail
        at once with that error class.
        """
        key = audience.key(audiences)
        jwt = self.lookup(key, now)
        if jwt is not None:
            return jwt
        entry = self._entries.get(key)
        created = entry is None
        if entry is None:
            entry = self._add(audiences, static=False, now=now)
        entry.last_asked = now
        self._entries.move_to_end(key)
        _notify(self._observer.cache_miss, key)
        error, retry_after = schedule.UNKNOWN, 0.0
        if entry.flight is None:
            if entry.error is not None:
                entry.due = schedule.pull_in(entry.due, entry.failed_at, entry.failures)
            if entry.error is not None and now < entry.due:
                error = entry.error
                self._log_no_token(entry)
                self._arm(entry)
            elif not self._start_fetch(entry, background=False, now=now):
                error, retry_after = RATE_LIMITED, max(self._rate.wait(now), 1.0)
        flight = entry.flight
        if created:
            self._enforce_max()
        return Miss(flight, error, self._actions(), retry_after)

    def fetched(self, flight: Flight, result: Result, now: float) -> Actions:
        """A fetch ended at ``now`` (its duration is ``now - flight.started``)."""
        if flight.done:  # ended already (shutdown): its result is not wanted
            return self._actions()
        entry = self._entries.get(flight.key)
        current = entry is not None and entry.flight is flight
        error = result.error
        transient = result.transient
        if error is None and result.exp <= now:
            error, transient = EXPIRED_ON_ARRIVAL, True
        if entry is not None and current:
            entry.flight = None
            if error is None:
                self._succeeded(entry, result, flight.background, now)
            else:
                self._failed(entry, flight, error, transient, now)
            self._arm(entry)
        self._finish(flight, result.jwt if error is None else None, error)
        ok = error is None
        seconds = now - flight.started
        _notify(self._observer.fetch_finished, flight.key, ok, error, seconds, flight.background)
        if current:
            self._enforce_max()
        return self._actions()

    def on_timer(self, now: float) -> Actions:
        """Run every timer due by ``now``: background refreshes and retries, idle drops."""
        while self._heap and self._heap[0][0] <= now:
            _, seq, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            if entry is None or entry.wake_seq != seq:
                continue
            entry.wake_seq = -1
            if entry.flight is not None:
                continue
            if not entry.static and now >= entry.last_used + self._policy.token_cache_idle_ttl:
                self._drop(entry, "idle")
            elif now >= entry.due:
                self._start_fetch(entry, background=True, now=now)
            else:
                self._arm(entry)
        return self._actions()

    def close(self) -> Actions:
        """The driver is stopping: every flight ends with ``shutdown`` (its result will not come)."""
        for entry in self._entries.values():
            if entry.flight is not None:
                self._finish(entry.flight, None, SHUTDOWN)
                entry.flight = None
        return self._actions()

    # ---- views ----------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """When :meth:`on_timer` is next needed (``inf``: no timer)."""
        return self._heap[0][0] if self._heap else math.inf

    def ready(self, now: float) -> bool:
        """Every static audience set holds a valid token (True when there are none)."""
        for auds in self._static:
            entry = self._entries.get(audience.key(auds))
            if entry is None or not entry.valid(now):
                return False
        return True

    def snapshot(self, now: float) -> list[SetState]:
        """Read-only state of every cached set, least recently used first."""
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

    # ---- outcomes ---------------------------------------------------------------

    def _succeeded(self, entry: _Entry, res: Result, background: bool, now: float) -> None:
        entry.jwt, entry.exp = res.jwt, res.exp
        entry.due = schedule.refresh_at(now, res.exp, self._policy.token_refresh_skew, self._draw())
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
                "background": background,
            },
        )

    def _failed(self, entry: _Entry, flight: Flight, error: str, transient: bool, now: float) -> None:
        entry.failures += 1
        entry.error, entry.failed_at = error, now
        held = entry.exp if entry.valid(now) else None
        requested = entry.last_asked >= flight.started - schedule.EXPIRED_RETRY_CAP
        throttled = schedule.is_throttle(error)
        delay = schedule.backoff(entry.failures, transient, self._draw(), throttled)
        entry.due = schedule.retry_at(now, delay, held, requested, entry.failures)
        fields = {
            "audience": entry.key,
            "error_class": error,
            "transient": transient,
            "failures": entry.failures,
            "retry_in_s": round(entry.due - now, 1),
            "token_valid_for_s": None if held is None else round(held - now, 1),
        }
        if entry.logged != error:
            entry.logged = error
            level = logging.WARNING if transient and held is not None else logging.ERROR
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

    # ---- bookkeeping --------------------------------------------------------------

    def _actions(self) -> Actions:
        """Hand over (and forget) the fetches started and flights finished since the last handler."""
        if not self._fetches and not self._finished:
            return Actions(deadline=self.deadline)
        actions = Actions(tuple(self._fetches), tuple(self._finished), self.deadline)
        self._fetches.clear()
        self._finished.clear()
        return actions

    def _add(self, audiences: tuple[str, ...], *, static: bool, now: float) -> _Entry:
        entry = _Entry(key=audience.key(audiences), audiences=audiences, static=static, created=now)
        self._entries[entry.key] = entry
        _notify(self._observer.cached_sets, len(self._entries))
        return entry

    def _drop(self, entry: _Entry, reason: str) -> None:
        del self._entries[entry.key]
        self._postponed.discard(entry.key)
        log.debug("audience set dropped", extra={"audience": entry.key, "reason": reason})
        _notify(self._observer.cached_sets, len(self._entries))

    def _enforce_max(self) -> None:
        """Evict least recently used sets (never static, never mid-fetch) down to the cap."""
        while len(self._entries) > self._policy.token_cache_max_entries:
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
            when = min(when, entry.last_used + self._policy.token_cache_idle_ttl)
        if entry.wake_seq >= 0 and entry.wake_at == when:
            return
        entry.wake_seq, entry.wake_at = next(self._seq), when
        heapq.heappush(self._heap, (when, entry.wake_seq, entry.key))

    def _start_fetch(self, entry: _Entry, *, background: bool, now: float) -> bool:
        """Start a fetch if --sts-max-rate allows one now: background fetches (pre-warm,
        refresh, retry) first; one it postpones is retried when the next call is free,
        and until then no foreground fetch may take the call. False: not started."""
        if background:
            if not self._rate.take(now):
                self._postpone(entry, now)
                return False
            self._postponed.discard(entry.key)
        elif self._postponed or not self._rate.take(now):
            if not self._postponed:
                log.debug("STS rate limit reached", extra={"audience": entry.key})
            return False
        flight = Flight(entry.key, entry.audiences, background=background, started=now)
        entry.flight, entry.due = flight, math.inf
        self._fetches.append(flight)
        return True

    def _postpone(self, entry: _Entry, now: float) -> None:
        if entry.key not in self._postponed:
            log.debug("STS rate limit reached: refresh postponed", extra={"audience": entry.key})
        self._postponed.add(entry.key)
        entry.due = now + max(self._rate.wait(now), 0.001)
        self._arm(entry)

    def _finish(self, flight: Flight, jwt: str | None, error: str | None) -> None:
        if not flight.done:
            flight.done, flight.jwt, flight.error = True, jwt, error
            self._finished.append(flight)
