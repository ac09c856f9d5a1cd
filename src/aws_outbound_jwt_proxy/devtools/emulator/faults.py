"""Fault rules set through the admin API (pure): which STS calls fail, wait, or get odd lifetimes.

A rule is a JSON object::

    {"error": "Throttling", "count": 2}           # the next 2 calls fail
    {"latency_ms": 500, "always": true}           # every call waits 0.5 s first
    {"expiration_seconds": -30, "count": 1}       # next token is already expired
    {"error": "AccessDenied", "audience": "https://a.example"}   # only calls for that audience

``POST /_emulator/faults`` takes one rule or a list and replaces the current
rules. Each STS call takes the first matching rule that has uses left; a rule
without ``count`` or ``always`` applies to every matching call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

FIELDS = ("error", "message", "count", "always", "latency_ms", "expiration_seconds", "audience")
MAX_LATENCY_MS = 600_000


@dataclass
class Fault:
    """One rule. ``remaining=None`` means always."""

    error: str | None = None
    message: str | None = None
    remaining: int | None = None
    latency_ms: int = 0
    expiration_seconds: int | None = None
    audience: str | None = None

    def matches(self, audiences: Sequence[str] | None) -> bool:
        if self.remaining == 0:
            return False
        return self.audience is None or (audiences is not None and self.audience in audiences)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _int(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string")
    return value


def parse_rule(doc: object) -> Fault:
    """One rule from its JSON object; ValueError says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("a fault must be a JSON object")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    count = _int(doc, "count")
    always = doc.get("always", False)
    if not isinstance(always, bool):
        raise ValueError("always must be true or false")
    if count is not None and always:
        raise ValueError("give count or always, not both")
    if count is not None and count < 1:
        raise ValueError("count must be >= 1")
    latency = _int(doc, "latency_ms") or 0
    if not 0 <= latency <= MAX_LATENCY_MS:
        raise ValueError(f"latency_ms must be between 0 and {MAX_LATENCY_MS}")
    return Fault(
        error=_str(doc, "error"),
        message=_str(doc, "message"),
        remaining=count,
        latency_ms=latency,
        expiration_seconds=_int(doc, "expiration_seconds"),
        audience=_str(doc, "audience"),
    )


def parse_rules(doc: object) -> list[Fault]:
    """One rule object or a list of them."""
    items = doc if isinstance(doc, list) else [doc]
    return [parse_rule(item) for item in items]


class Faults:
    """The current rules; :meth:`take` picks (and uses up) the rule for one call."""

    def __init__(self) -> None:
        self.rules: list[Fault] = []

    def take(self, audiences: Sequence[str] | None) -> Fault | None:
        """First rule matching a call (``audiences=None`` for actions without audiences)."""
        for rule in self.rules:
            if rule.matches(audiences):
                if rule.remaining is not None:
                    rule.remaining -= 1
                return rule
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [rule.describe() for rule in self.rules]
