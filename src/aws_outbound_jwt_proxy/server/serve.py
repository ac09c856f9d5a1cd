"""Run the proxy: one root nursery owns the listeners and the token supervisor.

Sockets are bound before anything starts, so a port in use is a one-line
start-up error naming the address. SIGTERM/SIGINT stop accepting, give
in-flight requests ``--shutdown-timeout`` to finish, then cancel the rest.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .. import __version__
from ..config.settings import Settings
from ..observe import health, logs, metrics
from ..proxy.app import create_app
from ..routing.egress import redact
from ..routing.guard import METRICS_LISTENER, PROXY_LISTENER, Listener
from ..tokens import sts
from ..tokens import supervisor as tokens
from . import listener, patches
from .binding import (
    EXIT_STARTUP,
    Bound,
    StartupError,
    bind_all,
    metrics_config,
    proxy_config,
)

log = logging.getLogger("aws_outbound_jwt_proxy.serve")


def own_listeners(sockets: Sockets, kind: str) -> list[Listener]:
    """The addresses ``sockets`` are bound to, as guard entries (port 0 resolved)."""
    out = []
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        host, port = sock.getsockname()[:2]
        out.append(Listener(str(host), int(port), kind))
    return out


async def serve_app(
    app: Any,
    cfg: HyperConfig,
    sockets: Sockets,
    shutdown: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one ASGI app on pre-bound sockets until ``shutdown`` returns."""
    await worker_serve(
        wrap_app(app, cfg.wsgi_max_body_size, None),
        cfg,
        sockets=sockets,
        shutdown_trigger=shutdown,
        task_status=task_status,
    )


async def _wait_for_signal(
    stop: trio.Event, readiness: health.Readiness, cancel: trio.CancelScope, signums: tuple[int, ...]
) -> None:
    with trio.open_signal_receiver(*signums) as signals:
        async for signum in signals:
            if not stop.is_set():
                log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                readiness.draining()
                stop.set()
            else:  # a second signal: stop waiting for in-flight requests
                cancel.cancel()
                return


async def run(
    settings: Settings,
    fetcher: sts.StsFetcher,
    *,
    stop: trio.Event | None = None,
    handle_signals: bool = True,
    bound: Bound | None = None,
    shared: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT); started() gets the proxy URLs.

    ``bound``: listeners bound by the caller (default: bound here). ``shared``: other
    processes accept on the same sockets (``--workers``): connections are then taken
    one per scheduler pass, so a busy process leaves them to an idle one, and only
    SIGTERM is handled (the supervising process turns SIGINT into it).
    """
    stop = stop if stop is not None else trio.Event()
    patches.install()
    if not shared:
        listener.install()  # one process owns the listening socket: accept bursts whole
    proxy_cfg = proxy_config(settings)
    bound = bound or bind_all(settings)
    proxy_sockets, metrics_sockets = bound.proxy, bound.metrics
    m: metrics.Metrics | metrics.NullMetrics = metrics.NullMetrics()
    if metrics_sockets is not None:
        metrics_cfg = metrics_config(settings)
        m = metrics.Metrics(max_upstreams=settings.metrics_max_upstreams)

    supervisor = tokens.Supervisor(settings, fetcher, m.tokens)
    readiness = health.Readiness(supervisor.ready, supervisor.snapshot)
    listeners = own_listeners(proxy_sockets, PROXY_LISTENER)
    if metrics_sockets is not None:
        listeners += own_listeners(metrics_sockets, METRICS_LISTENER)
    app = create_app(settings, supervisor, observer=m, listeners=listeners)
    signums = (signal.SIGTERM,) if shared else (signal.SIGTERM, signal.SIGINT)

    try:
        async with trio.open_nursery() as root:
            if handle_signals:
                root.start_soon(_wait_for_signal, stop, readiness, root.cancel_scope, signums)
            await root.start(supervisor.run)
            if isinstance(m, metrics.Metrics) and metrics_sockets is not None:
                m.watch(supervisor.snapshot)
                metrics_app = metrics.create_app(m, readiness, settings.metrics_path)
                # Keeps answering (/readyz: 503 draining) until the proxy is done.
                mbinds = await root.start(
                    serve_app, metrics_app, metrics_cfg, metrics_sockets, trio.sleep_forever
                )
                log.info("metrics listening", extra={"addresses": mbinds, "path": settings.metrics_path})

            async def proxy(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await serve_app(app, proxy_cfg, proxy_sockets, stop.wait, task_status=task_status)
                finally:
                    # The proxy listener is done (drained or cancelled): stop everything else.
                    root.cancel_scope.cancel()

            binds = await root.start(proxy)
            readiness.listening()
            freeze_startup_heap()
            log.info("proxy listening", extra={"addresses": binds, **startup_fields(settings)})
            if not settings.pinned and not settings.allowed_upstream_hosts:
                log.warning("no --allowed-upstream-hosts: any client can have tokens minted for any host")
            task_status.started(binds)
    finally:
        m.close()


# Young-generation threshold once serving (CPython's default is 700). A request leaves no
# reference cycles, so a young collection finds almost nothing to free; what it does is walk
# every in-flight request's young objects. Under load (64 requests in flight) that was one
# pass per ~14 requests, mostly cache misses; at this threshold it is ~30x rarer. Cyclic
# garbage from rare paths (exceptions with tracebacks) waits for at most this many objects.
YOUNG_GC_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Put what start-up built out of the garbage collector's reach (``gc.freeze``), once serving.

    Start-up leaves about 100,000 objects that live as long as the process
    (imported modules, botocore's service models). Every full collection walked
    them all: under load that was a pause of about 70 ms a few times a minute,
    the proxy's p99. Frozen, a full collection walks only what serving made
    (about 3 ms). Start-up's garbage is collected first so none of it is frozen.
    Young collections are made rarer too (:data:`YOUNG_GC_THRESHOLD`).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


def startup_fields(settings: Settings) -> dict[str, object]:
    """What the start-up line tells an operator: version, routing, egress (no credentials)."""
    egress = settings.egress
    return {
        "version": __version__,
        "mode": "pinned" if settings.pinned else f"header {settings.host_header}",
        "audience": "static" if settings.token_audiences else "dynamic",
        "egress_http_proxy": redact(egress.http) if egress.http and not egress.no_proxy_all else "",
        "egress_https_proxy": redact(egress.https) if egress.https and not egress.no_proxy_all else "",
        "denied_upstream_cidrs": [str(n) for n in settings.denied_upstream_cidrs],
        "intercept_connect": settings.intercepting,  # CONNECT to allowed hosts is intercepted
    }


def main(settings: Settings) -> int:
    """Run the proxy with validated settings; the process exit status."""
    logs.setup(settings.log_level, settings.log_format)
    try:
        fetcher = sts.build_fetcher()
        trio.run(run, settings, fetcher)
    except (StartupError, sts.StsSetupError) as exc:
        log.error(f"start-up failed: {exc}")
        return EXIT_STARTUP
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0
