"""Parse functions for flag tables (text → typed value), and the log flags every command shares.

Each function raises ``ValueError`` with a short reason; :func:`.flags.parse`
prefixes it with the flag or env var the text came from.
"""

from __future__ import annotations

from collections.abc import Callable

from .durations import parse_duration
from .flags import Flag

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("json", "text")


def text(value: str) -> str:
    return value.strip()


def boolean(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"invalid boolean {value!r} (use true or false)")


def positive_int(value: str) -> int:
    v = value.strip()
    if not v.isdigit() or int(v) <= 0:
        raise ValueError(f"must be a positive integer, got {v!r}")
    return int(v)


def duration(
    *, above: float | None = None, at_least: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    """A Go duration in seconds, with bounds: ``above`` exclusive, ``at_least``/``at_most`` inclusive."""

    def parse(value: str) -> float:
        seconds = parse_duration(value)
        if above is not None and seconds <= above:
            raise ValueError(f"must be > {show(above)}, got {value.strip()!r}")
        low_ok = at_least is None or seconds >= at_least
        high_ok = at_most is None or seconds <= at_most
        if not (low_ok and high_ok):
            if at_least is not None and at_most is not None:
                limits = f"between {show(at_least)} and {show(at_most)} inclusive"
            elif at_least is not None:
                limits = f">= {show(at_least)}"
            else:
                limits = f"<= {show(at_most or 0)}"
            raise ValueError(f"must be {limits}, got {value.strip()!r}")
        return seconds

    return parse


def show(seconds: float) -> str:
    """``3600`` → ``1h``, ``90`` → ``90s``: a duration for a message, in the largest whole unit."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def listen_addr(value: str) -> tuple[str, int]:
    """``host:port`` / ``:port`` / ``[::1]:port`` → (host, port); ``""`` host = all interfaces."""
    v = value.strip()
    if not v:
        raise ValueError("must not be empty (use host:port, e.g. :8080)")
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or not v[end + 1 :].startswith(":"):
            raise ValueError(f"invalid address {value!r} (use [v6addr]:port)")
        host, port_s = v[1:end], v[end + 2 :]
    else:
        if ":" not in v:
            raise ValueError(f"invalid address {value!r} (missing :port)")
        host, _, port_s = v.rpartition(":")
        if ":" in host:
            raise ValueError(f"invalid address {value!r} (bracket IPv6 hosts)")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    return host, int(port_s)


def log_level(value: str) -> str:
    level = value.strip().lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ValueError(f"must be debug, info, warn or error, got {level!r}")
    return level


def log_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"must be json or text, got {fmt!r}")
    return fmt


def log_level_flag(
    default: str = "info", help: str = "debug, info, warn or error", *, no_env: bool = False
) -> Flag[str]:
    return Flag("log-level", default, log_level, help, no_env=no_env)


def log_flags(level: str = "info") -> tuple[Flag[str], Flag[str]]:
    """``--log-level`` and ``--log-format``, the same for every command (env names may be prefixed)."""
    return (
        log_level_flag(level),
        Flag("log-format", "json", log_format, "json (one object per line) or text (key=value)"),
    )
