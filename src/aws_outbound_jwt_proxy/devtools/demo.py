"""``aws-outbound-jwt-proxy demo``: STS emulator + verifying upstream + proxy, one nursery.

Everything listens on loopback. One request goes through the proxy, the
upstream verifies the JWT (discovery → JWKS → signature, exp, iss, aud) and
the demo prints what it verified; then it keeps serving until Ctrl-C.
This process points boto3 at the local emulator, never at AWS.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import httpx
import trio

from ..config import flags, values
from ..config import settings as config
from ..config.flags import ConfigError, Flag
from ..observe import logs
from ..server import binding, serve
from ..tokens import sts
from . import echo
from .emulator import EmulatorOptions
from .emulator import serve as serve_emulator

PROG = "aws-outbound-jwt-proxy demo"
DESCRIPTION = (
    "Run the local STS emulator, a verifying echo upstream and the proxy together,\n"
    "send one request through and print what the upstream verified. Ctrl-C to stop.\n"
    "Development only: boto3 in this process talks to the emulator, never to AWS."
)
FLAGS: tuple[flags.Row, ...] = (
    Flag("listen-addr", "127.0.0.1:8080", values.text, "proxy listener", no_env=True),
    Flag("metrics-listen-addr", "127.0.0.1:9090", values.text, "metrics/health listener", no_env=True),
    Flag(
        "sts-listen-addr",
        "127.0.0.1:0",
        values.listen_addr,
        "STS emulator listener (port 0 = any free port)",
        no_env=True,
    ),
    Flag("upstream-listen-addr", "127.0.0.1:0", values.listen_addr, "echo upstream listener", no_env=True),
    Flag("token-signing-algorithm", "RS256", values.text, "RS256 or ES384", no_env=True),
    values.log_level_flag("warn", "proxy log level", no_env=True),
)
SHOWN = 16  # characters of the token printed


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _authority(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def _show_claims(claims: dict[str, Any]) -> None:
    for name in ("iss", "sub", "aud", "iat", "exp", "jti"):
        if name in claims:
            _say(f"    {name:4} {claims[name]}")
    aws = claims.get("https://sts.amazonaws.com/")
    if isinstance(aws, dict):
        _say("    https://sts.amazonaws.com/:")
        for key, value in aws.items():
            _say(f"      {key}: {value}")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    # Handled here rather than as KeyboardInterrupt, which hypercorn's serve loop swallows.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _proxy_args(raw: dict[str, Any], upstream: str) -> list[str]:
    """The proxy's command line: the demo's proxy flags, pinned to the echo upstream."""
    return [
        f"--listen-addr={raw['listen_addr']}",
        f"--metrics-listen-addr={raw['metrics_listen_addr']}",
        f"--token-signing-algorithm={raw['token_signing_algorithm']}",
        f"--log-level={raw['log_level']}",
        f"--upstream-host={upstream}",
        "--upstream-scheme=http",
        "--log-format=text",
        "--shutdown-timeout=2s",
    ]


async def run(raw: dict[str, Any], *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """``raw``: the flags' values by dest; the proxy's addresses as text, the others as (host, port)."""
    sts_host, sts_port = raw["sts_listen_addr"]
    up_host, up_port = raw["upstream_listen_addr"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        sts_url: str = await nursery.start(serve_emulator, EmulatorOptions(host=sts_host, port=sts_port))
        os.environ.update(
            {
                "AWS_ENDPOINT_URL_STS": sts_url,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "AKIADEMODEMODEMO0000",
                "AWS_SECRET_ACCESS_KEY": "demo-secret-not-a-real-key",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        audience = "http://127.0.0.1"  # the dynamic audience for http://127.0.0.1:<port>
        upstream_url: str = await nursery.start(
            echo.serve, echo.Options(host=up_host, port=up_port, issuer=sts_url, audience=audience)
        )
        settings = config.load(_proxy_args(raw, _authority(upstream_url)), env={})
        fetcher = await trio.to_thread.run_sync(sts.build_fetcher)
        binds: list[str] = await nursery.start(partial(serve.run, settings, fetcher, handle_signals=False))
        proxy_url = binds[0]

        _say(f"STS emulator     {sts_url}  (issuer, OIDC discovery, JWKS)")
        _say(f"echo upstream    {upstream_url}  (verifies bearer JWTs from that issuer, aud {audience})")
        _say(f"proxy            {proxy_url}  → {upstream_url}")
        _say()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            resp = await client.get(
                f"{proxy_url}/hello?from=demo", headers={"Authorization": "Basic c2VjcmV0"}
            )
        _say(f"GET {proxy_url}/hello?from=demo → {resp.status_code}")
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code == 200 and isinstance(body.get("claims"), dict):
            auth = next((v for n, v in body.get("headers", []) if n.lower() == "authorization"), "")
            _say("the upstream received (your Authorization header was replaced):")
            _say(f"    Authorization: {auth[: len('Bearer ') + SHOWN]}…")
            _say("and verified the JWT (discovery → JWKS → signature, exp, iss, aud):")
            _show_claims(body["claims"])
        else:
            _say(f"unexpected answer: {resp.text[:300]}")
        _say()
        _say("Try it yourself:")
        _say(f"    curl -s {proxy_url}/anything?x=1")
        _say("Ctrl-C to stop.")
        task_status.started(proxy_url)


def main(argv: list[str] | Sequence[str]) -> int:
    try:
        raw = flags.parse(PROG, DESCRIPTION, FLAGS, list(argv), {}).fields()
        # The proxy's own settings are checked now, before anything starts.
        config.load(_proxy_args(raw, "127.0.0.1:1"), env={})
    except ConfigError as exc:
        flags.fail(PROG, exc)
    logs.setup(raw["log_level"], "text")
    try:
        trio.run(run, raw)
    except KeyboardInterrupt:  # Ctrl-C before the signal receiver was installed
        pass
    except binding.StartupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    _say("stopped")
    return 0
