"""Run the proxy: one root nursery owning listeners and the token supervisor."""

from __future__ import annotations

from collections.abc import Sequence

from . import config, flags, logs


def main(argv: Sequence[str]) -> int:
    try:
        settings = config.load(argv)
    except flags.ConfigError as exc:
        flags.fail(config.PROG, exc)
    logs.setup(settings.log_level, settings.log_format)
    raise NotImplementedError("serving lands with the core proxy")
