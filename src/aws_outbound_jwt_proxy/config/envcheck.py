"""Environment variables that look like a misspelt proxy setting (``TOKEN_TAG`` for ``TOKEN_TAGS``).

An unknown variable is silently ignored, so a typo in a deployment manifest
would otherwise leave a setting at its default without a word. The proxy
logs one warning per such variable at start-up; :func:`lookalikes` finds them.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Collection, Iterable

from .settings import PROXY_FLAGS

CUTOFF = 0.85  # difflib ratio: TOKEN_TAG/TOKEN_TAGS 0.95 warns, UPSTREAM_PORT/UPSTREAM_HOST 0.846 does not
# The helper commands' own variables (STS_EMULATOR_LOG_LEVEL, ...) and the AWS chain's are not typos.
OTHER_PREFIXES = ("STS_EMULATOR_", "ECHO_UPSTREAM_", "AWS_")
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

KNOWN: frozenset[str] = frozenset(row.env for row in PROXY_FLAGS if not row.no_env)


def _words(known: Iterable[str]) -> frozenset[str]:
    """The leading word of each known name: LISTEN, UPSTREAM, HOST, TOKEN, LOG, TLS, METRICS, ..."""
    return frozenset(name.split("_", 1)[0] for name in known)


def lookalikes(names: Iterable[str], known: Collection[str] = KNOWN) -> list[tuple[str, str]]:
    """``(name, closest known name)`` for each unknown upper-case name that is nearly a known one.

    Only names containing one of the known names' leading words are compared,
    so unrelated variables (``PATH``, ``HOSTNAME``) never cost a comparison or a warning.
    """
    words = _words(known)
    out: list[tuple[str, str]] = []
    for name in sorted(set(names)):
        if name in known or not _NAME.fullmatch(name) or name.startswith(OTHER_PREFIXES):
            continue
        if not any(word in name for word in words):
            continue
        match = difflib.get_close_matches(name, known, n=1, cutoff=CUTOFF)
        if match:
            out.append((name, match[0]))
    return out


def warn(names: Iterable[str], log: logging.Logger) -> list[tuple[str, str]]:
    """Log one warning per look-alike variable (call after logging is set up); returns them."""
    found = lookalikes(names)
    for name, known in found:
        log.warning(
            f"unknown environment variable {name} is ignored; did you mean {known}?",
            extra={"variable": name, "did_you_mean": known},
        )
    return found
