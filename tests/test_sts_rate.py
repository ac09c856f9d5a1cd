"""--sts-max-rate: STS calls are budgeted; refreshes go first, new audience sets get 503 + Retry-After."""

from __future__ import annotations

import concurrent.futures
from dataclasses import replace

import httpx

from aws_outbound_jwt_proxy.tokens import core, schedule
from aws_outbound_jwt_proxy.tokens.api import RATE_LIMITED, NullObserver
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.process import ProxyFactory, base_env
from tests.fixtures.tokens import Policy


def test_rate_limit_is_a_token_bucket() -> None:
    limit = schedule.RateLimit(4.0, burst=2)
    assert [limit.take(0.0) for _ in range(3)] == [True, True, False]
    assert limit.wait(0.0) == 0.25
    assert not limit.take(0.2) and limit.take(0.25)
    assert schedule.RateLimit(0).take(0.0) and schedule.RateLimit(0).wait(5.0) == 0.0  # 0: no limit


def test_new_sets_past_the_budget_fail_fast_with_a_retry_time() -> None:
    cache = core.TokenCache(replace(Policy(), sts_max_rate=2.0), NullObserver(), lambda: 0.5)
    misses = [cache.ask((f"https://s{i}.example",), 0.0) for i in range(5)]
    assert all(isinstance(m, core.Miss) for m in misses)
    started = [m for m in misses if isinstance(m, core.Miss) and m.flight is not None]
    limited = [m for m in misses if isinstance(m, core.Miss) and m.error == RATE_LIMITED]
    assert len(started) == 1 and len(limited) == 4  # burst of 1 at 2/s
    assert all(m.flight is None and m.retry_after >= 0.5 for m in limited)


def test_a_postponed_refresh_goes_before_any_new_set() -> None:
    cache = core.TokenCache(replace(Policy(), sts_max_rate=1.0), NullObserver(), lambda: 0.5)
    first = cache.ask(("https://a.example",), 0.0)
    assert isinstance(first, core.Miss) and first.flight is not None
    # The token lives 2 s with a 60 s skew: it is due for refresh 1 s after the fetch (1.1).
    cache.fetched(first.flight, core.Result(jwt="a", exp=2.0), 0.1)
    other = cache.ask(("https://b.example",), 1.1)  # takes the call that came free at 1.0
    assert isinstance(other, core.Miss) and other.flight is not None
    assert cache.on_timer(1.1).fetches == ()  # a's refresh is due, but no call is free: postponed
    late = cache.ask(("https://c.example",), 2.1)  # a call is free again, but the refresh goes first
    assert isinstance(late, core.Miss) and late.error == RATE_LIMITED
    refreshed = cache.on_timer(cache.deadline)
    assert [f.key for f in refreshed.fetches] == ["https://a.example"]


def test_a_burst_of_new_targets_costs_a_bounded_number_of_sts_calls(
    proxy_process: ProxyFactory, sts_emulator: StsEmulator
) -> None:
    sts_emulator.reset_calls()
    env = sts_emulator.subprocess_env(base_env())
    proc = proxy_process(
        ["--upstream-scheme", "http", "--sts-max-rate", "1", "--upstream-timeout", "2s"], env
    )

    def one(i: int) -> httpx.Response:
        return httpx.get(proc.url + "/x", headers={"X-Upstream-Host": f"127.0.0.1.h{i}.invalid"}, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(40)))
    limited = [r for r in answers if r.status_code == 503]
    assert len(limited) >= 30
    assert all(r.headers["retry-after"].isdigit() and "rate limit" in r.text for r in limited)
    calls = [c for c in sts_emulator.calls() if c.get("action") == "GetWebIdentityToken"]
    assert 1 <= len(calls) <= 6, len(calls)  # a burst of 1, then 1/s while the burst lasted
