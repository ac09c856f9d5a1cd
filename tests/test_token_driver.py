"""The trio driver (tokens/supervisor.py) in virtual time, with a scripted in-process STS.

Every test runs on ``MockClock(autojump_threshold=0)``: when every task waits,
the clock jumps to the next deadline. A :class:`ScriptedSts` call blocks in its
worker thread until the test answers it; :meth:`Rig.answer` then spins on
checkpoints (no virtual time passes) until the supervisor has the result, so a
worker thread never races the clock. Random draws are 0.5: refresh at
``exp - skew - 0.05 * skew``, transient backoff 0.5 s, 1 s, 2 s ..., permanent 45 s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from aws_outbound_jwt_proxy.tokens import sts
from aws_outbound_jwt_proxy.tokens import supervisor as tokens
from tests.fixtures.tokens import Policy, RecordingObserver, ScriptedSts

A = ("https://a.example",)
B = ("https://b.example",)
C = ("https://c.example",)
HOUR = 3600.0
EPS = 0.01
# A token's exp reaches the supervisor through the wall clock (STS's Expiration
# minus time.time()), so times derived from it are early by the real time the
# worker thread took to report back: far less than this.
DRIFT = 0.5

DENIED = sts.StsError("AccessDenied", 403, False)
UNAVAILABLE = sts.StsError("ServiceUnavailable", 503, True)


async def spin_until(check: Callable[[], bool], what: str) -> None:
    """Checkpoint until ``check()``; the task stays runnable, so the mock clock cannot jump."""
    give_up = time.monotonic() + 5.0
    while not check():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        await trio.lowlevel.checkpoint()


def now() -> float:
    return trio.current_time()


class Rig:
    """A supervisor on a scripted STS, with the helpers the tests share."""

    def __init__(self, fake: ScriptedSts, rec: RecordingObserver, **policy: Any) -> None:
        self.sts, self.rec = fake, rec
        self.sup = tokens.Supervisor(replace(Policy(), **policy), fake, rec, draw=lambda: 0.5)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[trio.Nursery]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sup.run)
            yield nursery
            nursery.cancel_scope.cancel()

    async def answer(self, audiences: tuple[str, ...], outcome: float | Exception) -> None:
        """STS answers the set's fetch (in flight, or just being started) with ``outcome``."""
        want = len(self.rec.fetches) + 1
        self.sts.answer(audiences, outcome)
        await spin_until(lambda: len(self.rec.fetches) >= want, f"a result for {audiences}")

    def fetching(self, audiences: tuple[str, ...]) -> bool:
        return any(s.audience == ",".join(audiences) and s.fetching for s in self.sup.snapshot())

    def audiences(self) -> list[str]:
        return [s.audience for s in self.sup.snapshot()]

    async def get_now(self, audiences: tuple[str, ...]) -> str:
        """``get()`` that must return without a checkpoint: a cache hit, or ``unavailable:<class>``."""
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint inside get() raises Cancelled
            return await self.request(audiences)
        raise AssertionError("get() awaited")

    async def settle(self) -> None:
        """Let the tasks an answer woke run (no virtual time passes)."""
        await trio.testing.wait_all_tasks_blocked()

    async def request(self, audiences: tuple[str, ...]) -> str:
        """``get()``: the JWT, or ``unavailable:<class>``."""
        try:
            return await self.sup.get(audiences)
        except tokens.TokenUnavailable as exc:
            return f"unavailable:{exc.error_class}"

    def start_request(self, nursery: trio.Nursery, audiences: tuple[str, ...], into: list[str]) -> None:
        async def one() -> None:
            into.append(await self.request(audiences))

        nursery.start_soon(one)

    async def miss(
        self, nursery: trio.Nursery, audiences: tuple[str, ...], outcome: float | Exception
    ) -> None:
        """A request misses and STS answers the fetch it starts with ``outcome``."""
        self.start_request(nursery, audiences, [])
        await self.answer(audiences, outcome)


@pytest.fixture
def rig(scripted_sts: ScriptedSts, token_observer: RecordingObserver) -> Callable[..., Rig]:
    return lambda **policy: Rig(scripted_sts, token_observer, **policy)


# ---- fetch, hit, share --------------------------------------------------------------------


async def test_a_hit_is_answered_without_awaiting_and_becomes_most_recent(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    async with r.running() as n:
        got: list[str] = []
        for auds in (A, B):
            r.start_request(n, auds, got)
            await r.answer(auds, HOUR)
        await r.settle()
        assert got == ["jwt:https://a.example:1", "jwt:https://b.example:2"]
        assert r.audiences() == [A[0], B[0]]
        assert await r.get_now(A) == "jwt:https://a.example:1"
        assert r.audiences() == [B[0], A[0]]
    assert r.rec.hits == [A[0]] and sorted(r.rec.misses) == [A[0], B[0]]


async def test_100_concurrent_misses_make_one_sts_call(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    got: list[str] = []
    async with r.running():
        async with trio.open_nursery() as n:
            for _ in range(100):
                r.start_request(n, A, got)
            await r.answer(A, HOUR)
    assert got == ["jwt:https://a.example:1"] * 100
    assert len(r.sts.calls) == 1
    assert r.rec.fetches == [(A[0], True, None, False)]
    assert len(r.rec.misses) == 100 and r.rec.hits == []


async def test_different_sets_fetch_at_the_same_time(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    got: list[str] = []
    async with r.running():
        async with trio.open_nursery() as n:
            for auds in (A, B, C):
                r.start_request(n, auds, got)
            # All three calls are inside the fetcher at once: none has been answered.
            await spin_until(lambda: len(r.sts.calls) == 3, "three concurrent STS calls")
            for auds in (C, A, B):
                await r.answer(auds, HOUR)
    assert len(got) == 3 and not any(g.startswith("unavailable") for g in got)


async def test_the_fetch_uses_the_policy(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_signing_algorithm="ES384", token_duration=900, token_tags=(("team", "payments"),))
    async with r.running() as n:
        await r.miss(n, A, HOUR)
    assert r.sts.calls == [(A, "ES384", 900, (("team", "payments"),))]


async def test_static_set_is_prewarmed_and_readiness_follows_it(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_audiences=("https://z.example", "https://a.example", "https://z.example"))
    static = ("https://a.example", "https://z.example")
    assert not r.sup.ready() and r.sup.snapshot() == []
    async with r.running():
        assert not r.sup.ready()  # started() does not wait for the pre-warm
        assert r.fetching(static)
        await r.answer(static, HOUR)
        assert r.sup.ready()
        assert await r.get_now(static) == "jwt:https://a.example,https://z.example:1"
        (state,) = r.sup.snapshot()
        assert state.static and state.seconds_left == pytest.approx(HOUR, abs=DRIFT)
        await trio.sleep(HOUR - 63 + EPS)
        assert r.fetching(static) and r.sup.ready()  # refreshing in the background, in time
        await r.answer(static, HOUR)
        await trio.sleep(63)
        assert r.sup.ready()
    assert r.rec.fetches[0] == (",".join(static), True, None, True)
    assert len(r.sts.calls) == 2


# ---- background refresh ---------------------------------------------------------------------


async def test_refresh_starts_at_exp_minus_skew_and_the_old_token_serves_meanwhile(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_refresh_skew=60.0)
    async with r.running() as n:
        await r.miss(n, A, HOUR)
        t0 = now()
        await trio.sleep_until(t0 + HOUR - 63 - DRIFT)
        assert not r.fetching(A)
        await trio.sleep_until(t0 + HOUR - 63 + EPS)
        assert r.fetching(A)
        for _ in range(5):  # the refresh hangs: requests get the current token at once
            assert await r.get_now(A) == "jwt:https://a.example:1"
            await trio.sleep(10)
        await r.answer(A, HOUR)
        assert await r.get_now(A) == "jwt:https://a.example:2"
    assert r.rec.fetches == [(A[0], True, None, False), (A[0], True, None, True)]


async def test_outage_shorter_than_the_token_fails_no_request(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aws_outbound_jwt_proxy")
    r = rig(token_refresh_skew=60.0)
    async with r.running() as n:
        await r.miss(n, A, 100.0)
        t0 = now()
        await trio.sleep_until(t0 + 37 + EPS)
        for outcome, backoff in ((UNAVAILABLE, 0.5), (UNAVAILABLE, 1.0)):
            assert r.fetching(A)
            await r.answer(A, outcome)
            failed = now()
            assert await r.get_now(A) == "jwt:https://a.example:1"
            await trio.sleep_until(failed + backoff - EPS)
            assert not r.fetching(A)
            await trio.sleep_until(failed + backoff + EPS)
        await r.answer(A, 100.0)
        assert await r.get_now(A) == "jwt:https://a.example:4"
    assert [f[1] for f in r.rec.fetches] == [True, False, False, True]
    failed_logs = [r for r in caplog.records if r.getMessage() == "token fetch failed"]
    assert [(f.levelno, f.__dict__["transient"]) for f in failed_logs] == [(logging.WARNING, True)]
    assert any(r.getMessage() == "token fetch recovered" for r in caplog.records)


# ---- no valid token -----------------------------------------------------------------------------


async def test_no_valid_token_fails_fast_retries_1_2_4_5_s_then_recovers(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aws_outbound_jwt_proxy")
    r = rig()
    async with r.running() as n:
        await r.miss(n, A, 2.0)
        first = await r.get_now(A)
        await trio.sleep(2)  # expired, and the refresh (at 1 s) is hanging
        assert r.fetching(A)
        got: list[str] = []
        r.start_request(n, A, got)
        await r.answer(A, DENIED)
        await r.settle()
        assert got == ["unavailable:AccessDenied"]
        # A permanent error backs off 30-60 s, but while requests ask for a set
        # with no valid token it is retried after 1 s, 2 s, 4 s, then every 5 s.
        for gap, outcome in ((1.0, DENIED), (2.0, DENIED), (4.0, DENIED), (5.0, DENIED), (5.0, HOUR)):
            failed = now()
            await trio.sleep(0.5)
            assert await r.get_now(A) == "unavailable:AccessDenied"  # at once, no waiting
            await trio.sleep_until(failed + gap - EPS)
            assert not r.fetching(A)
            await trio.sleep_until(failed + gap + EPS)
            assert r.fetching(A)
            await r.answer(A, outcome)
        token = await r.get_now(A)
        assert token.startswith("jwt:") and token != first
    assert len(r.sts.calls) == 7
    text = caplog.text + "".join(json.dumps(rec.__dict__, default=str) for rec in caplog.records)
    assert first not in text and token not in text, "a JWT reached the logs"
    messages = [rec.getMessage() for rec in caplog.records]
    assert messages.count("token fetch failed") == 1, "a persisting error is logged once per change of state"
    assert messages.count("token fetch recovered") == 1


async def test_permanent_error_one_call_and_one_log_for_many_requests(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aws_outbound_jwt_proxy")
    r = rig()
    got: list[str] = []
    async with r.running():
        async with trio.open_nursery() as n:
            for _ in range(50):
                r.start_request(n, A, got)
            await r.answer(A, DENIED)
        for _ in range(2):
            async with trio.open_nursery() as n:
                for _ in range(50):
                    r.start_request(n, A, got)
    assert got == ["unavailable:AccessDenied"] * 150
    assert len(r.sts.calls) == 1
    assert r.rec.fetches == [(A[0], False, "AccessDenied", False)]
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors.count("token fetch failed") == 1


async def test_one_failure_costs_about_a_second_not_a_retry_window(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_audiences=A)
    async with r.running() as n:
        await r.answer(A, DENIED)  # the pre-warm fails; nobody asked yet
        failed = now()
        assert not r.sup.ready()
        assert r.sup.snapshot()[0].error_class == "AccessDenied"
        assert await r.get_now(A) == "unavailable:AccessDenied"
        await trio.sleep_until(failed + 1 - EPS)
        assert await r.get_now(A) == "unavailable:AccessDenied"
        await trio.sleep_until(failed + 1 + EPS)
        got: list[str] = []
        r.start_request(n, A, got)  # due again: this request waits for the retry
        await r.answer(A, HOUR)
        await r.settle()
        assert got == ["jwt:https://a.example:2"] and r.sup.ready()


async def test_throttling_then_success_on_a_cold_cache(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    async with r.running():
        got: list[str] = []
        async with trio.open_nursery() as n:
            r.start_request(n, A, got)
            await r.answer(A, sts.StsError("ThrottlingException", 400, True))
        assert got == ["unavailable:ThrottlingException"]
        failed = now()
        await trio.sleep_until(failed + 1 + EPS)  # throttling: 1 s, not 0.5 s
        assert r.fetching(A)
        await r.answer(A, HOUR)
        assert r.sup.snapshot()[0].seconds_left is not None


async def test_expired_on_arrival_is_an_error(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    async with r.running() as n:
        got: list[str] = []
        r.start_request(n, A, got)
        await r.answer(A, -30.0)
        await r.settle()
        assert got == [f"unavailable:{tokens.EXPIRED_ON_ARRIVAL}"]
        await trio.sleep(0.5 + EPS)
        await r.answer(A, HOUR)
        assert (await r.get_now(A)).startswith("jwt:")


async def test_an_unexpected_fetcher_exception_is_internal(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    r = rig()
    async with r.running() as n:
        got: list[str] = []
        r.start_request(n, A, got)
        await r.answer(A, KeyError("bug"))
        await r.settle()
    assert got == [f"unavailable:{tokens.INTERNAL}"]
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "token fetch raised unexpectedly"]
    assert record.__dict__["exception"] == "KeyError" and record.__dict__["audience"] == A[0]


# ---- the bounded cache ----------------------------------------------------------------------------


async def test_idle_set_is_dropped_and_not_refreshed_static_set_stays(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_cache_idle_ttl=30.0, token_audiences=B, token_refresh_skew=1.0)
    async with r.running() as n:
        await r.answer(B, 100.0)
        await r.miss(n, A, 100.0)
        t0 = now()
        await trio.sleep_until(t0 + 20)
        assert (await r.get_now(A)).startswith("jwt:")  # used: idle from here
        await trio.sleep_until(t0 + 50 - EPS)
        assert r.audiences() == [B[0], A[0]]
        await trio.sleep_until(t0 + 50 + EPS)
        assert r.audiences() == [B[0]]
        assert r.rec.counts[-1] == 1
        await trio.sleep_until(t0 + 100 - 1.05 + EPS)  # the static set is refreshed
        assert r.fetching(B)
        await r.answer(B, 100.0)
        assert [c[0] for c in r.sts.calls].count(A) == 1  # the dropped set was not
        await r.miss(n, A, 100.0)  # asked again: fetched again
        assert [c[0] for c in r.sts.calls].count(A) == 2


async def test_max_entries_evicts_the_least_recently_used(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(token_cache_max_entries=2)
    async with r.running() as n:
        for auds in (A, B):
            await r.miss(n, auds, HOUR)
        assert (await r.get_now(A)).startswith("jwt:")  # A is now more recently used than B
        await r.miss(n, C, HOUR)
        assert r.audiences() == [A[0], C[0]]
        assert max(r.rec.counts) <= 3 and r.rec.counts[-1] == 2


# ---- waiting, cancellation and shutdown -----------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    async with r.running() as n:
        with trio.move_on_after(0.2) as scope:
            await r.sup.get(A)
        assert scope.cancelled_caught
        assert r.fetching(A)  # the fetch it started carries on for everybody else
        got: list[str] = []
        r.start_request(n, A, got)
        await r.answer(A, HOUR)
        await r.settle()
        assert got == ["jwt:https://a.example:1"]
        assert not r.fetching(A)
    assert len(r.sts.calls) == 1


async def test_a_wait_is_bounded_by_upstream_timeout(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(upstream_timeout=0.5)
    async with r.running():
        start = now()
        with pytest.raises(tokens.TokenUnavailable) as info:
            await r.sup.get(A)
        assert info.value.error_class == tokens.TIMEOUT
        assert now() - start == pytest.approx(0.5)
        await r.answer(A, HOUR)  # the late answer still fills the cache
        assert (await r.get_now(A)).startswith("jwt:")


async def test_shutdown_wakes_waiters_and_later_requests_fail_at_once(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig(upstream_timeout=10.0)
    got: list[str] = []
    async with trio.open_nursery() as outer:
        r.start_request(outer, A, got)
        async with trio.open_nursery() as server:
            await server.start(r.sup.run)
            await spin_until(lambda: len(r.sts.calls) == 1, "the fetch hangs in its thread")
            stop = now()
            server.cancel_scope.cancel()  # the hung thread is abandoned, not waited for
        assert now() == stop
    assert got == [f"unavailable:{tokens.SHUTDOWN}"]
    assert await r.get_now(A) == f"unavailable:{tokens.SHUTDOWN}"
    assert not r.sup.snapshot()[0].fetching


async def test_a_request_before_run_waits_for_it(
    autojump_clock: trio.testing.MockClock, rig: Callable[..., Rig]
) -> None:
    r = rig()
    got: list[str] = []
    async with trio.open_nursery() as n:
        r.start_request(n, A, got)
        await trio.sleep(1)
        async with r.running():
            await r.answer(A, HOUR)
    assert got == ["jwt:https://a.example:1"]
