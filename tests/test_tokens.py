"""Token supervisor + real boto3 StsFetcher against the project's STS emulator (with fault knobs)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.tokens import sts
from aws_outbound_jwt_proxy.tokens import supervisor as tokens
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.tokens import RecordingObserver

A = ("https://a.example",)
B = ("https://b.example",)
C = ("https://c.example",)


def settings(*flags: str) -> config.Settings:
    return config.load(["--token-duration", "60s", "--token-refresh-skew", "1s", *flags], env={})


@pytest.fixture
def fetcher(sts_fetcher: sts.StsFetcher) -> sts.StsFetcher:
    return sts_fetcher


Recorder = RecordingObserver


@asynccontextmanager
async def running(sup: tokens.Supervisor) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def wait_for(check: Callable[[], bool], limit: float, what: str) -> None:
    """Poll ``check`` until true, failing after ``limit`` seconds."""
    with trio.move_on_after(limit):
        while True:
            if check():
                return
            await trio.sleep(0.02)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


def sts_calls(emu: StsEmulator) -> list[dict[str, Any]]:
    return [c for c in emu.calls() if c.get("action", "GetWebIdentityToken") == "GetWebIdentityToken"]


def claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return doc


async def timed(fn: Callable[[], Awaitable[str]]) -> tuple[float, str]:
    start = trio.current_time()
    value = await fn()
    return trio.current_time() - start, value


# ---- fetch, share, pre-warm ----------------------------------------------


async def test_cold_cache_100_concurrent_requests_make_one_sts_call(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(latency_ms=300, always=True)
    rec = Recorder()
    sup = tokens.Supervisor(settings(), fetcher, rec)
    got: list[str] = []

    async def one() -> None:
        got.append(await sup.get(A))

    async with running(sup):
        async with trio.open_nursery() as n:
            for _ in range(100):
                n.start_soon(one)
    assert len(got) == 100 and len(set(got)) == 1
    calls = sts_calls(sts_emulator)
    assert len(calls) == 1
    assert claims(got[0])["aud"] in (A[0], list(A))
    assert rec.fetches == [(A[0], True, None, False)]
    assert len(rec.misses) == 100 and rec.hits == []


async def test_different_sets_fetch_concurrently(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    sts_emulator.set_faults(latency_ms=800, always=True)
    sup = tokens.Supervisor(settings(), fetcher)
    async with running(sup):
        start = trio.current_time()
        async with trio.open_nursery() as n:
            for auds in (A, B, C):
                n.start_soon(sup.get, auds)
        elapsed = trio.current_time() - start
    assert len(sts_calls(sts_emulator)) == 3
    assert elapsed < 2.0, f"three 0.8 s fetches took {elapsed:.2f}s: not concurrent"


async def test_static_sets_prewarm_and_readiness(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    s = config.load(
        ["--token-audience", "https://z.example", "--token-audience", "https://a.example",
         "--token-audience", "https://z.example"],
        env={},
    )  # fmt: skip
    sts_emulator.set_faults(latency_ms=300, always=True)
    sup = tokens.Supervisor(s, fetcher)
    async with running(sup):
        assert not sup.ready()  # started() does not wait for the pre-warm
        await wait_for(sup.ready, 5, "static set pre-warmed")
        calls = sts_calls(sts_emulator)
        assert len(calls) == 1
        assert calls[0]["audiences"] == ["https://a.example", "https://z.example"]
        # The pre-warmed token answers at once, without another STS call.
        elapsed, _ = await timed(lambda: sup.get(("https://a.example", "https://z.example")))
        assert elapsed < 0.2
        assert len(sts_calls(sts_emulator)) == 1
        (state,) = sup.snapshot()
        assert state.static and state.seconds_left is not None and state.seconds_left > 3000


async def test_not_ready_while_static_fetch_fails(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    sts_emulator.set_faults(error="OutboundWebIdentityFederationDisabledException", always=True)
    sup = tokens.Supervisor(config.load(["--token-audience", "https://a.example"], env={}), fetcher)
    async with running(sup):
        await wait_for(lambda: len(sts_calls(sts_emulator)) >= 1, 5, "pre-warm attempt")
        await wait_for(lambda: sup.snapshot()[0].error_class is not None, 5, "failure recorded")
        assert not sup.ready()
        assert sup.snapshot()[0].error_class == "OutboundWebIdentityFederationDisabledException"
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
        assert info.value.error_class == "OutboundWebIdentityFederationDisabledException"


async def test_request_tags_reach_the_token(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    sup = tokens.Supervisor(settings("--token-tag", "team=payments", "--token-tag", "env=prod"), fetcher)
    async with running(sup):
        jwt = await sup.get(A)
    tags = claims(jwt)["https://sts.amazonaws.com/"]["request_tags"]
    assert tags == {"team": "payments", "env": "prod"}
    (call,) = sts_calls(sts_emulator)
    assert call["duration"] == 60


class Broken(Recorder):
    def cache_miss(self, audience: str) -> None:
        raise RuntimeError("metrics bug")


async def test_a_failing_observer_does_not_stop_tokens(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    sup = tokens.Supervisor(settings(), fetcher, Broken())
    async with running(sup):
        assert sup.ready()  # no static sets: nothing to wait for
        assert isinstance(await sup.get(A), str)
        assert isinstance(await sup.get(A), str)
    assert any(r.getMessage() == "token observer hook failed" for r in caplog.records)


# ---- background refresh --------------------------------------------------


async def test_background_refresh_with_no_request_in_flight(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(expiration_seconds=3, always=True)
    rec = Recorder()
    sup = tokens.Supervisor(settings("--token-refresh-skew", "1s"), fetcher, rec)
    async with running(sup):
        first = await sup.get(A)
        # No request in flight: the supervisor refreshes on its own before exp.
        await wait_for(lambda: len(sts_calls(sts_emulator)) >= 2, 4, "background refresh")
        await wait_for(lambda: len(rec.fetches) >= 2, 2, "refresh result")
        elapsed, second = await timed(lambda: sup.get(A))
    assert second != first
    assert elapsed < 0.2
    assert rec.fetches[1] == (A[0], True, None, True)
    assert rec.hits == [A[0]]


async def test_request_during_slow_refresh_gets_current_token_at_once(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(expiration_seconds=4, count=1)
    sup = tokens.Supervisor(settings("--token-refresh-skew", "3s"), fetcher)
    async with running(sup):
        first = await sup.get(A)
        sts_emulator.set_faults(latency_ms=2500, always=True)  # the refresh will hang 2.5 s
        await wait_for(lambda: sup.snapshot()[0].fetching, 3, "refresh in flight")
        for _ in range(5):
            elapsed, jwt = await timed(lambda: sup.get(A))
            assert jwt == first
            assert elapsed < 0.2, f"request waited {elapsed:.2f}s on a refresh"
        await wait_for(lambda: not sup.snapshot()[0].fetching, 4, "refresh done")
        assert await sup.get(A) != first
    assert len(sts_calls(sts_emulator)) == 2


# ---- failures --------------------------------------------------------------


async def test_outage_shorter_than_token_life_fails_no_request(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aws_outbound_jwt_proxy")
    sts_emulator.set_faults(expiration_seconds=5, count=1)
    sup = tokens.Supervisor(settings("--token-refresh-skew", "3s"), fetcher)
    failures = 0
    async with running(sup):
        first = await sup.get(A)
        # The refresh (at ~2 s) hits a two-call outage, then STS answers again.
        sts_emulator.set_faults(
            {"error": "ServiceUnavailable", "count": 2}, {"expiration_seconds": 60, "always": True}
        )
        deadline = trio.current_time() + 4.5
        latest = first
        while trio.current_time() < deadline:
            try:
                latest = await sup.get(A)
            except tokens.TokenUnavailable:
                failures += 1
            await trio.sleep(0.05)
    assert failures == 0
    assert latest != first, "the refresh never succeeded before the old token expired"
    results = [c["result"] for c in sts_calls(sts_emulator)]
    assert len(results) == 4, results


async def test_outage_past_exp_gives_502_then_recovers(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aws_outbound_jwt_proxy")
    sts_emulator.set_faults(expiration_seconds=3, count=1)
    sup = tokens.Supervisor(settings("--token-refresh-skew", "1s"), fetcher)
    async with running(sup):
        first = await sup.get(A)
        sts_emulator.set_faults(error="ServiceUnavailable", always=True)
        outage_start = trio.current_time()
        errors: list[str] = []
        while not errors:
            try:
                assert await sup.get(A) == first
            except tokens.TokenUnavailable as exc:
                errors.append(exc.error_class)
            assert trio.current_time() - outage_start < 5, "token served past its exp"
            await trio.sleep(0.05)
        assert errors == ["ServiceUnavailable"]
        # With no valid token and a failed attempt, requests get 502 at once (no waiting).
        for _ in range(10):
            start = trio.current_time()
            with pytest.raises(tokens.TokenUnavailable):
                await sup.get(A)
            assert trio.current_time() - start < 0.1
            await trio.sleep(0.2)
        outage_calls = len(sts_calls(sts_emulator)) - 1
        outage_seconds = trio.current_time() - outage_start
        # Bounded: ~1 s doubling backoff, then at most one every 5 s — never per request.
        assert 1 <= outage_calls <= 6, (outage_calls, outage_seconds)

        sts_emulator.clear_faults()
        recovered_at = trio.current_time()
        token = None
        while token is None:
            try:
                token = await sup.get(A)
            except tokens.TokenUnavailable:
                assert trio.current_time() - recovered_at < 6.5, "recovery not noticed within ~5 s"
                await trio.sleep(0.1)
        assert token != first
    text = caplog.text + "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert first not in text and token not in text, "a JWT reached the logs"
    failed = [r for r in caplog.records if r.getMessage() == "token fetch failed"]
    assert len(failed) == 1, "a persisting error is logged once per change of state"
    assert any(r.getMessage() == "token fetch recovered" for r in caplog.records)


async def test_permanent_error_one_call_and_one_log_for_many_requests(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aws_outbound_jwt_proxy")
    sts_emulator.set_faults(error="AccessDenied", always=True)
    rec = Recorder()
    sup = tokens.Supervisor(settings(), fetcher, rec)
    classes: list[str] = []

    async def one() -> None:
        try:
            await sup.get(A)
        except tokens.TokenUnavailable as exc:
            classes.append(exc.error_class)

    async with running(sup):
        for _ in range(3):
            async with trio.open_nursery() as n:
                for _ in range(50):
                    n.start_soon(one)
    assert classes == ["AccessDenied"] * 150
    assert len(sts_calls(sts_emulator)) == 1
    assert rec.fetches == [(A[0], False, "AccessDenied", False)]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR].count(
        "token fetch failed"
    ) == 1
    assert all("not authorized" not in str(r.__dict__) for r in caplog.records), "AWS error text logged"


async def test_throttling_then_success_on_cold_cache(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(error="ThrottlingException", count=1)
    sup = tokens.Supervisor(settings(), fetcher)
    async with running(sup):
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
        assert info.value.error_class == "ThrottlingException"
        await wait_for(lambda: sup.snapshot()[0].seconds_left is not None, 5, "retry after throttling")
        assert isinstance(await sup.get(A), str)
    assert len(sts_calls(sts_emulator)) == 2


async def test_session_duration_escalation_retries_once_shorter(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(error="SessionDurationEscalationException", count=1)
    sup = tokens.Supervisor(config.load(["--token-duration", "1h"], env={}), fetcher)
    async with running(sup):
        jwt = await sup.get(A)
        # Expiry comes from STS's Expiration, not from the requested --token-duration.
        (state,) = sup.snapshot()
        assert state.seconds_left is not None and state.seconds_left <= sts.MIN_DURATION
    first, second = sts_calls(sts_emulator)
    assert first["duration"] == 3600 and second["duration"] == sts.MIN_DURATION
    c = claims(jwt)
    assert c["exp"] - c["iat"] == sts.MIN_DURATION


async def test_transport_error_class(monkeypatch: pytest.MonkeyPatch, sts_emulator: StsEmulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in sts_emulator.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{port}")
    sup = tokens.Supervisor(settings(), sts.build_fetcher(connect_timeout=1.0, read_timeout=1.0))
    async with running(sup):
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
    assert info.value.error_class == "transport"
    assert "127.0.0.1" not in str(info.value)


async def test_expired_on_arrival_is_an_error(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    sts_emulator.set_faults(expiration_seconds=-30, count=1)
    sup = tokens.Supervisor(settings(), fetcher)
    async with running(sup):
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
        assert info.value.error_class == tokens.EXPIRED_ON_ARRIVAL
        await wait_for(lambda: sup.snapshot()[0].seconds_left is not None, 5, "retry")


# ---- bounded cache -----------------------------------------------------------


async def test_idle_set_is_dropped_and_not_refreshed(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(expiration_seconds=3, always=True)
    rec = Recorder()
    s = settings("--token-cache-idle-ttl", "1s", "--token-audience", B[0])
    sup = tokens.Supervisor(s, fetcher, rec)
    async with running(sup):
        await sup.get(A)
        assert {st.audience for st in sup.snapshot()} == {A[0], B[0]}
        await wait_for(lambda: [st.audience for st in sup.snapshot()] == [B[0]], 3, "idle set dropped")
        calls_for_a = len([c for c in sts_calls(sts_emulator) if c["audiences"] == list(A)])
        await wait_for(lambda: len(sts_calls(sts_emulator)) >= 3, 4, "static set refreshed")
        # The static set stays and keeps being refreshed; the dropped one is not refreshed.
        assert [st.audience for st in sup.snapshot()] == [B[0]]
        assert len([c for c in sts_calls(sts_emulator) if c["audiences"] == list(A)]) == calls_for_a == 1
        assert rec.counts[-1] == 1
        # Asking again fetches again.
        await sup.get(A)
        assert len([c for c in sts_calls(sts_emulator) if c["audiences"] == list(A)]) == 2


async def test_max_entries_evicts_least_recently_used(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    rec = Recorder()
    sup = tokens.Supervisor(settings("--token-cache-max-entries", "2"), fetcher, rec)
    async with running(sup):
        await sup.get(A)
        await sup.get(B)
        await sup.get(A)  # A is now more recently used than B
        await sup.get(C)
        assert {st.audience for st in sup.snapshot()} == {A[0], C[0]}
        assert max(rec.counts) <= 3 and rec.counts[-1] == 2
        await sup.get(A)  # still cached
        assert len(sts_calls(sts_emulator)) == 3
        await sup.get(B)  # evicted: fetched again, evicting C
        assert len(sts_calls(sts_emulator)) == 4
        assert {st.audience for st in sup.snapshot()} == {A[0], B[0]}


# ---- cancellation and shutdown ---------------------------------------------------


async def test_cancelled_requester_leaves_nothing_behind(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(latency_ms=600, count=1)
    sup = tokens.Supervisor(settings(), fetcher)
    async with running(sup):
        with trio.move_on_after(0.2) as scope:
            await sup.get(A)
        assert scope.cancelled_caught
        # The fetch it started carries on for everybody else; one STS call in all.
        jwt = await sup.get(A)
        assert isinstance(jwt, str)
        assert not sup.snapshot()[0].fetching
    assert len(sts_calls(sts_emulator)) == 1


async def test_wait_is_bounded_by_upstream_timeout(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(latency_ms=3000, count=1)
    sup = tokens.Supervisor(settings("--upstream-timeout", "500ms"), fetcher)
    async with running(sup):
        start = trio.current_time()
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
        assert info.value.error_class == tokens.TIMEOUT
        assert 0.4 < trio.current_time() - start < 1.0


async def test_shutdown_with_fetch_in_flight_exits_promptly(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(latency_ms=4000, count=1)
    sup = tokens.Supervisor(settings("--upstream-timeout", "10s"), fetcher)
    outcome: list[str] = []

    async def requester() -> None:
        try:
            await sup.get(A)
            outcome.append("token")
        except tokens.TokenUnavailable as exc:
            outcome.append(exc.error_class)

    async with trio.open_nursery() as outer:
        outer.start_soon(requester)
        async with trio.open_nursery() as server:
            await server.start(sup.run)
            await wait_for(lambda: bool(sup.snapshot()) and sup.snapshot()[0].fetching, 3, "fetch in flight")
            stop = trio.current_time()
            server.cancel_scope.cancel()
        shutdown = trio.current_time() - stop
        await wait_for(lambda: bool(outcome), 1, "requester woken")
    assert shutdown < 0.5, f"shutdown took {shutdown:.2f}s with a hung STS call"
    assert outcome == [tokens.SHUTDOWN]
    with pytest.raises(tokens.TokenUnavailable) as info:
        await sup.get(A)
    assert info.value.error_class == tokens.SHUTDOWN


# ---- client construction -----------------------------------------------------------


def _clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_STS",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_no_region_is_a_clear_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_aws_env(monkeypatch)
    with pytest.raises(sts.StsSetupError) as info:
        sts.build_fetcher()
    assert "AWS_REGION" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_regional_endpoint_forced_even_with_legacy_setting(
    monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    _clean_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.setenv("AWS_STS_REGIONAL_ENDPOINTS", "legacy")
    assert sts.build_fetcher().endpoint_url == f"https://sts.{region}.amazonaws.com"


def test_configured_endpoint_is_left_to_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert sts.build_fetcher().endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:10")
    assert sts.build_fetcher().endpoint_url == "http://127.0.0.1:10"


def test_token_repr_hides_the_jwt() -> None:
    token = sts.Token(jwt="eyJhbGciOi.secret.sig", expires_at=time.time())
    assert "secret" not in repr(token)


async def test_one_failure_costs_about_a_second_not_a_retry_window(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    # A permanent error retries every 30-60 s in the background, but a set with no
    # valid token that requests keep asking for is retried within ~1 s of the failure.
    sts_emulator.set_faults(error="AccessDenied", count=1)
    sup = tokens.Supervisor(settings(), fetcher)
    async with running(sup):
        with pytest.raises(tokens.TokenUnavailable) as info:
            await sup.get(A)
        assert info.value.error_class == "AccessDenied"
        failed_at = trio.current_time()
        token = None
        while token is None:
            try:
                token = await sup.get(A)
            except tokens.TokenUnavailable:
                assert trio.current_time() - failed_at < 2.5, "a single failure blocked the set too long"
                await trio.sleep(0.05)
    assert claims(token)["aud"] == A[0]
    assert [c["result"] for c in sts_calls(sts_emulator)] == ["AccessDenied", "ok"]
