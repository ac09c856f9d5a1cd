"""Serve the proxy app in its own process (for RSS measurements): ``python tests/proxy_child.py FLAGS...``.

Builds Settings from the proxy flags, uses a fixed fake token (a test double
for the token layer only), serves with hypercorn's trio worker on
127.0.0.1:0 and prints ``LISTENING <url>`` on stdout once bound. Stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import sys
from functools import partial

import hypercorn.trio
import trio

from aws_outbound_jwt_proxy.config import settings as config
from aws_outbound_jwt_proxy.proxy.app import create_app
from aws_outbound_jwt_proxy.server.serve import hypercorn_config

FAKE_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaGlsZCJ9.c2lnbmF0dXJl"


class FixedTokens:
    async def get(self, audiences: tuple[str, ...]) -> str:
        return FAKE_JWT


async def main(argv: list[str]) -> None:
    settings = config.load(["--listen-addr", "127.0.0.1:0", "--metrics-enabled", "false", *argv], {})
    app = create_app(settings, FixedTokens())
    cfg = hypercorn_config("127.0.0.1", 0, graceful_timeout=1.0)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, cfg, shutdown_trigger=stop.wait))
        print("LISTENING", binds[0], flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                break


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
