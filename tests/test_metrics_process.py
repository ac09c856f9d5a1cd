"""The metrics listener of the real proxy process: scrape contents, health probes, -w N workers.

Everything runs against ``python -m aws_outbound_jwt_proxy`` (or the ``hypercorn``
command) with the STS emulator as STS and the verifying echo as upstream.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.fixtures.echo import EchoFactory
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.metrics import Families, parse_scrape, value
from tests.fixtures.process import ProxyFactory, base_env

AUD = "http://127.0.0.1"  # dynamic audience of any http://127.0.0.1:<port> target


def _free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _poll(check: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """``check()`` until it returns something truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(step)


def _scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def _probe(url: str) -> tuple[int, dict[str, Any]]:
    resp = httpx.get(url, timeout=10)
    return resp.status_code, resp.json()


def test_metrics_disabled_binds_nothing(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream(sts_emulator.issuer, AUD)
    port = _free_port()
    proxy = proxy_process(
        [
            "--upstream-host",
            echo.host,
            "--upstream-scheme",
            "http",
            "--metrics-listen-addr",
            f"127.0.0.1:{port}",
            "--metrics-enabled=false",
        ],
        base_env(sts_emulator.env),
    )
    resp = httpx.get(f"{proxy.url}/still-served", timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["claims"]["aud"] == AUD
    assert proxy.metrics_url == ""
    assert not [r for r in proxy.records() if r.get("msg") == "metrics listening"]
    assert _refused(port), f"something listens on the disabled metrics address 127.0.0.1:{port}"


def test_scrape_after_traffic_on_the_real_process(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream(sts_emulator.issuer, AUD)
    echo_port = echo.host.rsplit(":", 1)[1]
    dead_port = str(_free_port())
    # Header mode: the X-Upstream-Host names the target, so audiences differ per host.
    proxy = proxy_process(["--upstream-scheme", "http"], base_env(sts_emulator.env))
    assert proxy.metrics_url

    ok = httpx.get(f"{proxy.url}/path-one?q=1", headers={"X-Upstream-Host": echo.host}, timeout=30)
    assert ok.status_code == 200, ok.text
    bearer = next(v for n, v in ok.json()["headers"] if n.lower() == "authorization")
    jwt = bearer.split(" ", 1)[1]

    sts_emulator.set_faults(error="AccessDenied", always=True)
    denied = httpx.get(
        f"{proxy.url}/path-two", headers={"X-Upstream-Host": f"localhost:{echo_port}"}, timeout=30
    )
    assert denied.status_code == 502
    assert denied.text.strip() == "token unavailable"
    # The first set's token is cached: no STS call, the upstream answers.
    purge = httpx.request(
        "PURGE", f"{proxy.url}/path-three", headers={"X-Upstream-Host": echo.host}, timeout=30
    )
    assert purge.status_code == 200, purge.text
    assert purge.json()["method"] == "PURGE"
    refused = httpx.get(
        f"{proxy.url}/path-four", headers={"X-Upstream-Host": f"127.0.0.1:{dead_port}"}, timeout=30
    )
    assert refused.status_code == 502

    # Every request has been recorded once its access log line is out.
    _poll(
        lambda: len([r for r in proxy.records() if r.get("msg") == "request"]) >= 4,
        10,
        "access records",
    )
    text = _scrape_text(f"{proxy.metrics_url}/metrics")
    fams = parse_scrape(text)

    def server(method: str, status: str) -> float | None:
        return value(
            fams,
            "http_server_request_duration_seconds_count",
            http_request_method=method,
            http_response_status_code=status,
        )

    assert server("GET", "200") == 1
    assert server("GET", "502") == 2
    assert server("_OTHER", "200") == 1
    assert server("PURGE", "200") is None
    assert value(fams, "http_server_active_requests") == 0

    def client(**labels: str) -> float | None:
        return value(fams, "http_client_request_duration_seconds_count", **labels)

    assert client(server_address="127.0.0.1", server_port=echo_port, token_result="ok") == 2
    assert client(server_address="localhost", server_port=echo_port, token_result="fetch_error") == 1
    assert (
        client(
            server_address="127.0.0.1",
            server_port=dead_port,
            error_type="connection_refused",
            token_result="ok",
        )
        == 1
    )
    client_labels = {tuple(sorted(s.labels)) for s in fams["http_client_request_duration_seconds"].samples}
    # error_type only on failure (REFERENCE A5): absent, not empty, on the successes.
    assert client_labels == {
        ("server_address", "server_port", "token_result"),
        ("le", "server_address", "server_port", "token_result"),
        ("error_type", "server_address", "server_port", "token_result"),
        ("error_type", "le", "server_address", "server_port", "token_result"),
    }

    local = "http://localhost"
    assert value(fams, "token_fetch_count_total", audience=AUD, result="ok") == 1
    assert (
        value(fams, "token_fetch_count_total", audience=local, result="error", error_class="AccessDenied")
        == 1
    )
    assert value(fams, "token_cache_miss_count_total", audience=AUD) == 1
    assert value(fams, "token_cache_hit_count_total", audience=AUD) == 2
    assert value(fams, "token_cache_miss_count_total", audience=local) == 1
    assert value(fams, "token_cache_hit_count_total", audience=local) is None
    assert value(fams, "token_cached_audiences") == 2
    # Exactly the calls the counters claim reached STS.
    calls = sts_emulator.calls()
    assert sorted(tuple(c["audiences"]) for c in calls) == [(AUD,), (local,)]

    # No secret or request detail in the scrape.
    assert jwt not in text and jwt.split(".")[2] not in text
    assert sts_emulator.secret_key not in text
    for path in ("path-one", "path-two", "path-three", "path-four", "q=1"):
        assert path not in text, path


def test_readyz_follows_the_static_token(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream()  # no verification: it only echoes
    sts_emulator.set_faults(error="AccessDenied", always=True)
    proxy = proxy_process(
        [
            "--upstream-host",
            echo.host,
            "--upstream-scheme",
            "http",
            "--token-audience",
            "https://ready.example",
        ],
        base_env(sts_emulator.env),
    )
    readyz, healthz = f"{proxy.metrics_url}/readyz", f"{proxy.metrics_url}/healthz"

    # The pre-warm fetch fails: not ready, and the reason names the set and the error class.
    def denied() -> dict[str, Any] | None:
        status, doc = _probe(readyz)
        assert status in (200, 503)
        return doc if status == 503 and "AccessDenied" in doc["reason"] else None

    doc = _poll(denied, 10, "readyz never reported the AccessDenied failure")
    assert doc["status"] == "not ready"
    assert "https://ready.example" in doc["reason"]
    health = httpx.get(healthz, timeout=10)
    assert health.status_code == 200

    # A permanent error is retried 30-60 s later; a request asking for the token
    # pulls the retry in to at most 5 s after the failure.
    # Left alone it stays 503 for that long; the nudge itself may get 502 (retry not due yet).
    sts_emulator.clear_faults()
    httpx.get(f"{proxy.url}/nudge", timeout=30)
    _poll(lambda: _probe(readyz)[0] == 200, 15, "readyz did not recover after faults cleared", step=0.2)
    assert _probe(readyz)[1] == {"status": "ready", "reason": "ready"}
    served = httpx.get(f"{proxy.url}/after", timeout=30)
    assert served.status_code == 200
    assert served.json()["target"] == "/after"

    # The proxy listener never serves metrics itself: /metrics goes upstream.
    forwarded = httpx.get(f"{proxy.url}/metrics", timeout=30)
    assert forwarded.status_code == 200
    assert forwarded.json()["target"] == "/metrics"
    assert "http_server_request_duration_seconds" not in forwarded.text


# ---- hypercorn -w 2: workers share the metrics port, any scrape sums all ------------


class _Files:
    """A collector over some mmap files only (one worker's view)."""

    def __init__(self, files: list[str]) -> None:
        self.files = files

    def collect(self) -> Any:
        return MultiProcessCollector.merge(self.files, accumulate=True)  # type: ignore[no-untyped-call]


def _total(murl: str, labels: dict[str, str]) -> float | None:
    fams = parse_scrape(_scrape_text(f"{murl}/metrics"))
    return value(fams, "http_server_request_duration_seconds_count", **labels)


def _worker_scrape(path: Path) -> Families:
    return parse_scrape(generate_latest(_Files([str(path)])).decode())


class _Lines:
    """Collects a child's stderr lines (JSON log records) from a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def records(self, msg: str) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("msg") == msg:
                out.append(rec)
        return out


@pytest.fixture
def hypercorn_workers(
    tmp_path: Path, sts_emulator: StsEmulator, echo_upstream: EchoFactory
) -> Iterator[tuple[str, str, Path, _Lines]]:
    """``hypercorn -w 2`` serving the proxy pinned to an echo: (proxy url, metrics url, mmap dir, stderr)."""
    echo = echo_upstream(sts_emulator.issuer, AUD)
    port, mport = _free_port(), _free_port()
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = base_env(sts_emulator.env)
    env.update(
        {
            "UPSTREAM_HOST": echo.host,
            "UPSTREAM_SCHEME": "http",
            "METRICS_LISTEN_ADDR": f"127.0.0.1:{mport}",
            "PROMETHEUS_MULTIPROC_DIR": str(mp_dir),
        }
    )
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("hypercorn")),
            "--worker-class",
            "trio",
            "-w",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "aws_outbound_jwt_proxy.asgi:app",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = _Lines(proc)
    try:
        _poll(
            lambda: proc.poll() is not None or len(lines.records("metrics listening")) == 2,
            40,
            "two workers never started their metrics listeners",
        )
        assert proc.poll() is None, "\n".join(lines.lines[-30:])
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}", mp_dir, lines
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_hypercorn_workers_scrape_sums_all_workers(hypercorn_workers: tuple[str, str, Path, _Lines]) -> None:
    url, murl, mp_dir, lines = hypercorn_workers
    n = 20
    for i in range(n):
        resp = httpx.get(f"{url}/w/{i}", timeout=30)  # a fresh connection each time
        assert resp.status_code == 200, resp.text
    labels = {"http_request_method": "GET", "http_response_status_code": "200"}
    # A worker records a request just after its response went out (access record, then
    # metrics, with no await between): wait until every request is recorded.
    _poll(lambda: len(lines.records("request")) == n, 10, "access records")
    _poll(lambda: _total(murl, labels) == n, 5, "the scrape never showed all requests")
    # Each worker's own mmap file holds only its share: both served some of the traffic.
    per_worker = [
        value(_worker_scrape(f), "http_server_request_duration_seconds_count", **labels)
        for f in sorted(mp_dir.glob("histogram_*.db"))
    ]
    assert len(per_worker) == 2, per_worker
    assert all(v is not None and 0 < v < n for v in per_worker), per_worker
    for _ in range(6):
        # A fresh connection per scrape: the kernel spreads them over both workers' sockets,
        # and whichever worker answers sums every worker's files.
        fams = parse_scrape(_scrape_text(f"{murl}/metrics"))
        assert value(fams, "http_server_request_duration_seconds_count", **labels) == n
        assert value(fams, "http_server_active_requests") == 0
        assert value(fams, "token_cached_audiences") == 2  # livesum: the set is cached in each worker
    # One supervisor per worker: one fetch and one miss each, hits for the rest.
    assert value(fams, "token_fetch_count_total", audience=AUD, result="ok") == 2
    assert value(fams, "token_cache_miss_count_total", audience=AUD) == 2
    assert value(fams, "token_cache_hit_count_total", audience=AUD) == n - 2
