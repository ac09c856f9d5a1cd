"""Go-style duration strings (``500ms``, ``1h30m``) to seconds."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")  # ASCII digits only, as Go
MAX_SECONDS = (2**63 - 1) / 1e9  # Go durations are int64 nanoseconds (~292 years)


def parse_duration(text: str) -> float:
    """Parse a Go duration (``time.ParseDuration`` syntax) into seconds.

    Raises ``ValueError`` with a short reason on bad input.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 30s, 5m, 1h30m)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    if total > MAX_SECONDS:
        raise ValueError(f"duration {text!r} out of range")
    return sign * total
