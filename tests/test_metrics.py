"""Metrics and health: label rules, series names/types/labels, the metrics listener app,
token observer hooks on a real supervisor, and multi-process aggregation."""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import yaml  # type: ignore[import-untyped]
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.observe import health, metrics
from aws_outbound_jwt_proxy.observe.metrics import Metrics, NullMetrics, drop_empty_labels
from aws_outbound_jwt_proxy.proxy.app import create_app
from aws_outbound_jwt_proxy.proxy.exchange import Exchange, classify
from aws_outbound_jwt_proxy.routing.target import Target
from aws_outbound_jwt_proxy.server import binding, serve
from aws_outbound_jwt_proxy.tokens import sts
from aws_outbound_jwt_proxy.tokens import supervisor as tokens
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.metrics import Families, parse_scrape, value


def parse_openmetrics(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


# ---- label rules (pure) ---------------------------------------------------------


def error_type(exc: BaseException) -> str:
    """The error_type label the one classifier gives a lower-layer exception."""
    return classify(exc).error_type


def test_method_label_is_canonical_method_or_other() -> None:
    m = Metrics()
    others = ["get", "PROPFIND", "BREW", "", "GET ", "Post"]
    for method in [*metrics.CANONICAL_METHODS, *others]:
        m.request_finished(method, 200, 0.001)
    fams = parse_scrape(m.render("")[0].decode())
    count = partial(value, fams, "http_server_request_duration_seconds_count")
    for method in metrics.CANONICAL_METHODS:
        assert count(http_request_method=method, http_response_status_code="200") == 1
    assert count(http_request_method="_OTHER", http_response_status_code="200") == len(others)


@pytest.mark.parametrize(
    ("scheme", "port", "label"),
    [
        ("https", None, ""),
        ("https", 443, ""),
        ("http", 80, ""),
        ("http", 443, "443"),
        ("https", 80, "80"),
        ("https", 8443, "8443"),
        ("http", 8080, "8080"),
    ],
)
def test_server_port_only_when_not_scheme_default(scheme: str, port: int | None, label: str) -> None:
    assert metrics.port_label(scheme, port) == label


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_error_type_connection_refused_from_real_connect() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(f"http://127.0.0.1:{_closed_port()}/")
    assert error_type(info.value) == "connection_refused"


async def test_error_type_timeout_from_silent_server() -> None:
    with socket.socket() as srv:  # accepts (backlog) and never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        async with httpx.AsyncClient(timeout=0.2) as client:
            with pytest.raises(httpx.TimeoutException) as info:
                await client.get(f"http://127.0.0.1:{port}/")
    assert error_type(info.value) == "timeout"


async def test_error_type_unknown_for_a_dropped_connection() -> None:
    async def drop(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, drop, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError) as info:
                await client.get(f"http://127.0.0.1:{port}/")
        nursery.cancel_scope.cancel()
    assert error_type(info.value) == "unknown"


def test_error_type_unknown_for_connect_errors_other_than_refused() -> None:
    assert error_type(httpx.ConnectError("name resolution failed")) == "unknown"
    assert error_type(ValueError("x")) == "unknown"
    assert error_type(httpx.ConnectTimeout("slow")) == "timeout"


# ---- series: names, types, labels --------------------------------------------------


def _record_everything(m: Metrics) -> None:
    m.request_started()
    m.request_finished("GET", 200, 0.004)
    m.request_started()
    m.request_finished("BREW", 418, 0.002)
    m.request_started()  # still in flight
    m.upstream_finished("api.example.com", "https", 443, 0.003, None, "ok")
    m.upstream_finished("api.example.com", "http", 8080, 0.5, "timeout", "ok")
    m.upstream_finished("api.example.com", "https", None, 0.0, None, "fetch_error")
    m.tokens.fetch_finished("https://a,https://b", True, None, 0.02, True)
    m.tokens.fetch_finished("https://a,https://b", False, "AccessDenied", 0.01, False)
    m.tokens.cache_hit("https://a,https://b")
    m.tokens.cache_miss("https://a,https://b")
    m.tokens.cached_sets(1)


def test_series_names_types_and_labels() -> None:
    m = Metrics()
    _record_everything(m)
    body, content_type = m.render("")
    assert content_type.startswith("text/plain; version=0.0.4")
    fams = parse_scrape(body.decode())
    expected = {
        "http_server_request_duration_seconds": (
            "histogram",
            {"http_request_method", "http_response_status_code"},
        ),
        "http_server_active_requests": ("gauge", set()),
        "http_client_request_duration_seconds": (
            "histogram",
            {"server_address", "server_port", "error_type", "token_result"},
        ),
        "token_fetch_count": ("counter", {"audience", "result", "error_class"}),
        "token_cache_hit_count": ("counter", {"audience"}),
        "token_cache_miss_count": ("counter", {"audience"}),
        "token_cached_audiences": ("gauge", set()),
        "token_refresh": ("counter", {"audience", "result"}),
        "token_fetch_duration_seconds": ("histogram", {"result"}),
        "token_expiry_seconds": ("gauge", {"audience"}),
    }
    # Labels the reference sets only sometimes are absent, not empty, when unset.
    optional = {"server_port", "error_type", "error_class"}
    for name, (typ, names) in expected.items():
        assert fams[name].type == typ, name
        for s in fams[name].samples:
            got = set(s.labels) - {"le"}
            assert names - optional <= got <= names, (name, s.labels)
            assert "" not in s.labels.values(), (name, s.labels)
    # process / runtime series (the Python equivalents of go_*)
    assert {
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "python_info",
        "python_gc_collections",
    } <= set(fams)
    assert not [n for f in fams.values() for n in (s.name for s in f.samples) if n.endswith("_created")]

    assert value(fams, "http_server_active_requests") == 1
    labels = {"http_request_method": "GET", "http_response_status_code": "200"}
    assert value(fams, "http_server_request_duration_seconds_count", **labels) == 1
    assert value(fams, "http_server_request_duration_seconds_bucket", le="0.005", **labels) == 1
    assert value(fams, "http_server_request_duration_seconds_bucket", le="0.0025", **labels) == 0
    other = {"http_request_method": "_OTHER", "http_response_status_code": "418"}
    assert value(fams, "http_server_request_duration_seconds_count", **other) == 1
    # success: no error_type, default port dropped; failure: error_type set, odd port kept
    ok = {"server_address": "api.example.com", "token_result": "ok"}
    assert value(fams, "http_client_request_duration_seconds_count", **ok) == 1
    failed = {**ok, "server_port": "8080", "error_type": "timeout"}
    assert value(fams, "http_client_request_duration_seconds_count", **failed) == 1
    token = {"server_address": "api.example.com", "token_result": "fetch_error"}
    assert value(fams, "http_client_request_duration_seconds_count", **token) == 1

    aud = "https://a,https://b"
    assert value(fams, "token_fetch_count_total", audience=aud, result="ok") == 1
    assert (
        value(fams, "token_fetch_count_total", audience=aud, result="error", error_class="AccessDenied") == 1
    )
    assert value(fams, "token_refresh_total", audience=aud, result="ok") == 1
    assert value(fams, "token_refresh_total", audience=aud, result="error") is None  # not a background fetch
    assert value(fams, "token_cache_hit_count_total", audience=aud) == 1
    assert value(fams, "token_cache_miss_count_total", audience=aud) == 1
    assert value(fams, "token_cached_audiences") == 1
    assert value(fams, "token_fetch_duration_seconds_count", result="ok") == 1


def test_request_observer_hook_maps_outcomes() -> None:
    m = Metrics()
    api = Target("https", "api.example.com", None, "api.example.com")
    odd = Target("http", "[::1]", 8080, "[::1]:8080")
    outcomes = [
        ("GET", 200, 0.02, api, "ok", None, 0.01),  # success: upstream time
        ("POST", 502, 0.03, odd, "ok", "connection_refused", 0.001),
        ("GET", 504, 0.5, api, "ok", "timeout", 0.5),
        ("GET", 502, 0.04, api, "fetch_error", None, None),  # token failure: whole time
        ("GET", 502, 0.001, api, "resolver_error", None, None),
        ("GET", 400, 0.001, None, None, None, None),  # not routed: no outbound record
        ("PUT", 499, 0.2, api, "ok", None, None),  # client left mid-call: no outcome
    ]
    for method, status, duration, target, token_result, error_type, upstream_seconds in outcomes:
        m.started()
        ex = Exchange(method, "/", 0.0, target, status, token_result, error_type, upstream_seconds)
        m.finished(ex, duration)
    fams = parse_scrape(m.render("")[0].decode())
    count = partial(value, fams, "http_client_request_duration_seconds_count")
    assert count(server_address="api.example.com", token_result="ok") == 1
    refused = {"server_address": "[::1]", "server_port": "8080", "error_type": "connection_refused"}
    assert count(token_result="ok", **refused) == 1
    assert count(server_address="api.example.com", token_result="ok", error_type="timeout") == 1
    assert count(server_address="api.example.com", token_result="fetch_error") == 1
    assert count(server_address="api.example.com", token_result="resolver_error") == 1
    total = sum(
        s.value for s in fams["http_client_request_duration_seconds"].samples if s.name.endswith("_count")
    )
    assert total == 5
    fetch = {"server_address": "api.example.com", "token_result": "fetch_error", "le": "0.05"}
    assert value(fams, "http_client_request_duration_seconds_bucket", **fetch) == 1
    server = partial(value, fams, "http_server_request_duration_seconds_count")
    assert server(http_request_method="GET", http_response_status_code="400") == 1
    assert server(http_request_method="PUT", http_response_status_code="499") == 1
    assert value(fams, "http_server_active_requests") == 0


def test_latency_buckets_span_1ms_to_30s() -> None:
    m = Metrics()
    m.request_started()
    m.request_finished("GET", 200, 0.1)
    fams = parse_scrape(m.render("")[0].decode())
    bounds = sorted(
        float(s.labels["le"])
        for s in fams["http_server_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    )
    assert bounds[0] == 0.001
    assert bounds[-2:] == [30.0, float("inf")]


def test_each_metrics_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.request_started()
    a.request_finished("GET", 200, 0.01)
    a.tokens.cache_hit("x")
    fb = parse_scrape(b.render("")[0].decode())
    assert value(fb, "http_server_request_duration_seconds_count", http_request_method="GET",
                 http_response_status_code="200") is None  # fmt: skip
    assert value(fb, "token_cache_hit_count_total", audience="x") is None
    fa = parse_scrape(a.render("")[0].decode())
    assert value(fa, "token_cache_hit_count_total", audience="x") == 1


def test_null_metrics_has_the_same_recording_methods() -> None:
    names = (
        "request_started",
        "request_finished",
        "upstream_finished",
        "started",
        "finished",
        "watch",
        "close",
    )
    for name in names:
        assert inspect.signature(getattr(NullMetrics, name)) == inspect.signature(getattr(Metrics, name)), (
            name
        )
    for name in ("fetch_finished", "cache_hit", "cache_miss", "cached_sets"):
        assert callable(getattr(NullMetrics.tokens, name))
    n = NullMetrics()
    n.request_started()
    n.request_finished("GET", 200, 0.1)
    assert not hasattr(n, "registry")


def test_openmetrics_rendering() -> None:
    m = Metrics()
    _record_everything(m)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    fams = {f.name: f for f in parse_openmetrics(body.decode())}
    assert fams["token_fetch_count"].type == "counter"
    assert fams["http_client_request_duration_seconds"].type == "histogram"


# ---- the metrics listener app over a real port ---------------------------------------


async def _serve(nursery: trio.Nursery, app: health.ASGIApp) -> str:
    cfg = HyperConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    binds: list[str] = await nursery.start(partial(hypercorn_serve, app, cfg, mode="asgi"))  # type: ignore[arg-type]
    return binds[0]


class Flag:
    def __init__(self) -> None:
        self.up = False

    def __call__(self) -> tuple[bool, str]:
        return (True, "ready") if self.up else (False, "no token yet")


async def test_metrics_app_over_http(nursery: trio.Nursery) -> None:
    m = Metrics()
    _record_everything(m)
    ready = Flag()
    base = await _serve(nursery, metrics.create_app(m, ready, "/custom/metrics"))
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/custom/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        fams = parse_scrape(r.text)
        assert value(fams, "token_cached_audiences") == 1

        r = await client.get(
            "/custom/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        assert "token_fetch_count" in {f.name for f in parse_openmetrics(r.text)}

        r = await client.get("/custom/metrics", headers={"Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert value(parse_scrape(r.text), "token_cached_audiences") == 1  # httpx decoded it

        r = await client.head("/custom/metrics")
        assert r.status_code == 200 and r.content == b""

        r = await client.get("/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")

        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"status": "not ready", "reason": "no token yet"}
        ready.up = True
        r = await client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"

        for path in ("/", "/metrics", "/custom/metrics/", "/healthz/x", "/readyzz"):
            r = await client.get(path)
            assert r.status_code == 404, path
        r = await client.post("/custom/metrics", content=b"x")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


def test_readiness_reasons() -> None:
    tokens_ready = False
    states = [
        tokens.SetState(
            "https://a", static=True, seconds_left=None, fetching=False, error_class="AccessDenied"
        ),
        tokens.SetState("https://dyn", static=False, seconds_left=None, fetching=True, error_class=None),
    ]
    r = health.Readiness(lambda: tokens_ready, lambda: states)
    assert r() == (False, "listeners not up yet")
    r.listening()
    ok, reason = r()
    assert not ok and reason == "no valid token for audience set https://a (AccessDenied)"
    tokens_ready = True
    assert r() == (True, "ready")
    r.draining()
    assert r() == (False, "shutting down")


# ---- token observer on a real supervisor and the STS emulator ------------------------


def _settings(*args: str) -> config.Settings:
    return config.load(["--upstream-host", "api.example.com", "--token-duration", "15m", *args], {})


async def _poll(pred: Callable[[], bool]) -> None:
    """Poll ``pred`` (nothing signals it); the caller bounds the wait with fail_after."""
    while not pred():  # noqa: ASYNC110
        await trio.sleep(0.01)


def _scrape(m: Metrics) -> Families:
    m.prepare()  # what the metrics app does on the event loop before rendering
    return parse_scrape(m.render("")[0].decode())


async def test_token_series_from_real_supervisor(sts_emulator: StsEmulator) -> None:
    m = Metrics()
    settings = _settings(
        "--token-audience", "https://b.example", "--token-audience", "https://a.example",
        "--token-cache-max-entries", "3",
    )  # fmt: skip
    sup = tokens.Supervisor(settings, sts.StsFetcher(sts_emulator.boto3_client()), m.tokens)
    m.watch(sup.snapshot)
    static = "https://a.example,https://b.example"
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with trio.fail_after(10):
            await _poll(sup.ready)
        fams = _scrape(m)
        assert value(fams, "token_fetch_count_total", audience=static, result="ok") == 1
        assert value(fams, "token_refresh_total", audience=static, result="ok") == 1  # pre-warm
        assert value(fams, "token_cached_audiences") == 1
        left = value(fams, "token_expiry_seconds", audience=static)
        assert left is not None and 800 < left <= 900

        await sup.get(("https://a.example", "https://b.example"))
        await sup.get(("https://dyn.example",))  # miss, foreground fetch
        sts_emulator.set_faults(error="AccessDenied", always=True)
        with pytest.raises(tokens.TokenUnavailable):
            await sup.get(("https://denied.example",))
        fams = _scrape(m)
        assert value(fams, "token_cache_hit_count_total", audience=static) == 1
        assert value(fams, "token_cache_miss_count_total", audience="https://dyn.example") == 1
        assert value(fams, "token_fetch_count_total", audience="https://dyn.example", result="ok") == 1
        assert value(fams, "token_refresh_total", audience="https://dyn.example", result="ok") is None
        denied = {"audience": "https://denied.example", "result": "error", "error_class": "AccessDenied"}
        assert value(fams, "token_fetch_count_total", **denied) == 1
        assert value(fams, "token_fetch_duration_seconds_count", result="error") == 1
        assert value(fams, "token_cached_audiences") == 3
        assert value(fams, "token_expiry_seconds", audience="https://denied.example") == 0
        assert value(fams, "token_expiry_seconds", audience="https://dyn.example") is not None

        with pytest.raises(tokens.TokenUnavailable):  # a 4th set evicts the least recently used
            await sup.get(("https://later.example",))
        fams = _scrape(m)
        assert value(fams, "token_cached_audiences") == 3
        assert value(fams, "token_expiry_seconds", audience="https://dyn.example") is None
        # The evicted set's per-audience series go with it: their number stays bounded.
        assert value(fams, "token_cache_miss_count_total", audience="https://dyn.example") is None
        assert value(fams, "token_fetch_count_total", audience="https://dyn.example", result="ok") is None
        assert value(fams, "token_cache_hit_count_total", audience=static) == 1
        nursery.cancel_scope.cancel()


# ---- several worker processes ---------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import sys
    from aws_outbound_jwt_proxy.observe.metrics import Metrics
    from aws_outbound_jwt_proxy.tokens.supervisor import SetState
    n, active, left = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    m = Metrics()
    sets = [SetState("https://a", True, left, False, None)]
    m.watch(lambda: sets)
    m.tokens.cached_sets(1)
    m.tokens.fetch_finished("https://a", True, None, 0.05, True)
    for _ in range(n):
        m.request_started()
        m.request_finished("GET", 200, 0.01)
        m.upstream_finished("up.example", "https", None, 0.01, None, "ok")
    for _ in range(active):
        m.request_started()
    m.tokens.cache_hit("https://a")
    print("written", flush=True)
    for line in sys.stdin:  # stay alive (live gauges) until told to stop
        if line.strip() == "drop":  # the set leaves this worker's cache
            sets = []
            m.tokens.cached_sets(0)
            print("dropped", flush=True)
        else:
            break
    m.close()
    """
)
_SCRAPE = (
    "from aws_outbound_jwt_proxy.observe.metrics import Metrics; print(Metrics().render('')[0].decode())"
)


@pytest.fixture
def multiproc_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}


def _scrape_process(env: dict[str, str]) -> Families:
    """A third process (the one answering the scrape) reads every worker's files."""
    out = subprocess.run([sys.executable, "-c", _SCRAPE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return parse_scrape(out.stdout)


def _tell(worker: subprocess.Popen[str], line: str) -> None:
    assert worker.stdin is not None
    worker.stdin.write(line + "\n")
    worker.stdin.flush()


def test_multiprocess_scrape_sums_workers(multiproc_env: dict[str, str]) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(n), str(active), str(left)],
            env=multiproc_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n, active, left in ((3, 2, 600.0), (5, 1, 300.0))
    ]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline() == "written\n"
        fams = _scrape_process(multiproc_env)
        labels = {"http_request_method": "GET", "http_response_status_code": "200"}
        assert value(fams, "http_server_request_duration_seconds_count", **labels) == 8
        assert value(fams, "http_server_request_duration_seconds_bucket", le="0.01", **labels) == 8
        client = {"server_address": "up.example", "token_result": "ok"}
        assert value(fams, "http_client_request_duration_seconds_count", **client) == 8
        assert value(fams, "http_server_active_requests") == 3  # livesum
        assert value(fams, "token_cached_audiences") == 2  # livesum: sets cached over all workers
        assert value(fams, "token_cache_hit_count_total", audience="https://a") == 2
        assert value(fams, "token_refresh_total", audience="https://a", result="ok") == 2
        left = value(fams, "token_expiry_seconds", audience="https://a")  # the soonest over live workers
        assert left is not None and 250 < left <= 300
        assert "token_expiry_unixtime_internal" not in fams
        assert "python_info" in fams and "process_cpu_seconds" not in fams

        # the set leaves the second worker's cache: its expiry no longer counts
        _tell(workers[1], "drop")
        assert workers[1].stdout is not None and workers[1].stdout.readline() == "dropped\n"
        fams = _scrape_process(multiproc_env)
        assert value(fams, "token_cached_audiences") == 1
        left = value(fams, "token_expiry_seconds", audience="https://a")
        assert left is not None and 550 < left <= 600

        # the second worker stops cleanly: its live gauges leave, its counters stay
        _tell(workers[1], "stop")
        assert workers[1].wait(30) == 0
        fams = _scrape_process(multiproc_env)
        assert value(fams, "http_server_active_requests") == 2
        assert value(fams, "http_server_request_duration_seconds_count", **labels) == 8
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(5)


# ---- end to end: the real proxy app, supervisor and STS emulator, over real ports ----------


async def _upstream_app(scope: health.Scope, receive: health.Receive, send: health.Send) -> None:
    """A tiny upstream: ``/slow`` never answers; anything else is 200 naming the path it saw."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":
        await trio.sleep_forever()
    body = f"upstream saw {scope['method']} {scope['path']}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


async def _serve_bound(nursery: trio.Nursery, app: object, host: str, port: int, what: str) -> str:
    cfg = binding.hypercorn_config(host, port)
    sockets = binding.bind(cfg, what)
    binds: list[str] = await nursery.start(partial(serve.serve_app, app, cfg, sockets, trio.sleep_forever))
    return binds[0]


async def _start_proxy(
    nursery: trio.Nursery, emu: StsEmulator, *args: str
) -> tuple[str, str, Metrics, health.Readiness]:
    """What serve.run does for the metrics listener, wired by hand: (proxy url, metrics url, ...)."""
    settings = config.load(
        ["--listen-addr", "127.0.0.1:0", "--metrics-listen-addr", "127.0.0.1:0", "--upstream-scheme", "http",
         "--upstream-timeout", "300ms", *args],
        {},
    )  # fmt: skip
    m = Metrics()
    sup = tokens.Supervisor(settings, sts.StsFetcher(emu.boto3_client()), m.tokens)
    m.watch(sup.snapshot)
    readiness = health.Readiness(sup.ready, sup.snapshot)
    await nursery.start(sup.run)
    proxy = await _serve_bound(
        nursery,
        create_app(settings, sup, observer=m),
        settings.listen_host,
        settings.listen_port,
        "--listen-addr",
    )
    metrics_app = metrics.create_app(m, readiness, settings.metrics_path)
    metrics_url = await _serve_bound(
        nursery, metrics_app, settings.metrics_host, settings.metrics_port, "--metrics-listen-addr"
    )
    readiness.listening()
    return proxy, metrics_url, m, readiness


def test_metrics_port_in_use_is_a_startup_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = binding.hypercorn_config("127.0.0.1", port)
        with pytest.raises(binding.StartupError) as info:
            binding.bind(cfg, "--metrics-listen-addr")
    assert f"--metrics-listen-addr: cannot listen on 127.0.0.1:{port}" in str(info.value)


async def test_scrape_after_traffic(nursery: trio.Nursery, sts_emulator: StsEmulator) -> None:
    upstream = await _serve_bound(nursery, _upstream_app, "127.0.0.1", 0, "upstream")
    up_port = upstream.rsplit(":", 1)[1]
    proxy, metrics_url, _, _ = await _start_proxy(nursery, sts_emulator)
    refused = _closed_port()
    async with httpx.AsyncClient(base_url=proxy, timeout=10) as client:
        to = {"X-Upstream-Host": f"127.0.0.1:{up_port}"}
        r = await client.get("/metrics", headers=to)  # the proxy listener forwards /metrics like any path
        assert (r.status_code, r.text) == (200, "upstream saw GET /metrics")
        r = await client.request("BREW", "/pot", headers=to)
        assert r.status_code == 200
        r = await client.get("/x", headers={"X-Upstream-Host": f"127.0.0.1:{refused}"})
        assert r.status_code == 502
        r = await client.get("/slow", headers=to)
        assert r.status_code == 504
        sts_emulator.set_faults(error="AccessDenied", always=True)
        r = await client.get("/x", headers={"X-Upstream-Host": f"localhost:{up_port}"})
        assert (r.status_code, r.text) == (502, "token unavailable\n")
        r = await client.get("/healthz", headers=to)  # proxied too, never answered by the proxy
        assert r.text == "upstream saw GET /healthz"

    async with httpx.AsyncClient(base_url=metrics_url, timeout=10) as client:
        r = await client.get("/metrics")
        assert r.status_code == 200
        fams = parse_scrape(r.text)
        assert (await client.get("/readyz")).status_code == 200  # no static sets: ready once listening
    server = partial(value, fams, "http_server_request_duration_seconds_count")
    assert server(http_request_method="GET", http_response_status_code="200") == 2
    assert server(http_request_method="_OTHER", http_response_status_code="200") == 1
    assert server(http_request_method="GET", http_response_status_code="502") == 2
    assert server(http_request_method="GET", http_response_status_code="504") == 1
    assert value(fams, "http_server_active_requests") == 0

    client_count = partial(value, fams, "http_client_request_duration_seconds_count")
    ok = {"server_address": "127.0.0.1", "server_port": up_port, "token_result": "ok"}
    assert client_count(**ok) == 3
    assert client_count(**{**ok, "server_port": str(refused), "error_type": "connection_refused"}) == 1
    assert client_count(**ok, error_type="timeout") == 1
    fetch_error = {"server_address": "localhost", "server_port": up_port, "token_result": "fetch_error"}
    assert client_count(**fetch_error) == 1

    denied = {"audience": "http://localhost", "result": "error", "error_class": "AccessDenied"}
    assert value(fams, "token_fetch_count_total", **denied) == 1
    assert value(fams, "token_fetch_count_total", audience="http://127.0.0.1", result="ok") == 1
    assert value(fams, "token_cache_miss_count_total", audience="http://127.0.0.1") == 1
    assert value(fams, "token_cache_hit_count_total", audience="http://127.0.0.1") == 4
    assert value(fams, "token_cached_audiences") == 2
    left = value(fams, "token_expiry_seconds", audience="http://127.0.0.1")
    assert left is not None and 3000 < left <= 3600
    # the path is never a label; no JWT reaches the scrape
    assert "/slow" not in r.text and "/pot" not in r.text and "eyJ" not in r.text


async def test_readyz_flips_after_prewarm(nursery: trio.Nursery, sts_emulator: StsEmulator) -> None:
    sts_emulator.set_faults(latency_ms=1500, count=1)  # the pre-warm fetch takes 1.5 s
    _, metrics_url, _, readiness = await _start_proxy(
        nursery, sts_emulator, "--token-audience", "https://a.example"
    )
    async with httpx.AsyncClient(base_url=metrics_url, timeout=10) as client:
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {
            "status": "not ready",
            "reason": "no valid token for audience set https://a.example (fetching)",
        }
        with trio.fail_after(10):
            while (r := await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert r.json()["status"] == "ready"
        fams = parse_scrape((await client.get("/metrics")).text)
        assert value(fams, "token_refresh_total", audience="https://a.example", result="ok") == 1
        readiness.draining()
        assert (await client.get("/readyz")).status_code == 503


# ---- dashboards and alert rules use only series we export --------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
_SERIES = re.compile(r"\b((?:http|token|process)_[a-z_]+)\b")


def _exported() -> tuple[set[str], set[str]]:
    """Sample names and label names of a scrape with every series present."""
    m = Metrics()
    _record_everything(m)
    m.watch(lambda: [tokens.SetState("https://a", True, 100.0, False, None)])
    samples = [s for f in _scrape(m).values() for s in f.samples]
    return {s.name for s in samples}, {k for s in samples for k in s.labels}


def test_dashboard_and_alerts_reference_exported_series() -> None:
    exported, label_names = _exported()
    dashboard = json.loads((DEPLOY / "grafana" / "aws-outbound-jwt-proxy.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "aws-outbound-jwt-proxy-alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in _SERIES.findall(e)} - label_names
    assert len(used) >= 10
    assert used <= exported, used - exported


def test_drop_empty_labels_only_touches_optional_empty_labels() -> None:
    text = (
        b'a_count{server_address="h",server_port="",error_type="",token_result="ok"} 1.0\n'
        b'a_count{server_address="h",server_port="8443",error_type="timeout",token_result="ok"} 1.0\n'
        b'b_total{audience="x",result="ok",error_class=""} 2.0\n'
        b'c_total{audience="error_type=\\"\\",",result="ok"} 3.0\n'
    )
    assert drop_empty_labels(text) == (
        b'a_count{server_address="h",token_result="ok"} 1.0\n'
        b'a_count{server_address="h",server_port="8443",error_type="timeout",token_result="ok"} 1.0\n'
        b'b_total{audience="x",result="ok"} 2.0\n'
        b'c_total{audience="error_type=\\"\\",",result="ok"} 3.0\n'
    )


def test_upstream_labels_are_capped_and_idle_ones_dropped() -> None:
    now = [0.0]
    m = Metrics(max_upstreams=3, upstream_idle=60.0, clock=lambda: now[0])
    for i in range(10):  # ten distinct upstreams, several ports
        m.upstream_finished(f"h{i}.example", "https", 8000 + i, 0.01, None, "ok")
    fams = parse_scrape(m.render("")[0].decode())
    addresses = {s.labels["server_address"] for s in fams["http_client_request_duration_seconds"].samples}
    assert addresses == {"h0.example", "h1.example", "h2.example", "_OTHER"}
    count = partial(value, fams, "http_client_request_duration_seconds_count")
    assert count(server_address="_OTHER", server_port="_OTHER", token_result="ok") == 7
    # h0 stays busy; h1 and h2 go idle past the limit and lose their series at the next scrape
    now[0] = 61.0
    m.upstream_finished("h0.example", "https", 8000, 0.01, None, "ok")
    m.prepare()
    m.upstream_finished("h9.example", "https", 8009, 0.01, None, "ok")  # a freed place
    fams = parse_scrape(m.render("")[0].decode())
    addresses = {s.labels["server_address"] for s in fams["http_client_request_duration_seconds"].samples}
    assert addresses == {"h0.example", "h9.example", "_OTHER"}
