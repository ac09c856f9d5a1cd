"""The real proxy process end to end: emulator as STS, verifying echo as upstream.

Covers serving (console script, ``python -m``, the ``hypercorn`` command),
TLS + HTTP/2, h2c, graceful shutdown, start-up errors and the log contract.
"""

from __future__ import annotations

import datetime
import gc
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aws_outbound_jwt_proxy.server import serve
from tests.fixtures.echo import EchoFactory, EchoUpstream
from tests.fixtures.emulator import StsEmulator
from tests.fixtures.process import ProxyFactory, ProxyProcess, base_env
from tests.fixtures.upstreams import HeldUpstream

AUD = "http://127.0.0.1"  # dynamic audience of any http://127.0.0.1:<port> target


def _proxy_to_echo(
    sts: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory, *flags: str
) -> tuple[EchoUpstream, ProxyProcess]:
    """A verifying echo upstream trusting ``sts``, and the real proxy pinned to it over http."""
    echo = echo_upstream(sts.issuer, AUD)
    proxy = proxy_process(
        ["--upstream-host", echo.host, "--upstream-scheme", "http", *flags], base_env(sts.env)
    )
    return echo, proxy


def _h2c_upgrade(path: bytes, settings: bytes) -> bytes:
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n"
    )


def _bearer(echo_doc: dict[str, Any]) -> str:
    values = [v for n, v in echo_doc["headers"] if n.lower() == "authorization"]
    assert len(values) == 1, echo_doc["headers"]
    return str(values[0])


def test_verified_request_end_to_end(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo, proxy = _proxy_to_echo(sts_emulator, echo_upstream, proxy_process, "--log-level", "debug")
    resp = httpx.get(
        f"{proxy.url}/v1/items%2Fa//b?x=1&x=2",
        headers={"Authorization": "Basic c2VjcmV0", "X-Trace": "t1"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["target"] == "/v1/items%2Fa//b?x=1&x=2"
    assert doc["claims"]["aud"] == AUD
    assert doc["claims"]["iss"] == sts_emulator.issuer
    bearer = _bearer(doc)
    assert bearer.startswith("Bearer ey")
    token = bearer.split(" ", 1)[1]

    rec = proxy.wait_for(lambda r: r.get("msg") == "request" and r.get("status") == 200)
    assert rec["method"] == "GET"
    assert rec["path"] == "/v1/items%2Fa//b"
    assert rec["target"] == echo.host
    assert isinstance(rec["duration_ms"], (int, float))
    # Every stderr line is one JSON object (hypercorn's own lines included),
    # and neither the JWT nor the AWS secret appears anywhere, even at debug.
    records = proxy.records()
    assert any("Running on" in r.get("msg", "") for r in records)
    text = "\n".join(proxy.lines)
    assert token not in text
    assert token.split(".")[2] not in text
    assert sts_emulator.secret_key not in text
    assert "c2VjcmV0" not in text


def test_bogus_credentials_give_502_token_unavailable(
    sts_emulator_strict: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream(sts_emulator_strict.issuer, AUD)
    env = base_env(sts_emulator_strict.env)
    env["AWS_SECRET_ACCESS_KEY"] = "definitely-wrong"
    proxy = proxy_process(["--upstream-host", echo.host, "--upstream-scheme", "http"], env)
    resp = httpx.get(f"{proxy.url}/secret", timeout=30)
    assert resp.status_code == 502
    assert resp.text.strip() == "token unavailable"
    err = proxy.wait_for(lambda r: r.get("level") == "error" and "error_class" in r)
    assert err["error_class"] == "SignatureDoesNotMatch"
    assert "definitely-wrong" not in "\n".join(proxy.lines)
    # The upstream was never called.
    assert not [r for r in echo.records() if r.get("target") == "/secret"]


def test_sigterm_drains_in_flight_then_exits_0(
    sts_emulator: StsEmulator, held_upstream: HeldUpstream, proxy_process: ProxyFactory
) -> None:
    pinned = ["--upstream-host", held_upstream.host, "--upstream-scheme", "http"]
    proxy = proxy_process([*pinned, "--token-audience", "https://drain.example"], base_env(sts_emulator.env))
    request = held_upstream.hold(f"{proxy.url}/slow")
    proxy.proc.send_signal(15)
    proxy.wait_for(lambda r: r.get("msg") == "shutting down")
    # New connections are refused once shutdown began.
    port = int(proxy.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "listener still accepting after SIGTERM"
        time.sleep(0.05)
    assert proxy.proc.poll() is None, "exited before the in-flight request finished"
    held_upstream.release.set()
    resp = request.finished()
    assert isinstance(resp, httpx.Response) and (resp.status_code, resp.text) == (200, "finished")
    assert proxy.proc.wait(20) == 0


def test_shutdown_timeout_bounds_the_wait(
    sts_emulator: StsEmulator, held_upstream: HeldUpstream, proxy_process: ProxyFactory
) -> None:
    proxy = proxy_process(
        ["--upstream-host", held_upstream.host, "--upstream-scheme", "http", "--shutdown-timeout", "1s"],
        base_env(sts_emulator.env),
    )
    request = held_upstream.hold(f"{proxy.url}/stuck")
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 8
    # The request that outlived --shutdown-timeout was cut, not answered.
    outcome = request.finished(10)
    assert isinstance(outcome, httpx.HTTPError), outcome


def test_port_in_use_is_a_startup_error(sts_emulator: StsEmulator, proxy_process: ProxyFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        proxy = proxy_process(
            ["--listen-addr", addr, "--upstream-host", "x.example"], base_env(sts_emulator.env), wait=False
        )
        assert proxy.proc.wait(30) == 1
        errors = [r for r in proxy.records() if r.get("level") == "error"]
        assert errors and addr in errors[-1]["msg"]


def test_metrics_port_in_use_is_a_startup_error(
    sts_emulator: StsEmulator, proxy_process: ProxyFactory
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        proxy = proxy_process(
            ["--metrics-listen-addr", addr, "--upstream-host", "x.example"],
            base_env(sts_emulator.env),
            wait=False,
        )
        assert proxy.proc.wait(30) == 1
        errors = [r for r in proxy.records() if r.get("level") == "error"]
        assert errors and addr in errors[-1]["msg"] and "--metrics-listen-addr" in errors[-1]["msg"]


def test_text_log_format(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    echo = echo_upstream(sts_emulator.issuer, AUD)
    proxy = proxy_process(
        ["--upstream-host", echo.host, "--upstream-scheme", "http", "--log-format", "text"],
        base_env(sts_emulator.env),
        wait=False,
    )
    deadline = time.monotonic() + 30
    url = ""
    while not url:
        assert time.monotonic() < deadline and proxy.proc.poll() is None, proxy.lines
        for line in list(proxy.lines):
            if "proxy listening" in line and "addresses=" in line:
                url = line.split("http://", 1)[1].split("'", 1)[0].split('"', 1)[0].rstrip("]")
        time.sleep(0.05)
    resp = httpx.get(f"http://{url}/t", timeout=30)
    assert resp.status_code == 200
    deadline = time.monotonic() + 10
    while not any(" request " in f" {line} " and "status=200" in line for line in proxy.lines):
        assert time.monotonic() < deadline, proxy.lines
        time.sleep(0.05)
    line = next(line for line in proxy.lines if "status=200" in line)
    assert "method=GET" in line and "path=/t" in line and "duration_ms=" in line


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_listener_speaks_h2_and_http11(
    tmp_path: Path, sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    cert, key = _self_signed(tmp_path)
    _, proxy = _proxy_to_echo(
        sts_emulator, echo_upstream, proxy_process, "--tls-cert", str(cert), "--tls-key", str(key)
    )
    assert proxy.url.startswith("https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(http2=True, verify=ctx, timeout=30) as client:
        resp = client.get(f"{proxy.url}/h2")
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert resp.json()["claims"]["aud"] == AUD
    with httpx.Client(verify=ctx, timeout=30) as client:
        resp = client.get(f"{proxy.url}/h1")
    assert resp.status_code == 200 and resp.http_version == "HTTP/1.1"


def test_h2c_prior_knowledge(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    _, proxy = _proxy_to_echo(sts_emulator, echo_upstream, proxy_process)
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        resp = client.get(f"{proxy.url}/h2c")
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert resp.json()["claims"]["aud"] == AUD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hypercorn_command_serves_the_same_app(
    tmp_path: Path, sts_emulator: StsEmulator, echo_upstream: EchoFactory
) -> None:
    echo = echo_upstream(sts_emulator.issuer, AUD)
    port = _free_port()
    env = base_env(sts_emulator.env)
    env.update({"UPSTREAM_HOST": echo.host, "UPSTREAM_SCHEME": "http", "METRICS_ENABLED": "false"})
    env["WORKERS"] = "3"  # the console script's; hypercorn's -w decides here
    hypercorn = Path(sys.executable).with_name("hypercorn")
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [
                str(hypercorn),
                "--worker-class",
                "trio",
                "--bind",
                f"127.0.0.1:{port}",
                "aws_outbound_jwt_proxy.asgi:app",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    resp = httpx.get(f"http://127.0.0.1:{port}/via-hypercorn", timeout=30)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "hypercorn exited"
                    assert time.monotonic() < deadline, "hypercorn never served"
                    time.sleep(0.1)
            assert resp.status_code == 200, resp.text
            assert resp.json()["claims"]["aud"] == AUD
        finally:
            proc.terminate()
            proc.wait(20)
    # hypercorn's own lines ("Running on ...") come out in our JSON format too.
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("Running on" in r["msg"] for r in records)
    assert any(r["msg"] == "request" and r["path"] == "/via-hypercorn" for r in records)
    ignored = [r for r in records if r["msg"].startswith("WORKERS is ignored")]
    assert len(ignored) == 1 and ignored[0]["level"] == "warn", records


def test_h2c_upgrade(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:

    import h2.config
    import h2.connection
    import h2.events

    _, proxy = _proxy_to_echo(sts_emulator, echo_upstream, proxy_process)
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()  # already base64url
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(_h2c_upgrade(b"/upgraded", settings) + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(conn.data_to_send())
        status, body, done = None, b"", False
        events = conn.receive_data(rest) if rest else []
        while not done:
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                    done = True
            sock.sendall(conn.data_to_send())
            if not done:
                data = sock.recv(65536)
                assert data, "connection closed before the response ended"
                events = conn.receive_data(data)
    assert status == b"200"
    doc = json.loads(body)
    assert doc["target"] == "/upgraded"
    assert doc["claims"]["aud"] == AUD


def test_malformed_h2c_settings_end_one_connection_not_the_proxy(
    sts_emulator: StsEmulator, echo_upstream: EchoFactory, proxy_process: ProxyFactory
) -> None:
    # hypercorn raises on an HTTP2-Settings value that is not valid base64 (found by
    # hand); without the per-connection guard that stopped the whole server.
    _, proxy = _proxy_to_echo(sts_emulator, echo_upstream, proxy_process)
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(_h2c_upgrade(b"/", b"QUFB") + b"Authorization: Basic c2VjcmV0\r\n\r\n")
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            while sock.recv(65536):
                pass
    assert proxy.proc.poll() is None
    assert httpx.get(f"{proxy.url}/still-serving", timeout=30).status_code == 200
    proxy.wait_for(lambda r: r.get("msg") == "connection failed")
    assert "c2VjcmV0" not in "\n".join(proxy.lines)


def test_host_mode_request_naming_the_proxy_is_a_loop_not_a_storm(
    sts_emulator: StsEmulator, proxy_process: ProxyFactory
) -> None:
    proxy = proxy_process(["--host-header", "Host", "--upstream-scheme", "http"], base_env(sts_emulator.env))
    resp = httpx.get(f"{proxy.url}/loop", timeout=10)  # Host: the proxy's own address
    assert resp.status_code == 508
    assert "loop" in resp.text
    requests = [r for r in proxy.records() if r.get("msg") == "request"]
    assert len(requests) <= 1 and not sts_emulator.calls()


def test_freeze_startup_heap_puts_what_exists_out_of_the_collectors_reach() -> None:
    # The proxy calls this once it serves: what start-up built is never walked again.
    survivors = [{"n": n} for n in range(1000)]
    thresholds = gc.get_threshold()
    try:
        serve.freeze_startup_heap()
        assert gc.get_freeze_count() >= len(survivors)
        # and young collections are rarer: requests leave no cycles for them to find
        assert gc.get_threshold() == (serve.YOUNG_GC_THRESHOLD, *thresholds[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
