"""Token supervisor + real boto3 StsFetcher against the project's STS emulator, end to end.

A few tests on real sockets: one STS call for a stampede, pre-warm, request
tags, SessionDurationEscalation, transport errors, a background refresh and an
outage ridden through. The cache's rules are tested with plain floats in
test_token_core.py and the driver's timing in virtual time in test_token_driver.py.
"""

from __future__ import annotations

import base64
import json
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


def settings(*flags: str) -> config.Settings:
    return config.load(["--token-duration", "60s", "--token-refresh-skew", "1s", *flags], env={})


@pytest.fixture
def fetcher(sts_fetcher: sts.StsFetcher) -> sts.StsFetcher:
    return sts_fetcher


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
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, token_observer: RecordingObserver
) -> None:
    sts_emulator.set_faults(latency_ms=300, always=True)
    rec = token_observer
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


async def test_request_tags_reach_the_token(sts_emulator: StsEmulator, fetcher: sts.StsFetcher) -> None:
    sup = tokens.Supervisor(settings("--token-tag", "team=payments", "--token-tag", "env=prod"), fetcher)
    async with running(sup):
        jwt = await sup.get(A)
    tags = claims(jwt)["https://sts.amazonaws.com/"]["request_tags"]
    assert tags == {"team": "payments", "env": "prod"}
    (call,) = sts_calls(sts_emulator)
    assert call["duration"] == 60


# ---- background refresh --------------------------------------------------


async def test_background_refresh_with_no_request_in_flight(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher, token_observer: RecordingObserver
) -> None:
    sts_emulator.set_faults(expiration_seconds=2, always=True)
    rec = token_observer
    sup = tokens.Supervisor(settings("--token-refresh-skew", "1s"), fetcher, rec)
    async with running(sup):
        first = await sup.get(A)
        # No request in flight: the supervisor refreshes on its own before exp (here after 1 s).
        await wait_for(lambda: len(rec.fetches) >= 2, 3, "background refresh")
        elapsed, second = await timed(lambda: sup.get(A))
    assert second != first
    assert elapsed < 0.2
    assert len(sts_calls(sts_emulator)) == 2
    assert rec.fetches[1] == (A[0], True, None, True)
    assert rec.hits == [A[0]]


# ---- failures --------------------------------------------------------------


async def test_outage_shorter_than_token_life_fails_no_request(
    sts_emulator: StsEmulator, fetcher: sts.StsFetcher
) -> None:
    sts_emulator.set_faults(expiration_seconds=3, count=1)
    sup = tokens.Supervisor(settings("--token-refresh-skew", "2s"), fetcher)
    failures = 0
    async with running(sup):
        first = await sup.get(A)
        # The refresh (after 1 s) hits an outage; the retry (before exp - 1 s) gets a token.
        sts_emulator.set_faults(
            {"error": "ServiceUnavailable", "count": 1}, {"expiration_seconds": 60, "always": True}
        )
        deadline = trio.current_time() + 3.5  # past the first token's exp
        latest = first
        while latest == first and trio.current_time() < deadline:
            try:
                latest = await sup.get(A)
            except tokens.TokenUnavailable:
                failures += 1
            await trio.sleep(0.05)
    assert failures == 0
    assert latest != first, "the refresh never succeeded before the old token expired"
    assert [c["result"] for c in sts_calls(sts_emulator)] == ["ok", "ServiceUnavailable", "ok"]


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
