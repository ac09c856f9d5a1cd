"""``--workers N``: N processes serve the proxy on listeners this process binds and then watches.

This process checks what it can once (the AWS region, the listen and metrics
addresses), so a start-up error is one line and exit status 1, not N of each.
It then starts N workers (multiprocessing's ``spawn``: fresh interpreters),
hands each the bound sockets, and waits. Each worker is the one-process proxy
(:func:`serve.run`) with its own event loop, token supervisor and cache, and
a share of ``--sts-max-rate``; the kernel spreads new connections over the
workers accepting on the shared sockets.

Metrics: every worker writes its values to files in one directory
(prometheus-client's multi-process mode) and whichever worker answers a scrape
sums them. The directory is ``PROMETHEUS_MULTIPROC_DIR`` when set (the
operator empties it between starts), else a private one this process creates
and removes (and the next start removes, should this process be killed).

Signals: SIGTERM or SIGINT here is passed on to every worker as SIGTERM (each
stops accepting and drains for ``--shutdown-timeout``); a second one passes
on again (the workers stop waiting). Workers ignore SIGINT, so Ctrl-C in a
terminal (which signals the whole process group) drains once, as with one
process. A worker that ends on its own — a crash, a failed start — ends the
service: the others are stopped and the exit status is non-zero (the
orchestrator restarts the whole, rather than this process hiding a worker
that keeps failing). Workers stop by themselves if this process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import trio

from ..config.settings import Settings
from ..observe import logs
from ..tokens import sts
from . import binding

log = logging.getLogger("aws_outbound_jwt_proxy.workers")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "aws-outbound-jwt-proxy-metrics-"  # then the supervising process's pid
# After the drain a worker cancels what is left; past this much more, it is killed.
KILL_AFTER_DRAIN = 10.0


def worker_settings(settings: Settings) -> Settings:
    """One worker's settings: an equal share of the STS call budget (0 stays unlimited)."""
    return dataclasses.replace(settings, sts_max_rate=settings.sts_max_rate / settings.workers)


@contextlib.contextmanager
def metrics_dir(enabled: bool) -> Iterator[str | None]:
    """The multi-process metrics directory, set in the environment the workers inherit."""
    if not enabled:
        yield None
        return
    variable = next((name for name in (METRICS_DIR_ENV, METRICS_DIR_ENV.lower()) if os.environ.get(name)), "")
    if variable:
        given = os.environ[variable]
        if not os.path.isdir(given) or not os.access(given, os.W_OK | os.X_OK):
            raise binding.StartupError(f"{variable}: not a writable directory: {given}")
        yield given
        return
    remove_stale_metrics_dirs(tempfile.gettempdir())
    try:
        path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    except OSError as exc:
        raise binding.StartupError(
            f"--workers: cannot create the metrics directory ({exc.strerror or exc}): "
            f"set {METRICS_DIR_ENV} (or TMPDIR) to a writable directory"
        ) from None
    os.environ[METRICS_DIR_ENV] = path
    try:
        yield path
    finally:
        del os.environ[METRICS_DIR_ENV]
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_metrics_dirs(parent: str) -> None:
    """Remove the private metrics directories of supervising processes that no longer run.

    A supervising process that is killed (SIGKILL, OOM) cannot remove its own; its
    pid is in the name. One with this process's pid is stale too (a container
    restarted as PID 1 on a kept /tmp). A live pid is left alone, whoever has it now.
    """
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            if not entry.name.startswith(METRICS_DIR_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            pid = entry.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
                shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def main(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes until a signal or a worker's end; the exit status."""
    logs.setup(settings.log_level, settings.log_format)
    with contextlib.ExitStack() as stack:
        try:
            sts.build_fetcher()  # the region and the endpoint, checked once here
            bound = binding.bind_all(settings)
            path = stack.enter_context(metrics_dir(settings.metrics_enabled))
        except (binding.StartupError, sts.StsSetupError) as exc:
            log.error(f"start-up failed: {exc}")
            return binding.EXIT_STARTUP
        return _supervise(settings, bound, path)


def _supervise(settings: Settings, bound: binding.Bound, metrics_path: str | None) -> int:
    ctx = multiprocessing.get_context("spawn")
    share = worker_settings(settings)
    stopping: float | None = None  # monotonic time of the first stop request
    failed = 0
    procs: list[BaseProcess] = []

    def stop_workers(signum: int = signal.SIGTERM) -> None:
        for proc in procs:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            stopping = time.monotonic()
        stop_workers()

    # Workers start with SIGINT ignored (an ignored signal stays ignored across exec; see the
    # module docstring); a SIGTERM that arrives while they start reaches those started.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for index in range(settings.workers):
            if stopping is not None:
                break
            child = ctx.Process(target=_worker, args=(share, bound, index), name=f"worker-{index}")
            child.start()
            procs.append(child)
        signal.signal(signal.SIGINT, on_signal)
        _close(bound)  # the workers hold their own copies
        log.info(
            "workers started",
            extra={"workers": len(procs), "pids": [p.pid for p in procs], "metrics_dir": metrics_path or ""},
        )
        killed = False
        while running := [p for p in procs if p.exitcode is None]:
            timeout = 1.0  # a signal's handler runs here; the deadline is checked at least this often
            if stopping is not None and not killed:
                deadline = stopping + settings.shutdown_timeout + KILL_AFTER_DRAIN
                if time.monotonic() >= deadline:
                    log.error(
                        "workers still running after the drain: killed",
                        extra={"pids": [p.pid for p in running]},
                    )
                    stop_workers(signal.SIGKILL)
                    killed = True
            wait([p.sentinel for p in running], timeout)
            # All of them, not just `running`: computing that list reaps a worker that has just
            # died, and it would never be seen here.
            ended = [p for p in procs if p.exitcode is not None]
            if ended and stopping is None:  # a worker ended on its own: end the service
                proc = ended[0]
                log.error(
                    "worker ended: stopping the others",
                    extra={"worker": proc.name, "pid": proc.pid, "status": proc.exitcode},
                )
                failed = proc.exitcode if proc.exitcode in (1, 2) else 1
                stopping = time.monotonic()
                stop_workers()
    finally:
        stop_workers()  # none left on the normal path; after an error, none left behind
        for proc in procs:
            proc.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        return failed
    statuses = [p.exitcode for p in procs]
    # -SIGTERM: a worker stopped before its own handler was installed.
    if any(status not in (0, -signal.SIGTERM) for status in statuses):
        log.error("workers ended with errors", extra={"statuses": statuses})
        return 1
    log.info("stopped")
    return 0


def _close(bound: binding.Bound) -> None:
    for sockets in (bound.proxy, bound.metrics):
        if sockets is not None:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.close()


def _worker(settings: Settings, bound: binding.Bound, index: int) -> None:
    """One worker process (the target of ``multiprocessing``): the proxy on the shared sockets."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.setup(settings.log_level, settings.log_format)
    status = 0
    try:
        fetcher = sts.build_fetcher()
        trio.run(_serve_worker, settings, fetcher, bound)
    except (binding.StartupError, sts.StsSetupError) as exc:
        log.error(f"start-up failed: {exc}", extra={"worker": index})
        status = binding.EXIT_STARTUP
    logging.shutdown()
    raise SystemExit(status)


async def _serve_worker(settings: Settings, fetcher: sts.StsFetcher, bound: binding.Bound) -> None:
    # Imported here, in the worker: the supervising process never loads the serving stack.
    from . import serve

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_when_orphaned, stop)
        await serve.run(settings, fetcher, stop=stop, bound=bound, shared=True)
        nursery.cancel_scope.cancel()


async def _stop_when_orphaned(stop: trio.Event) -> None:
    """Drain and stop when the supervising process is gone (its sentinel becomes readable)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    await trio.lowlevel.wait_readable(parent.sentinel)
    log.warning("supervising process gone: shutting down")
    stop.set()
