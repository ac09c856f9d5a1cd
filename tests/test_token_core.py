"""The token cache as a state machine (tokens/core.py): plain floats for time, no trio, no I/O.

Every random draw is 0.5, so: refresh at ``exp - skew - 0.05 * skew`` (skew 60 s:
``exp - 63``), transient backoff 0.5 s, 1 s, 2 s ... (throttling 1 s, 2 s ...),
permanent backoff 45 s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import pytest

from aws_outbound_jwt_proxy.tokens import api, core
from tests.fixtures.tokens import Policy, RecordingObserver

A = ("https://a.example",)
B = ("https://b.example",)
C = ("https://c.example",)
S = ("https://s.example",)
KEY_A, KEY_B, KEY_C, KEY_S = A[0], B[0], C[0], S[0]
HOUR = 3600.0


def cache(rec: RecordingObserver, **policy: Any) -> core.TokenCache:
    return core.TokenCache(replace(Policy(), **policy), rec, lambda: 0.5)


def ok(jwt: str, exp: float) -> core.Result:
    return core.Result(jwt=jwt, exp=exp)


def err(code: str, transient: bool = True) -> core.Result:
    return core.Result(error=code, transient=transient)


def miss(got: str | core.Miss) -> core.Miss:
    assert isinstance(got, core.Miss), f"expected a miss, got {got!r}"
    return got


def fetch_for(c: core.TokenCache, auds: tuple[str, ...], now: float) -> core.Flight:
    """A miss that starts a fetch: the flight it started."""
    m = miss(c.ask(auds, now))
    assert m.flight is not None and m.actions.fetches == (m.flight,)
    return m.flight


def cached(c: core.TokenCache, auds: tuple[str, ...], jwt: str, now: float, exp: float) -> None:
    """Put a token for the set in the cache: a miss at ``now`` fetched at once."""
    c.fetched(fetch_for(c, auds, now), ok(jwt, exp), now)


def states(c: core.TokenCache, now: float) -> dict[str, api.SetState]:
    return {s.audience: s for s in c.snapshot(now)}


# ---- fetch, hit, single flight ---------------------------------------------------


def test_start_fetches_the_normalized_static_set_in_the_background(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_audiences=("https://z", "https://a", "https://z"))
    actions = c.start(0.0)
    (flight,) = actions.fetches
    assert flight.audiences == ("https://a", "https://z") and flight.key == "https://a,https://z"
    assert flight.background and flight.started == 0.0
    assert actions.deadline == math.inf  # nothing to time while the fetch runs
    assert not c.ready(0.0)
    assert c.snapshot(0.0) == [api.SetState("https://a,https://z", True, None, True, None)]
    assert token_observer.counts == [1]


def test_no_static_sets_is_ready_at_once(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    assert c.start(0.0) == core.Actions()
    assert c.ready(0.0)


def test_miss_starts_one_foreground_fetch_that_later_misses_share(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    first = miss(c.ask(A, 0.0))
    assert first.flight is not None and first.actions.fetches == (first.flight,)
    assert not first.flight.background and first.flight.audiences == A
    for t in (0.1, 0.2):
        again = miss(c.ask(A, t))
        assert again.flight is first.flight and again.actions.fetches == ()
    assert token_observer.misses == [KEY_A] * 3 and token_observer.hits == []


def test_result_wakes_the_flight_and_the_next_ask_is_a_hit(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    flight = fetch_for(c, A, 0.0)
    actions = c.fetched(flight, ok("jwt-1", HOUR), 0.25)
    assert actions.finished == (flight,) and actions.fetches == ()
    assert flight.done and flight.jwt == "jwt-1" and flight.error is None
    assert actions.deadline == HOUR - 63  # refresh at exp - skew - jitter
    assert c.ask(A, 1.0) == "jwt-1"
    assert token_observer.fetches == [(KEY_A, True, None, False)]
    assert token_observer.seconds == [0.25]
    assert token_observer.hits == [KEY_A]


def test_lookup_is_the_hit_path_only(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    assert c.lookup(KEY_A, 0.0) is None  # unknown: nothing created
    assert c.snapshot(0.0) == []
    cached(c, A, "jwt-a", 0.0, 100.0)
    assert c.lookup(KEY_A, 99.0) == "jwt-a"
    assert c.lookup(KEY_A, 100.0) is None  # expired: no hit, no change
    assert token_observer.hits == [KEY_A]


def test_a_hit_makes_the_set_the_most_recently_used(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    cached(c, A, "jwt-a", 0.0, HOUR)
    cached(c, B, "jwt-b", 1.0, HOUR)
    assert [s.audience for s in c.snapshot(2.0)] == [KEY_A, KEY_B]
    assert c.ask(A, 2.0) == "jwt-a"
    assert [s.audience for s in c.snapshot(2.0)] == [KEY_B, KEY_A]


# ---- background refresh ------------------------------------------------------------


def test_refresh_is_due_at_exp_minus_skew_and_the_old_token_serves_meanwhile(
    token_observer: RecordingObserver,
) -> None:
    c = cache(token_observer)
    cached(c, A, "jwt-1", 0.0, 100.0)
    assert c.deadline == 37.0
    assert c.on_timer(36.9).fetches == ()
    (refresh,) = c.on_timer(37.0).fetches
    assert refresh.background
    assert c.ask(A, 40.0) == "jwt-1"  # served, not waited for
    assert states(c, 40.0)[KEY_A].fetching
    actions = c.fetched(refresh, ok("jwt-2", 140.0), 41.0)
    assert actions.finished == (refresh,) and actions.deadline == 140.0 - 63
    assert c.ask(A, 42.0) == "jwt-2"
    assert token_observer.fetches[-1] == (KEY_A, True, None, True)


def test_no_timer_fires_while_a_fetch_is_in_flight(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    cached(c, A, "jwt-1", 0.0, 100.0)
    assert len(c.on_timer(37.0).fetches) == 1
    assert c.deadline == math.inf
    assert c.on_timer(1000.0).fetches == ()
    assert states(c, 50.0)[KEY_A].fetching


# ---- failures -------------------------------------------------------------------------


def test_a_failed_first_fetch_answers_its_waiters_and_then_fails_fast(
    token_observer: RecordingObserver,
) -> None:
    c = cache(token_observer)
    flight = fetch_for(c, A, 0.0)
    actions = c.fetched(flight, err("AccessDenied", transient=False), 0.0)
    assert actions.finished == (flight,) and flight.jwt is None and flight.error == "AccessDenied"
    # Asked while failing: retried 1 s after the failure, not in 30-60 s.
    assert actions.deadline == 1.0
    fast = miss(c.ask(A, 0.5))
    assert fast.flight is None and fast.error == "AccessDenied" and fast.actions.fetches == ()
    assert token_observer.fetches == [(KEY_A, False, "AccessDenied", False)]


def test_no_token_retries_after_1_2_4_then_every_5_s_while_asked(token_observer: RecordingObserver) -> None:
    # Even a permanent error (45 s backoff here) is retried this often while requests ask.
    c = cache(token_observer)
    c.fetched(fetch_for(c, A, 0.0), err("AccessDenied", transient=False), 0.0)
    t = 0.0
    for gap in (1.0, 2.0, 4.0, 5.0, 5.0, 5.0):
        assert miss(c.ask(A, t + 0.5)).flight is None  # asked, answered at once
        assert c.deadline == t + gap
        assert c.on_timer(t + gap - 0.01).fetches == ()
        (retry,) = c.on_timer(t + gap).fetches
        t += gap
        c.fetched(retry, err("AccessDenied", transient=False), t)
    assert len(token_observer.fetches) == 7


def test_unasked_permanent_failure_retries_every_30_to_60_s(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_audiences=S)
    (flight,) = c.start(0.0).fetches
    assert c.fetched(flight, err("AccessDenied", transient=False), 0.0).deadline == 45.0
    (retry,) = c.on_timer(45.0).fetches
    assert c.fetched(retry, err("AccessDenied", transient=False), 45.0).deadline == 90.0


def test_one_failure_costs_a_second_when_a_request_comes(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_audiences=S)
    (flight,) = c.start(0.0).fetches
    c.fetched(flight, err("AccessDenied", transient=False), 0.0)
    assert c.deadline == 45.0  # nobody asked yet
    asked = miss(c.ask(S, 0.5))
    assert asked.flight is None and asked.error == "AccessDenied"
    assert asked.actions.deadline == 1.0  # pulled in
    retry = fetch_for(c, S, 1.2)
    assert not retry.background  # a request is waiting on it


def test_outage_rides_through_on_the_token_still_held(
    token_observer: RecordingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aws_outbound_jwt_proxy.tokens")
    c = cache(token_observer)
    cached(c, A, "jwt-1", 0.0, 100.0)
    (refresh,) = c.on_timer(37.0).fetches
    c.fetched(refresh, err("ServiceUnavailable"), 37.0)
    assert c.deadline == 37.5
    assert c.ask(A, 37.2) == "jwt-1"
    (retry,) = c.on_timer(37.5).fetches
    c.fetched(retry, err("ServiceUnavailable"), 37.5)
    assert c.deadline == 38.5
    assert states(c, 38.0)[KEY_A] == api.SetState(KEY_A, False, 62.0, False, "ServiceUnavailable")
    (retry,) = c.on_timer(38.5).fetches
    c.fetched(retry, ok("jwt-2", 200.0), 38.5)
    assert c.ask(A, 39.0) == "jwt-2"
    assert states(c, 39.0)[KEY_A].error_class is None
    failed = [r for r in caplog.records if r.getMessage() == "token fetch failed"]
    assert [(r.levelno, r.__dict__["token_valid_for_s"]) for r in failed] == [(logging.WARNING, 63.0)]
    assert [r.getMessage() for r in caplog.records].count("token fetch failed again") == 1
    (recovered,) = [r for r in caplog.records if r.getMessage() == "token fetch recovered"]
    assert recovered.__dict__["previous_error_class"] == "ServiceUnavailable"
    assert recovered.__dict__["failures"] == 2


def test_a_slow_retry_is_moved_to_one_last_attempt_before_exp(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    cached(c, A, "jwt-1", 0.0, 100.0)
    (refresh,) = c.on_timer(37.0).fetches
    c.fetched(refresh, err("AccessDenied", transient=False), 37.0)
    assert c.deadline == 82.0  # 45 s later, still before exp - 1
    (retry,) = c.on_timer(82.0).fetches
    c.fetched(retry, err("AccessDenied", transient=False), 82.0)
    assert c.deadline == 99.0  # 127 would be after exp: one last attempt at exp - 1


def test_throttling_backs_off_from_a_later_start(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    cached(c, A, "jwt-a", 0.0, 100.0)
    cached(c, B, "jwt-b", 0.0, 100.0)
    refreshes = {f.key: f for f in c.on_timer(37.0).fetches}
    c.fetched(refreshes[KEY_A], err("ThrottlingException"), 37.0)
    c.fetched(refreshes[KEY_B], err("ServiceUnavailable"), 37.0)
    assert c.deadline == 37.5  # B
    assert c.on_timer(37.5).fetches[0].key == KEY_B
    assert c.deadline == 38.0  # A: throttling starts one doubling later
    assert c.on_timer(38.0).fetches[0].key == KEY_A


def test_a_token_already_expired_on_arrival_is_an_error(token_observer: RecordingObserver) -> None:
    c = cache(token_observer)
    flight = fetch_for(c, A, 0.0)
    c.fetched(flight, ok("stale", 10.0), 10.0)
    assert flight.jwt is None and flight.error == api.EXPIRED_ON_ARRIVAL
    assert states(c, 10.0)[KEY_A].error_class == api.EXPIRED_ON_ARRIVAL
    assert token_observer.fetches == [(KEY_A, False, api.EXPIRED_ON_ARRIVAL, False)]
    assert c.deadline == 10.5  # transient backoff


def test_a_persisting_error_is_logged_once_and_no_token_once(
    token_observer: RecordingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aws_outbound_jwt_proxy.tokens")
    c = cache(token_observer)
    c.fetched(fetch_for(c, A, 0.0), err("AccessDenied", transient=False), 0.0)
    for t in (0.2, 0.4):
        c.ask(A, t)
    (retry,) = c.on_timer(1.0).fetches
    c.fetched(retry, err("AccessDenied", transient=False), 1.0)
    c.ask(A, 1.5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    no_token = "no valid token for audience set; answering token unavailable until a fetch succeeds"
    assert messages == [(logging.ERROR, "token fetch failed"), (logging.ERROR, no_token)]
    assert caplog.records[0].__dict__["error_class"] == "AccessDenied"


# ---- the bounded cache ----------------------------------------------------------------


def test_max_entries_evicts_the_least_recently_used_never_static(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_cache_max_entries=3, token_audiences=S)
    (static,) = c.start(0.0).fetches
    c.fetched(static, ok("jwt-s", HOUR), 0.0)
    cached(c, A, "jwt-a", 1.0, HOUR)
    cached(c, B, "jwt-b", 2.0, HOUR)
    assert c.ask(A, 3.0) == "jwt-a"  # B is now the least recently used dynamic set
    cached(c, C, "jwt-c", 4.0, HOUR)
    assert [s.audience for s in c.snapshot(4.0)] == [KEY_S, KEY_A, KEY_C]
    assert token_observer.counts == [1, 2, 3, 4, 3]
    cached(c, B, "jwt-b2", 5.0, HOUR)  # asked again: fetched again, the static set stays
    assert [s.audience for s in c.snapshot(5.0)] == [KEY_S, KEY_C, KEY_B]


def test_a_set_mid_fetch_is_not_evicted(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_cache_max_entries=1)
    a = fetch_for(c, A, 0.0)
    fetch_for(c, B, 0.0)
    assert len(c.snapshot(0.0)) == 2  # over the cap while both fetch
    c.fetched(a, ok("jwt-a", HOUR), 1.0)  # A is done (and least recently used): it goes
    assert [s.audience for s in c.snapshot(1.0)] == [KEY_B]
    assert a.jwt == "jwt-a"  # its waiters still got the token
    assert token_observer.counts == [1, 2, 1]


def test_an_idle_set_is_dropped_a_used_one_is_not(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_cache_idle_ttl=30.0, token_audiences=S)
    (static,) = c.start(0.0).fetches
    c.fetched(static, ok("jwt-s", HOUR), 0.0)
    cached(c, A, "jwt-a", 0.0, HOUR)
    assert c.deadline == 30.0
    assert c.ask(A, 20.0) == "jwt-a"
    assert c.on_timer(30.0) == core.Actions(deadline=50.0)  # used since: checked again later
    c.on_timer(50.0)
    assert [s.audience for s in c.snapshot(50.0)] == [KEY_S]
    assert token_observer.counts[-1] == 1
    assert c.deadline == HOUR - 63  # the static set is refreshed, never dropped
    fetch_for(c, A, 60.0)  # asked again: fetched again


# ---- readiness, snapshot, shutdown, observer errors --------------------------------------


def test_ready_only_while_every_static_set_holds_a_valid_token(token_observer: RecordingObserver) -> None:
    c = cache(token_observer, token_audiences=S)
    (flight,) = c.start(0.0).fetches
    assert not c.ready(0.5)
    c.fetched(flight, ok("jwt-s", 100.0), 1.0)
    assert c.ready(1.0) and c.ready(99.9)
    assert not c.ready(100.0)
    assert c.snapshot(40.0) == [api.SetState(KEY_S, True, 60.0, False, None)]


def test_close_ends_every_flight_with_shutdown_and_ignores_late_results(
    token_observer: RecordingObserver,
) -> None:
    c = cache(token_observer)
    a, b = fetch_for(c, A, 0.0), fetch_for(c, B, 0.0)
    actions = c.close()
    assert set(actions.finished) == {a, b}
    assert (a.error, b.error) == (api.SHUTDOWN, api.SHUTDOWN)
    assert not any(s.fetching for s in c.snapshot(0.0))
    assert c.fetched(a, ok("late", HOUR), 1.0).finished == ()
    assert a.jwt is None and token_observer.fetches == []


class Broken(RecordingObserver):
    def cache_miss(self, audience: str) -> None:
        raise RuntimeError("metrics bug")


def test_a_failing_observer_hook_is_logged_and_tokens_go_on(caplog: pytest.LogCaptureFixture) -> None:
    c = core.TokenCache(Policy(), Broken(), lambda: 0.5)
    cached(c, A, "jwt-a", 0.0, HOUR)
    assert c.ask(A, 1.0) == "jwt-a"
    (record,) = [r for r in caplog.records if r.getMessage() == "token observer hook failed"]
    assert record.__dict__["hook"] == "cache_miss" and record.__dict__["exception"] == "RuntimeError"


def test_the_recording_observer_catches_what_a_hook_cannot_assert() -> None:
    rec = RecordingObserver()
    rec.fetch_finished(KEY_A, True, None, -0.5, False)
    rec.fetch_finished(KEY_A, False, None, 1.0, False)
    with pytest.raises(AssertionError):
        rec.check()
    assert len(rec.violations) == 2
