"""``hypercorn --worker-class trio aws_outbound_jwt_proxy.asgi:app`` — configured from env.

The same app as the console script. Here hypercorn owns the proxy sockets and
the process, so the token supervisor and the metrics listener run in the app's
lifespan nursery. With ``-w N`` every worker binds the metrics address with
SO_REUSEPORT; set ``PROMETHEUS_MULTIPROC_DIR`` so any worker's scrape covers all.

A start-up failure is one line on stderr and a non-zero exit of the process
that loads the app, never a traceback: 2 for a configuration mistake (the
console script's one-line error), 1 for an environment that cannot serve (no
AWS region, metrics port in use; logged as ``start-up failed: ...``).

hypercorn runs the app in worker processes (one by default), and its
supervising process exits 0 whatever a worker's status was (hypercorn 0.18,
``run.run`` re-reads the exit codes of an already emptied worker list;
pgjones/hypercorn#269). The supervisor never imports the app, so a worker that
fails to start ends it from outside: after its one line it sends the
supervisor ``SIGUSR1``, which hypercorn does not handle, so the command ends
"killed by SIGUSR1" (status 138 in a shell, -10 from ``subprocess``), never 0.
Where hypercorn is PID 1 of a container (no init) the kernel drops that
signal and only ``--workers 0`` keeps the status: there the app runs in
hypercorn's own process, whose exit status is then 2 or 1 as above.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.synchronize import SemLock
from typing import NoReturn

import trio
from quart_trio import QuartTrio

from .config import envcheck, flags
from .config import settings as config
from .observe import health, logs, metrics
from .proxy.app import create_app
from .routing.guard import METRICS_LISTENER, Listener
from .server import binding, patches, serve
from .tokens import sts
from .tokens import supervisor as tokens

log = logging.getLogger("aws_outbound_jwt_proxy.asgi")


def _end_hypercorn_supervisor() -> None:
    """Kill hypercorn's supervising process when this process is one of its workers.

    Called after a start-up failure's one line is flushed, so the ``hypercorn``
    command ends non-zero (see the module docstring). A worker is recognised by
    its multiprocessing target, hypercorn's worker function; PID 1 is left
    alone (the kernel ignores the signal there anyway).
    """
    if multiprocessing.parent_process() is None:
        return
    worker = multiprocessing.current_process()
    if not getattr(getattr(worker, "_target", None), "__module__", "").startswith("hypercorn."):
        return
    supervisor = os.getppid()
    if supervisor <= 1:
        return
    _unlink_shutdown_event(getattr(worker, "_kwargs", {}).get("shutdown_event"))
    os.kill(supervisor, signal.SIGUSR1)


def _unlink_shutdown_event(event: object) -> None:
    """Unlink the named semaphores of hypercorn's shutdown event, as its supervisor would at exit.

    A supervisor killed by a signal cannot, and multiprocessing's resource
    tracker then warns about "leaked semaphore objects" on stderr. Best effort:
    should multiprocessing's internals change, the warning is all that returns.
    """
    try:
        cond = event._cond  # type: ignore[attr-defined]
        locks = (event._flag, cond._lock, cond._sleeping_count, cond._woken_count, cond._wait_semaphore)  # type: ignore[attr-defined]
        for lock in locks:
            SemLock._cleanup(lock._semlock.name)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pass


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()


def _end_worker(status: int) -> NoReturn:
    """End the import of the app with ``status`` (and hypercorn's supervisor, if any).

    SystemExit passes through hypercorn's import path unwrapped: no traceback,
    the status kept.
    """
    _flush_logs()
    _end_hypercorn_supervisor()
    raise SystemExit(status)


def _startup_failed(error: BaseException) -> NoReturn:
    """Log ``start-up failed: ...`` (one line) and end this process with status 1, from the lifespan.

    Neither an exception nor SystemExit can do that from ``before_serving``:
    Quart turns an exception into ``lifespan.startup.failed``, which hypercorn
    re-raises with a multi-line traceback; a SystemExit reaches hypercorn
    wrapped in a trio exception group, which it logs before serving on
    *without* the lifespan — a proxy with no token supervisor. ``os._exit``
    after flushing the log is the one exit neither can intercept; nothing is
    lost by skipping clean-up, as nothing has been served yet.
    """
    log.error(f"start-up failed: {error}")
    _flush_logs()
    _end_hypercorn_supervisor()
    os._exit(binding.EXIT_STARTUP)


def build() -> QuartTrio:
    try:
        settings = config.load([], os.environ)
    except flags.ConfigError as exc:
        flags.print_error(config.PROG, exc)
        _end_worker(flags.EXIT_USAGE)
    logs.setup(settings.log_level, settings.log_format)
    envcheck.warn(os.environ, log)
    if settings.workers > 1:
        log.warning("WORKERS is ignored under the hypercorn command: its --workers (-w) decides")
    patches.install()
    try:
        fetcher = sts.build_fetcher()
    except sts.StsSetupError as exc:
        log.error(f"start-up failed: {exc}")
        _end_worker(binding.EXIT_STARTUP)
    m: metrics.Metrics | metrics.NullMetrics = (
        metrics.Metrics(max_upstreams=settings.metrics_max_upstreams)
        if settings.metrics_enabled
        else metrics.NullMetrics()
    )
    supervisor = tokens.Supervisor(settings, fetcher, m.tokens)
    readiness = health.Readiness(supervisor.ready, supervisor.snapshot)
    # hypercorn owns the proxy sockets; the metrics address is ours (a port of 0 is never a target).
    metrics_listener = Listener(settings.metrics_host, settings.metrics_port, METRICS_LISTENER)
    listeners = [metrics_listener] if settings.metrics_enabled and settings.metrics_port else []
    app = create_app(settings, supervisor, observer=m, listeners=listeners)

    @app.before_serving
    async def start_background() -> None:
        try:
            await app.nursery.start(supervisor.run)
            if isinstance(m, metrics.Metrics):
                m.watch(supervisor.snapshot)
                cfg = binding.hypercorn_config(settings.metrics_host, settings.metrics_port)
                cfg.workers = 2  # only makes hypercorn set SO_REUSEPORT: workers share the port
                # Under hypercorn every setting comes from the environment: name the variable.
                sockets = binding.bind(cfg, config.METRICS_LISTEN_ADDR.env)
                metrics_app = metrics.create_app(m, readiness, settings.metrics_path)
                binds = await app.nursery.start(
                    serve.serve_app, metrics_app, cfg, sockets, trio.sleep_forever
                )
                log.info("metrics listening", extra={"addresses": binds, "path": settings.metrics_path})
        except (binding.StartupError, sts.StsSetupError) as exc:
            _startup_failed(exc)
        readiness.listening()
        serve.freeze_startup_heap()

    @app.after_serving
    async def stop_background() -> None:
        readiness.draining()
        m.close()

    return app


app = build()
