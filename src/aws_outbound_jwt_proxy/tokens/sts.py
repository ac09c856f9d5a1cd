"""STS GetWebIdentityToken through boto3: one client, one blocking call per fetch.

:func:`build_fetcher` builds the client once (regional endpoint unless an
endpoint is configured, botocore retries off, short timeouts). :meth:`StsFetcher.fetch`
is synchronous (the supervisor runs it in a worker thread) and turns every
failure into :class:`StsError` carrying only the AWS error code, the HTTP status
and whether a retry soon could help — never AWS error text or token material.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from . import schedule

log = logging.getLogger("aws_outbound_jwt_proxy.sts")

GLOBAL_ENDPOINT_HOSTS = ("sts.amazonaws.com",)
MIN_DURATION = 60
ESCALATION_MARGIN = 30  # seconds kept between the token's exp and the session's end


@dataclass(frozen=True)
class Token:
    """A JWT and its expiry (epoch seconds, from STS's Expiration)."""

    jwt: str = field(repr=False)
    expires_at: float


class StsError(Exception):
    """A failed GetWebIdentityToken call. ``str()`` is the code only."""

    def __init__(self, code: str, status: int | None, transient: bool) -> None:
        super().__init__(code)
        self.code = code
        self.status = status
        self.transient = transient


class StsSetupError(Exception):
    """The STS client cannot be built (e.g. no region). The message is one line for the CLI."""


def _error(code: str | None, status: int | None) -> StsError:
    cls = schedule.error_class(code)
    return StsError(cls, status, schedule.is_transient(cls, status))


def classify(exc: Exception) -> StsError:
    """Map a boto3/botocore exception to :class:`StsError` (AWS code, or ``transport``)."""
    if isinstance(exc, StsError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        return _error(str(err.get("Code") or "") or None, status if isinstance(status, int) else None)
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return StsError("NoCredentials", None, False)
    if isinstance(exc, botocore.exceptions.CredentialRetrievalError):
        return StsError("CredentialRetrieval", None, True)
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return StsError("InvalidParameter", None, False)
    # HTTPClientError / ConnectionError family: connect, read timeouts, resets, TLS.
    return StsError(schedule.TRANSPORT, None, True)


class StsFetcher:
    """Calls GetWebIdentityToken on one boto3 STS client (thread-safe for calls)."""

    def __init__(self, client: Any, session_expiry: Callable[[], float | None] | None = None) -> None:
        self.client = client
        self._session_expiry = session_expiry or (lambda: None)

    @property
    def endpoint_url(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _call(
        self, audiences: Sequence[str], algorithm: str, duration: int, tags: Sequence[tuple[str, str]]
    ) -> Token:
        kwargs: dict[str, Any] = {
            "Audience": list(audiences),
            "SigningAlgorithm": algorithm,
            "DurationSeconds": duration,
        }
        if tags:
            kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in tags]
        try:
            resp = self.client.get_web_identity_token(**kwargs)
        except Exception as exc:
            raise classify(exc) from None
        jwt = resp.get("WebIdentityToken")
        expiration = resp.get("Expiration")
        if not isinstance(jwt, str) or not jwt or not isinstance(expiration, datetime):
            raise StsError("InvalidResponse", None, True)
        return Token(jwt=jwt, expires_at=expiration.timestamp())

    def fetch(
        self, audiences: Sequence[str], algorithm: str, duration: int, tags: Sequence[tuple[str, str]]
    ) -> Token:
        """One token, or :class:`StsError`. Blocking: run it in a worker thread.

        On SessionDurationEscalation it retries once with the duration clamped
        to what the caller's own session still allows.
        """
        try:
            return self._call(audiences, algorithm, duration, tags)
        except StsError as err:
            if schedule.base_code(err.code) != "SessionDurationEscalation":
                raise
            clamped = self.allowed_duration(duration)
            if clamped >= duration:
                raise
            log.warning(
                "token duration exceeds the caller's session; retrying shorter",
                extra={"requested_seconds": duration, "retry_seconds": clamped},
            )
            return self._call(audiences, algorithm, clamped, tags)

    def allowed_duration(self, duration: int) -> int:
        """The longest duration (60..duration) the caller's session allows; 60 when unknown."""
        expiry = self._session_expiry()
        if expiry is None:
            return MIN_DURATION
        left = int(expiry - time.time()) - ESCALATION_MARGIN
        return max(MIN_DURATION, min(duration, left))


def _region(session: boto3.session.Session) -> str:
    region = os.environ.get("AWS_REGION", "").strip() or (session.region_name or "").strip()
    if not region:
        raise StsSetupError(
            "no AWS region configured: set AWS_REGION (or AWS_DEFAULT_REGION / a profile region); "
            "GetWebIdentityToken needs the regional STS endpoint"
        )
    return region


def _regional_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sts.{region}.{suffix}"


def _session_expiry(session: boto3.session.Session) -> Callable[[], float | None]:
    def expiry() -> float | None:
        creds = session.get_credentials()
        when = getattr(creds, "_expiry_time", None)  # RefreshableCredentials only
        return when.timestamp() if isinstance(when, datetime) else None

    return expiry


def build_fetcher(
    *, connect_timeout: float = 3.0, read_timeout: float = 10.0, max_connections: int = 10
) -> StsFetcher:
    """Build the STS client once. Raises :class:`StsSetupError` when no region is configured.

    The endpoint is the regional one (``https://sts.<region>.amazonaws.com``):
    the global endpoint does not serve GetWebIdentityToken. An endpoint set
    through ``AWS_ENDPOINT_URL_STS`` / ``AWS_ENDPOINT_URL`` / the profile is
    left to botocore. botocore's retries are off: the supervisor backs off.
    """
    session = boto3.session.Session()
    region = _region(session)
    cfg = botocore.config.Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max_connections,
    )
    client = session.client("sts", region_name=region, config=cfg)
    host = str(client.meta.endpoint_url).split("://", 1)[-1].rstrip("/")
    if host in GLOBAL_ENDPOINT_HOSTS:
        # No endpoint configured and botocore picked the global one (legacy
        # setting or "aws-global"): force the regional endpoint.
        client = session.client(
            "sts", region_name=region, config=cfg, endpoint_url=_regional_endpoint(region)
        )
    return StsFetcher(client, _session_expiry(session))
