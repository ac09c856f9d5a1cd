"""Query-protocol parameters → a validated GetWebIdentityToken request (pure; errors are StsError).

botocore sends lists as ``Audience.member.1=...`` and tag pairs as
``Tags.member.1.Key`` / ``Tags.member.1.Value``. Limits follow the STS model:
1..10 audiences of 1..1000 characters, DurationSeconds 60..3600 (default 300),
SigningAlgorithm one of the proxy's ``ALGORITHMS`` (required), at most 50 tags.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ...config.settings import ALGORITHMS
from .errors import StsError

VERSION = "2011-06-15"
DEFAULT_DURATION = 300
MIN_DURATION, MAX_DURATION = 60, 3600
MAX_AUDIENCES, MAX_AUDIENCE_CHARS = 10, 1000
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 50, 128, 256
_TAG_CHARS = re.compile(r"[\w\s.:/=+\-@]*")


@dataclass(frozen=True)
class TokenRequest:
    """A valid GetWebIdentityToken call."""

    audiences: tuple[str, ...]
    duration: int
    algorithm: str
    tags: tuple[tuple[str, str], ...] = ()


def members(params: Mapping[str, str], name: str) -> list[str]:
    """``Name.member.N`` values ordered by N (``Name.member.N.Field`` entries are not included)."""
    prefix = f"{name}.member."
    found: list[tuple[int, str]] = []
    for key, value in params.items():
        index = key.removeprefix(prefix)
        if key.startswith(prefix) and index.isdigit():
            found.append((int(index), value))
    return [value for _, value in sorted(found)]


def tag_members(params: Mapping[str, str]) -> list[tuple[str | None, str | None]]:
    """``Tags.member.N.Key/Value`` pairs ordered by N; a missing half is None."""
    pairs: dict[int, dict[str, str]] = {}
    for key, value in params.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["Tags", "member"] and parts[2].isdigit():
            if parts[3] in ("Key", "Value"):
                pairs.setdefault(int(parts[2]), {})[parts[3]] = value
    return [(pair.get("Key"), pair.get("Value")) for _, pair in sorted(pairs.items())]


def _invalid(what: str, value: object, constraint: str) -> StsError:
    shown = "null" if value is None else repr(value)
    return StsError(
        "ValidationError",
        f"1 validation error detected: Value {shown} at '{what}' failed to satisfy constraint: {constraint}",
    )


def action(params: Mapping[str, str]) -> str:
    """The ``Action`` name; MissingAction or InvalidParameterValue (wrong Version) otherwise."""
    name = params.get("Action", "")
    if not name:
        raise StsError("MissingAction", "Missing Action")
    version = params.get("Version", VERSION)
    if version != VERSION:
        raise StsError("InvalidParameterValue", f"Unsupported Version {version!r}; use {VERSION}")
    return name


def token_request(params: Mapping[str, str]) -> TokenRequest:
    """Validate the GetWebIdentityToken parameters; ValidationError on the first problem."""
    audiences = members(params, "Audience")
    if not audiences:
        raise _invalid("audience", None, "Member must not be null")
    if len(audiences) > MAX_AUDIENCES:
        raise _invalid(
            "audience",
            f"{len(audiences)} items",
            f"Member must have length less than or equal to {MAX_AUDIENCES}",
        )
    for audience in audiences:
        if not 1 <= len(audience) <= MAX_AUDIENCE_CHARS:
            raise _invalid(
                "audience.member",
                audience[:40],
                f"Member must have length between 1 and {MAX_AUDIENCE_CHARS}",
            )

    algorithm = params.get("SigningAlgorithm")
    if algorithm not in ALGORITHMS:
        constraint = f"Member must be {' or '.join(ALGORITHMS)}"
        if algorithm is None:
            constraint = "Member must not be null"
        raise _invalid("signingAlgorithm", algorithm, constraint)

    raw_duration = params.get("DurationSeconds")
    duration = DEFAULT_DURATION
    if raw_duration is not None:
        if not raw_duration.strip().lstrip("-").isdigit():
            raise _invalid("durationSeconds", raw_duration, "Member must be an integer")
        duration = int(raw_duration)
        if not MIN_DURATION <= duration <= MAX_DURATION:
            raise _invalid(
                "durationSeconds",
                duration,
                f"Member must have value between {MIN_DURATION} and {MAX_DURATION}",
            )

    if params.get("SubjectMode", "AWSIdentity") != "AWSIdentity":
        raise StsError("ValidationError", "The emulator supports only SubjectMode AWSIdentity")
    if "Scope" in params:
        raise StsError("ValidationError", "Scope can be used only with SubjectMode OriginIdentity")

    return TokenRequest(tuple(audiences), duration, algorithm, _tags(params))


def _tags(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    pairs = tag_members(params)
    if len(pairs) > MAX_TAGS:
        raise _invalid(
            "tags", f"{len(pairs)} items", f"Member must have length less than or equal to {MAX_TAGS}"
        )
    tags: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in pairs:
        if key is None:
            raise _invalid("tags.member.key", None, "Member must not be null")
        if value is None:
            raise _invalid("tags.member.value", None, "Member must not be null")
        if not 1 <= len(key) <= MAX_TAG_KEY or not _TAG_CHARS.fullmatch(key):
            raise _invalid(
                "tags.member.key", key, f"Member must be 1..{MAX_TAG_KEY} letters, digits, _.:/=+-@"
            )
        if len(value) > MAX_TAG_VALUE or not _TAG_CHARS.fullmatch(value):
            raise _invalid(
                "tags.member.value", value, f"Member must be 0..{MAX_TAG_VALUE} letters, digits, _.:/=+-@"
            )
        if key.lower() in seen:
            raise StsError("ValidationError", f"Duplicate tag key {key!r} (tag keys are case-insensitive)")
        seen.add(key.lower())
        tags.append((key, value))
    return tuple(tags)
