"""``--workers N``: N real processes on the listeners of one, their metrics summed, one exit status.

The console script as an operator runs it, against the STS emulator and a
verifying echo upstream on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.server import workers
from tests.fixtures.echo import EchoFactory
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.metrics import parse_scrape, value
from tests.fixtures.process import ProxyFactory, ProxyProcess, base_env
from tests.fixtures.upstreams import HeldUpstream

AUD = "https://workers.example"
BIN = Path(sys.executable).parent
LOOPBACK = ["--listen-addr", "127.0.0.1:0", "--metrics-listen-addr", "127.0.0.1:0"]


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def _two_workers(
    proxy_process: ProxyFactory, sts: StsEmulator, *flags: str
) -> tuple[ProxyProcess, list[int]]:
    """The proxy with --workers 2 and a static audience; waits until both workers listen."""
    proxy = proxy_process(["--workers", "2", "--token-audience", AUD, *flags], base_env(sts.env))
    started = proxy.wait_for(lambda r: r.get("msg") == "workers started")
    deadline = time.monotonic() + 30
    while sum(r.get("msg") == "proxy listening" for r in proxy.records()) < 2:
        assert time.monotonic() < deadline, proxy.stderr()
        time.sleep(0.05)
    pids = [int(pid) for pid in started["pids"]]
    assert len(pids) == 2 and proxy.proc.pid not in pids
    return proxy, pids


def test_workers_share_the_listener_and_sum_their_metrics(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream(sts_emulator.issuer, AUD)
    proxy, pids = _two_workers(
        proxy_process, sts_emulator, "--upstream-host", echo.host, "--upstream-scheme", "http"
    )
    assert all(_alive(pid) for pid in pids)
    # Each worker's supervisor fetched the static audience's token for itself, before any request.
    deadline = time.monotonic() + 20
    while len([c for c in sts_emulator.calls() if c.get("action") == "GetWebIdentityToken"]) < 2:
        assert time.monotonic() < deadline, sts_emulator.calls()
        time.sleep(0.05)

    for i in range(20):  # a new connection each: whichever worker accepts it answers
        resp = httpx.get(f"{proxy.url}/item/{i}", timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["claims"]["aud"] == AUD

    # One scrape, answered by either worker, covers both.
    scrape = parse_scrape(httpx.get(f"{proxy.metrics_url}/metrics", timeout=10).text)
    assert value(scrape, "token_fetch_count_total", audience=AUD, result="ok") == 2
    served = value(
        scrape,
        "http_server_request_duration_seconds_count",
        http_request_method="GET",
        http_response_status_code="200",
    )
    assert served == 20
    assert value(scrape, "http_server_active_requests") == 0

    started = proxy.wait_for(lambda r: r.get("msg") == "workers started")
    metrics_dir = Path(started["metrics_dir"])
    assert metrics_dir.is_dir() and any(metrics_dir.glob("*.db"))
    assert proxy.stop() == 0
    _wait_gone(pids)
    assert not metrics_dir.exists(), "the private metrics directory outlived the service"
    # Once here, once in each worker (passed on as SIGTERM).
    stops = [(r["logger"], r["signal"]) for r in proxy.records() if r.get("msg") == "shutting down"]
    assert sorted(stops) == [
        ("aws_outbound_jwt_proxy.serve", "SIGTERM"),
        ("aws_outbound_jwt_proxy.serve", "SIGTERM"),
        ("aws_outbound_jwt_proxy.workers", "SIGTERM"),
    ]


def test_sigterm_drains_every_workers_in_flight_requests_then_exits_0(
    sts_emulator: StsEmulator, held_upstream: HeldUpstream, proxy_process: ProxyFactory
) -> None:
    pinned = ("--upstream-host", held_upstream.host, "--upstream-scheme", "http")
    proxy, pids = _two_workers(proxy_process, sts_emulator, *pinned)
    request = held_upstream.hold(f"{proxy.url}/slow")
    proxy.proc.send_signal(15)
    proxy.wait_for(lambda r: r.get("msg") == "shutting down")
    # The one that holds the request drains it; the other ends now.
    deadline = time.monotonic() + 20
    while all(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proxy.proc.poll() is None, "exited before the in-flight request finished"
    held_upstream.release.set()
    resp = request.finished()
    assert isinstance(resp, httpx.Response) and (resp.status_code, resp.text) == (200, "finished")
    assert proxy.stop() == 0
    _wait_gone(pids)


def test_ctrl_c_drains_once(sts_emulator: StsEmulator) -> None:
    """SIGINT to the whole process group, as a terminal sends it: one drain, status 0."""
    proxy = subprocess.Popen(
        [str(BIN / "aws-outbound-jwt-proxy"), "--workers", "2", *LOOPBACK, "--upstream-host", "127.0.0.1:9"],
        env=base_env(sts_emulator.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    watchdog = threading.Timer(60, proxy.kill)  # bounds the reads below if it never starts
    watchdog.start()
    lines: list[str] = []
    assert proxy.stderr is not None
    for line in proxy.stderr:
        lines.append(line)
        if sum('"proxy listening"' in seen for seen in lines) == 2:
            break
    os.killpg(proxy.pid, 2)
    _, err = proxy.communicate(timeout=30)
    watchdog.cancel()
    lines += err.splitlines()
    assert proxy.returncode == 0, lines
    # The workers ignore the terminal's SIGINT: each drains once, on the SIGTERM passed on.
    stops = [json.loads(line) for line in lines if '"shutting down"' in line]
    assert sorted((r["logger"], r["signal"]) for r in stops) == [
        ("aws_outbound_jwt_proxy.serve", "SIGTERM"),
        ("aws_outbound_jwt_proxy.serve", "SIGTERM"),
        ("aws_outbound_jwt_proxy.workers", "SIGINT"),
    ], lines
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), lines


def test_a_worker_that_dies_ends_the_service(sts_emulator: StsEmulator, proxy_process: ProxyFactory) -> None:
    proxy, pids = _two_workers(proxy_process, sts_emulator, "--upstream-host", "127.0.0.1:9")
    os.kill(pids[0], 9)
    record = proxy.wait_for(lambda r: r.get("msg") == "worker ended: stopping the others")
    assert record["level"] == "error" and record["pid"] == pids[0] and record["status"] == -9
    assert proxy.stop() == 1
    _wait_gone(pids)


def test_workers_stop_when_the_supervising_process_is_killed(
    sts_emulator: StsEmulator, proxy_process: ProxyFactory
) -> None:
    proxy, pids = _two_workers(proxy_process, sts_emulator, "--upstream-host", "127.0.0.1:9")
    stale = Path(proxy.wait_for(lambda r: r.get("msg") == "workers started")["metrics_dir"])
    proxy.kill()  # SIGKILL, and reaped
    _wait_gone(pids)
    assert "supervising process gone: shutting down" in proxy.stderr()
    # A killed supervisor cannot remove its metrics directory; the next start does.
    assert stale.is_dir()
    again, _ = _two_workers(proxy_process, sts_emulator, "--upstream-host", "127.0.0.1:9")
    assert not stale.exists()
    assert again.stop() == 0


def _run(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    result = subprocess.run(
        [str(BIN / "aws-outbound-jwt-proxy"), "--listen-addr", "127.0.0.1:0", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(env),
    )
    return result.returncode, result.stderr.splitlines()


@pytest.mark.parametrize(
    ("argv", "env", "line"),
    [
        (["--workers", "0"], {}, "--workers: must be a positive integer, got '0'"),
        (["--workers=two"], {}, "--workers: must be a positive integer, got 'two'"),
        ([], {"WORKERS": "65"}, "WORKERS: must be at most 64 (one per CPU core is plenty), got 65"),
    ],
)
def test_workers_config_errors(argv: list[str], env: dict[str, str], line: str) -> None:
    status, lines = _run(argv, {"AWS_REGION": "us-east-1", **env})
    assert (status, lines) == (2, [f"aws-outbound-jwt-proxy: error: {line}"])


def test_workers_startup_errors_are_one_line(sts_emulator: StsEmulator) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = f"127.0.0.1:{sock.getsockname()[1]}"
        status, lines = _run(["--workers", "2", "--metrics-listen-addr", busy], sts_emulator.env)
    assert status == 1 and len(lines) == 1, lines
    assert json.loads(lines[0])["msg"] == (
        f"start-up failed: --metrics-listen-addr: cannot listen on {busy}: Address already in use"
    )
    env = {**sts_emulator.env, "PROMETHEUS_MULTIPROC_DIR": "/nonexistent"}
    status, lines = _run(["--workers", "2", "--metrics-listen-addr", "127.0.0.1:0"], env)
    assert status == 1 and len(lines) == 1, lines
    assert json.loads(lines[0])["msg"] == (
        "start-up failed: PROMETHEUS_MULTIPROC_DIR: not a writable directory: /nonexistent"
    )
    no_region = {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    status, lines = _run(["--workers", "2"], no_region)
    assert status == 1 and len(lines) == 1, lines
    assert json.loads(lines[0])["msg"].startswith("start-up failed: no AWS region configured")


def test_each_worker_gets_a_share_of_the_sts_budget() -> None:
    s = config.load(["--workers", "4", "--sts-max-rate", "20"], env={})
    assert (s.workers, workers.worker_settings(s).sts_max_rate) == (4, 5.0)
    unlimited = config.load(["--workers", "4", "--sts-max-rate", "0"], env={})
    assert workers.worker_settings(unlimited).sts_max_rate == 0
    assert config.load([], env={}).workers == 1
