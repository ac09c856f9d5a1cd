"""Run one server task until SIGTERM or SIGINT, then cancel it: the sub-commands' main loop."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio


def run(
    log: logging.Logger,
    serve: Callable[..., Awaitable[object]],
    options: object,
    *,
    addr: str,
    errors: tuple[type[Exception], ...],
    failed: str,
) -> int:
    """Exit status of :func:`serve_until_signal`: 0, or 1 after logging ``failed`` for one of ``errors``."""
    status = 0
    try:
        trio.run(serve_until_signal, log, serve, options)
    except* errors as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        log.error(failed, extra={"addr": addr, "error": str(error)})
        status = 1
    return status


async def serve_until_signal(
    log: logging.Logger, serve: Callable[..., Awaitable[object]], *args: object
) -> None:
    """``nursery.start(serve, *args)``; the first SIGTERM/SIGINT logs ``shutting down`` and cancels it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope, log)
        await nursery.start(serve, *args)


async def _cancel_on_signal(scope: trio.CancelScope, log: logging.Logger) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            scope.cancel()
            return
