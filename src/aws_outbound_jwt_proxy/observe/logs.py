"""Structured logging on stderr: one JSON object per line, or key=value text.

Call :func:`setup` once at start-up. Fields go in ``extra=``:

    log.info("request", extra={"method": "GET", "status": 200})

Everything else that logs through :mod:`logging` (hypercorn's error log,
botocore) goes through the same formatter, so in ``json`` mode every stderr
line is one JSON object. Nothing here ever receives a token or credential:
callers log audiences, targets and error codes, never values.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return str(record.msg)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _timestamp(record),
            "level": _LEVEL_NAMES.get(record.levelno, "info"),
            "logger": record.name,
            "msg": _message(record).strip(),
        }
        doc.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def _text_value(value: Any) -> str:
    s = str(value)
    if s == "" or any(c.isspace() or c in '"=' for c in s):
        return json.dumps(s)
    return s


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record),
            _LEVEL_NAMES.get(record.levelno, "info").upper(),
            _message(record).strip(),
        ]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


def formatter(fmt: str) -> logging.Formatter:
    return JSONFormatter() if fmt == "json" else TextFormatter()


class EveryInterval(logging.Filter):
    """Let one record through per ``interval`` seconds; the next one says how many were held back.

    For repeated identical failures such as ``accept returned EMFILE`` (trio retries
    ten times a second while the process is out of file descriptors): one line per
    interval with a count instead of a traceback every 100 ms. The traceback is dropped.
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._next = -math.inf
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now < self._next:
            self._held += 1
            return False
        self._next = now + self.interval
        record.exc_info, record.exc_text = None, None
        record.__dict__["repeated"] = self._held
        self._held = 0
        return True


ACCEPT_ERRORS = logging.getLogger("trio.serve_listeners")


def setup(level: str = "info", fmt: str = "json") -> None:
    """Route the root logger (and so hypercorn's and botocore's) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # botocore at debug logs signed request headers; keep it quiet always.
    for noisy in ("botocore", "boto3", "urllib3", "hpack", "h2", "httpcore", "httpx"):
        logging.getLogger(noisy).setLevel(max(LEVELS[level], logging.WARNING))
    if not any(isinstance(f, EveryInterval) for f in ACCEPT_ERRORS.filters):
        ACCEPT_ERRORS.addFilter(EveryInterval())
    for name in ("hypercorn.error", "hypercorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
