"""Pure timing and classification rules of the token supervisor (schedule.py, sts.classify)."""

from __future__ import annotations

from typing import Any

import botocore.exceptions
import pytest
import trio
import trio.testing

from aws_outbound_jwt_proxy.tokens import schedule, sts

PERMANENT = [
    "AccessDenied",
    "OutboundWebIdentityFederationDisabled",
    "OutboundWebIdentityFederationDisabledException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "JWTPayloadSizeExceeded",
    "JWTPayloadSizeExceededException",
    "SessionDurationEscalationException",
]
TRANSIENT = ["Throttling", "ThrottlingException", "ServiceUnavailable", "InternalFailure", "transport"]


@pytest.mark.parametrize("code", PERMANENT)
def test_permanent_codes_even_with_5xx_status(code: str) -> None:
    assert not schedule.is_transient(code, 403)
    assert not schedule.is_transient(code, 500)


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_codes(code: str) -> None:
    assert schedule.is_transient(code, 400)


def test_unknown_codes_judged_by_status() -> None:
    assert schedule.is_transient("SomethingNew", 503)
    assert schedule.is_transient("SomethingNew", 429)
    assert schedule.is_transient("SomethingNew", None)
    assert not schedule.is_transient("SomethingNew", 400)


def test_exception_suffix_is_ignored() -> None:
    assert schedule.base_code("AccessDeniedException") == "AccessDenied"
    assert schedule.base_code("AccessDenied") == "AccessDenied"
    assert schedule.base_code("Exception") == "Exception"


def test_error_class_is_label_safe() -> None:
    assert schedule.error_class("AccessDenied") == "AccessDenied"
    assert schedule.error_class(None) == "transport"
    assert schedule.error_class("") == "transport"
    assert schedule.error_class("bad code with spaces") == "unknown"
    assert schedule.error_class("x" * 200) == "unknown"


def test_throttle_detection() -> None:
    assert schedule.is_throttle("Throttling")
    assert schedule.is_throttle("ThrottlingException")
    assert not schedule.is_throttle("AccessDenied")


def test_refresh_at_skew_and_jitter() -> None:
    now, exp, skew = 1000.0, 1000.0 + 3600, 300.0
    assert schedule.refresh_at(now, exp, skew, 0.0) == exp - skew
    # Jitter is at most 10 % of the skew (30 s here), always earlier, never later.
    assert schedule.refresh_at(now, exp, skew, 0.999) == pytest.approx(exp - skew - 29.97)
    # A large skew still jitters by at most 30 s.
    assert schedule.refresh_at(now, exp, 1200.0, 0.999) > exp - 1200.0 - 30.0


def test_refresh_at_short_token_waits_a_quarter_of_its_life() -> None:
    # STS returned a token shorter than the skew: refresh after a quarter of its life,
    # not in a tight loop, and leave three quarters for retries.
    assert schedule.refresh_at(100.0, 160.0, 300.0, 0.5) == pytest.approx(115.0)
    # Skew a bit shorter than the life: exp - skew still wins when it is later.
    assert schedule.refresh_at(100.0, 104.1, 3.0, 0.0) == pytest.approx(101.1)
    # A large skew is honoured as given (refresh at exp - skew, not a quarter of the life).
    assert schedule.refresh_at(0.0, 60.0, 57.0, 0.0) == pytest.approx(3.0)


def test_refresh_at_tiny_token_keeps_a_minimum_gap() -> None:
    assert schedule.refresh_at(100.0, 100.4, 300.0, 0.0) >= 100.0 + schedule.MIN_REFRESH_GAP


def test_backoff_transient_doubles_to_cap() -> None:
    ceilings = [schedule.backoff(n, True, 0.999999) for n in range(1, 10)]
    assert ceilings[:7] == pytest.approx([1, 2, 4, 8, 16, 32, 60], rel=1e-3)
    assert max(ceilings) <= schedule.BACKOFF_CAP
    assert schedule.backoff(1000, True, 0.999999) == pytest.approx(60, rel=1e-3)


def test_backoff_full_jitter_has_a_floor() -> None:
    assert schedule.backoff(5, True, 0.0) == schedule.BACKOFF_FLOOR
    assert schedule.backoff(5, True, 0.5) == pytest.approx(8.0)


def test_backoff_throttling_starts_later() -> None:
    assert schedule.backoff(1, True, 0.999999, throttled=True) == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("failures", [1, 2, 10])
def test_backoff_permanent_is_slow(failures: int) -> None:
    assert schedule.backoff(failures, False, 0.0) == 30.0
    assert schedule.backoff(failures, False, 0.999999) == pytest.approx(60.0, rel=1e-3)


def test_retry_before_exp_is_moved_to_one_last_attempt() -> None:
    # Token valid for 20 more seconds, backoff says 45 s: retry 1 s before exp instead.
    assert schedule.retry_at(100.0, 45.0, 120.0, requested=False) == 119.0


def test_retry_well_before_exp_is_untouched() -> None:
    assert schedule.retry_at(100.0, 4.0, 120.0, requested=False) == 104.0


def test_last_attempt_close_to_now_still_happens_once() -> None:
    assert schedule.retry_at(118.95, 30.0, 120.0, requested=False) == pytest.approx(119.05)


def test_last_attempt_already_made_goes_after_exp() -> None:
    # We are at exp - 1 (the last attempt just failed): no Zeno loop towards exp.
    assert schedule.retry_at(119.0, 30.0, 120.0, requested=False) == 149.0
    # ... but while requests keep asking, no more than 5 s after exp.
    assert schedule.retry_at(119.0, 30.0, 120.0, requested=True) == 125.0


def test_no_valid_token_and_requested_caps_retry_at_5s() -> None:
    assert schedule.retry_at(100.0, 45.0, None, requested=True, failures=4) == 105.0
    assert schedule.retry_at(100.0, 2.0, None, requested=True, failures=4) == 102.0
    # Expired token (exp in the past) is the same as none.
    assert schedule.retry_at(100.0, 45.0, 90.0, requested=True, failures=4) == 105.0


def test_no_valid_token_unrequested_keeps_backoff() -> None:
    assert schedule.retry_at(100.0, 45.0, None, requested=False) == 145.0


def test_pull_in() -> None:
    assert schedule.pull_in(200.0, 100.0, failures=4) == 105.0
    assert schedule.pull_in(102.0, 100.0, failures=4) == 102.0


async def test_outage_call_count_is_bounded_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Simulate a 10-minute outage while requests keep asking: retries stay 5 s apart at most,
    and a permanent error unrequested retries at most every 30 s."""
    assert trio.lowlevel.current_clock() is autojump_clock
    start = trio.current_time()
    attempts = 0
    failures = 0
    while trio.current_time() - start < 600:
        attempts += 1
        failures += 1
        now = trio.current_time()
        delay = schedule.backoff(failures, True, 0.999999)
        await trio.sleep_until(schedule.retry_at(now, delay, None, requested=True, failures=failures))
    assert 600 / schedule.EXPIRED_RETRY_CAP <= attempts <= 600 / schedule.EXPIRED_RETRY_CAP + 10

    start, attempts = trio.current_time(), 0
    while trio.current_time() - start < 600:
        attempts += 1
        now = trio.current_time()
        await trio.sleep_until(schedule.retry_at(now, schedule.backoff(attempts, False, 0.0), None, False))
    assert 20 <= attempts <= 21  # one per 30 s, not a tight loop


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "secret-ish AWS text"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return botocore.exceptions.ClientError(response, "GetWebIdentityToken")


def test_classify_client_error_keeps_code_not_message() -> None:
    err = sts.classify(_client_error("OutboundWebIdentityFederationDisabledException", 403))
    assert (err.code, err.status, err.transient) == (
        "OutboundWebIdentityFederationDisabledException",
        403,
        False,
    )
    assert "secret-ish" not in str(err)
    throttled = sts.classify(_client_error("Throttling", 400))
    assert throttled.transient and throttled.code == "Throttling"
    assert sts.classify(_client_error("InternalFailure", 500)).transient


def test_classify_transport_errors() -> None:
    for exc in (
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
    ):
        err = sts.classify(exc)
        assert (err.code, err.transient) == ("transport", True)


def test_classify_credentials_missing_is_permanent() -> None:
    err = sts.classify(botocore.exceptions.NoCredentialsError())
    assert (err.code, err.transient) == ("NoCredentials", False)


def test_no_token_retry_cap_grows_from_one_second_to_five() -> None:
    assert [schedule.no_token_cap(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    # A request right after a permanent failure: the retry is pulled in to 1 s, not 30-60 s.
    assert schedule.pull_in(100.0 + 45.0, 100.0, failures=1) == 101.0
    assert schedule.retry_at(100.0, 45.0, None, requested=True, failures=3) == 104.0
