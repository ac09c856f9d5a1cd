"""Pure token timing rules: error classification, refresh time, retry backoff.

No I/O, no clocks, no randomness of its own: callers pass ``now`` (seconds on
one clock) and a uniform random number in [0, 1), so every rule is a plain
function that unit tests can pin down exactly.
"""

from __future__ import annotations

import math
import re

# Codes compared with any trailing "Exception" removed (STS sends both forms).
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "OutboundWebIdentityFederationDisabled",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "JWTPayloadSizeExceeded",
        "SessionDurationEscalation",
        "ValidationError",
        "InvalidParameter",
        "NoCredentials",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "TooManyRequests",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "RequestTimeout",
        "IDPCommunicationError",
        "PriorRequestNotComplete",
        "transport",
        "timeout",
    }
)

TRANSPORT = "transport"  # connect/read failures, timeouts, TLS errors: no AWS code
UNKNOWN = "unknown"

BACKOFF_BASE = 1.0  # first transient retry within ~1 s
BACKOFF_CAP = 60.0  # transient retries never wait longer than this
BACKOFF_FLOOR = 0.1  # full jitter, but never a zero-delay retry
PERMANENT_MIN = 30.0  # permanent errors retry slowly: 30..60 s
PERMANENT_MAX = 60.0
THROTTLE_BASE = 2.0  # throttling starts one doubling later than other transient errors
EXPIRED_RETRY_CAP = 5.0  # no valid token and requests asking: retry at least this often
LAST_TRY_MARGIN = 1.0  # "one last attempt" lands this long before exp
REFRESH_JITTER_FRACTION = 0.1  # refresh up to 10 % of the skew early ...
REFRESH_JITTER_MAX = 30.0  # ... but at most 30 s
MIN_REFRESH_GAP = 1.0  # never refresh sooner than this after a fetch
SHORT_TOKEN_FRACTION = 0.25  # a token shorter than the skew is refreshed after this part of its life

_CODE_CHARS = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def base_code(code: str) -> str:
    """``FooException`` and ``Foo`` are the same error for classification."""
    if code.endswith("Exception") and len(code) > len("Exception"):
        return code[: -len("Exception")]
    return code


def error_class(code: str | None) -> str:
    """A label-safe error class: the AWS code as sent, ``transport`` when none."""
    if not code:
        return TRANSPORT
    return code if _CODE_CHARS.match(code) else UNKNOWN


def is_transient(code: str, status: int | None) -> bool:
    """Transient: throttling, 5xx, transport, timeouts. Permanent: policy, credentials, payload.

    Codes we do not know are judged by status: 5xx / 429 / none → transient,
    other 4xx → permanent (a client error does not fix itself quickly).
    """
    base = base_code(code)
    if base in PERMANENT_CODES:
        return False
    if base in TRANSIENT_CODES or base.startswith("Throttl"):
        return True
    if status is None:
        return True
    return status >= 500 or status == 429


def is_throttle(code: str) -> bool:
    base = base_code(code)
    return base.startswith("Throttl") or base in ("TooManyRequests", "RequestLimitExceeded")


def refresh_at(now: float, exp: float, skew: float, rand: float) -> float:
    """When to refresh a token fetched at ``now`` that expires at ``exp``.

    ``exp - skew`` minus a small jitter (up to 10 % of the skew, at most 30 s)
    so many sets fetched together do not refresh in lockstep. A token that
    arrives already inside the skew window (STS may cut it to the caller's
    session) is refreshed a quarter of the way through its life, leaving the
    rest for retries; never sooner than 1 s after the fetch, so a short-lived
    token never causes a tight loop.
    """
    jitter = rand * min(skew * REFRESH_JITTER_FRACTION, REFRESH_JITTER_MAX)
    at = exp - skew - jitter
    if at <= now:  # arrived already inside the skew window: a quarter of its life
        at = now + (exp - now) * SHORT_TOKEN_FRACTION
    return max(at, now + MIN_REFRESH_GAP)


def backoff(failures: int, transient: bool, rand: float, throttled: bool = False) -> float:
    """Delay before retry number ``failures`` (1 = first retry after one failure).

    Transient: exponential with full jitter, ~1 s doubling to a 60 s cap.
    Permanent: 30..60 s whatever the count.
    """
    if not transient:
        return PERMANENT_MIN + rand * (PERMANENT_MAX - PERMANENT_MIN)
    base = THROTTLE_BASE if throttled else BACKOFF_BASE
    ceiling = min(BACKOFF_CAP, base * 2.0 ** min(max(failures - 1, 0), 30))
    return max(BACKOFF_FLOOR, rand * ceiling)


def retry_at(now: float, delay: float, exp: float | None, requested: bool, failures: int = 1) -> float:
    """Absolute time of the next attempt after a failure at ``now``.

    ``exp`` is the expiry of the token still held (None if none). While it is
    valid, a retry that would land after it is moved to just before it: one
    last attempt while the token can still be served. Once no valid token
    remains and requests keep asking (``requested``), retries come after at
    most :func:`no_token_cap` (1 s, 2 s, 4 s, then 5 s) so recovery is noticed
    within seconds.
    """
    at = now + delay
    if exp is not None and now < exp:
        last = exp - LAST_TRY_MARGIN
        if at > last and now < last:  # past ``last`` means the last attempt was this one
            at = max(last, now + BACKOFF_FLOOR)
        if at >= exp and requested:
            at = min(at, exp + EXPIRED_RETRY_CAP)
        return at
    if requested:
        at = min(at, now + no_token_cap(failures))
    return at


def no_token_cap(failures: int) -> float:
    """Longest wait before retrying a set that has no valid token while requests ask for it.

    1 s after the first failure, then 2 s, 4 s, capped at 5 s: a passing error
    costs requests about a second, a lasting one at most one call per set per 5 s.
    """
    return min(EXPIRED_RETRY_CAP, BACKOFF_BASE * 2.0 ** min(max(failures - 1, 0), 8))


def pull_in(due: float, failed_at: float, failures: int = 1) -> float:
    """A request found no valid token: retry at most :func:`no_token_cap` after the last failure."""
    return min(due, failed_at + no_token_cap(failures))


class RateLimit:
    """A token bucket for STS calls: ``rate`` per second, up to ``burst`` at once. Pure.

    ``rate`` 0 means no limit. ``now`` is any monotonic clock in seconds.
    """

    def __init__(self, rate: float, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate / 4)))
        self._tokens = self.burst
        self._at = -math.inf

    def _refill(self, now: float) -> None:
        if now > self._at:
            elapsed = now - self._at if self._at > -math.inf else math.inf
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Spend one call if one is available now."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until :meth:`take` will succeed (0 when it would now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return max(0.0, (1.0 - self._tokens) / self.rate)
