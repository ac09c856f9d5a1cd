"""The default deny list, exercised inside a private network namespace (``unshare -n``, loopback only).

Nothing here sends a packet from the host: the proxy and its client run in a
child process inside a new network namespace whose only interface is ``lo``,
so an address the guard failed to refuse shows up as 502 (no route), never as
a request to a real metadata service.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Run by the child inside the namespace (the addresses below never leave it).
CHILD = r"""
import json, sys, tempfile, httpx, trio
from pathlib import Path
from tests.fixtures.intercept import write_ca
from tests.fixtures.proxy import FixedTokens, proxy_settings, running_proxy

TARGETS = [  # namespace-only: metadata, ECS, EKS Pod Identity, EC2 IPv6, mapped, numeric, Alibaba, link-local
    "169.254.169.254", "169.254.170.2", "169.254.170.23", "[fd00:ec2::254]",
    "[::ffff:169.254.169.254]", "2852039166", "0xa9fea9fe", "100.100.100.200", "[fe80::1]", "0.0.0.0", "[::]",
]

async def main():
    out = {}
    for name, flags in (("default", []), ("off", ["--denied-upstream-cidrs", ""])):
        settings = proxy_settings("--upstream-scheme", "http", "--upstream-timeout", "3s", *flags)
        tokens = FixedTokens()
        async with running_proxy(settings, tokens) as url, httpx.AsyncClient(timeout=10) as client:
            for host in TARGETS:
                r = await client.get(url + "/latest/meta-data/", headers={"X-Upstream-Host": host})
                out[f"{name} header {host}"] = r.status_code
            async with httpx.AsyncClient(proxy=url, timeout=10) as fwd:
                r = await fwd.get("http://169.254.169.254/latest/meta-data/")
                out[f"{name} absolute"] = r.status_code
        out[f"{name} tokens"] = len(tokens.asked)
    # CONNECT interception to an allow-listed metadata address: refused by the deny list.
    with tempfile.TemporaryDirectory() as tmp:
        ca = write_ca(Path(tmp))
        settings = proxy_settings(*ca.flags(), "--allowed-upstream-hosts", "169.254.169.254")
        async with running_proxy(settings, FixedTokens()) as url:
            host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                target = b"169.254.169.254:443"
                await stream.send_all(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
                answer = b""
                with trio.fail_after(10):
                    while b"\r\n\r\n" not in answer:
                        answer += await stream.receive_some(65536)
            out["connect head"] = answer.split(b"\r\n", 1)[0].decode()
    print(json.dumps(out))

trio.run(main)
"""


def _namespace_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _namespace_available(), reason="needs unshare -n (root) and ip to make a private namespace"
)
def test_default_deny_list_in_a_private_network_namespace() -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'src'}")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable, CHILD]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("connect head").startswith("HTTP/1.1 403 ")  # CONNECT to metadata, interception on
    default = {k: v for k, v in results.items() if k.startswith("default ") and k != "default tokens"}
    off = {k: v for k, v in results.items() if k.startswith("off ") and k != "off tokens"}
    assert set(default.values()) == {403}, default  # refused, in the namespace
    assert results["default tokens"] == 0  # every target is a literal: refused before any token
    assert 403 not in off.values() and 200 not in off.values(), off  # guard off: 502/504 in the namespace
