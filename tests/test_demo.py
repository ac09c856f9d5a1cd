"""``aws-outbound-jwt-proxy demo``: one verified request, keeps serving, Ctrl-C exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.fixtures.process import base_env


def test_demo_verifies_a_request_and_exits_0_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aws_outbound_jwt_proxy",
            "demo",
            "--listen-addr",
            "127.0.0.1:0",
            "--metrics-listen-addr",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=base_env(),
    )
    out: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip("\n"))
            if "Ctrl-C to stop" in line:
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert done.wait(60), out
        text = "\n".join(out)
        assert "→ 200" in text, text
        assert "aud  http://127.0.0.1" in text
        assert "Authorization: Bearer ey" in text
        # Only a prefix of the token is printed, never a whole JWT (three dot-separated parts).
        assert not any(line.count(".") >= 2 and "Bearer" in line for line in out)
        curl = next(line for line in out if "curl -s" in line).split("curl -s ", 1)[1]
        resp = httpx.get(curl, timeout=30)
        assert resp.status_code == 200
        assert resp.json()["claims"]["aud"] == "http://127.0.0.1"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(20) == 0
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_demo_checks_the_proxy_flags_before_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aws_outbound_jwt_proxy", "demo", "--token-signing-algorithm", "HS256"],
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(),
    )
    assert result.returncode == 2
    assert result.stderr == (
        "aws-outbound-jwt-proxy demo: error: --token-signing-algorithm: must be RS256 or ES384, got 'HS256'\n"
    )
    assert result.stdout == ""
