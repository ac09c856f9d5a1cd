"""Serve the emulator with hypercorn's trio worker: bind, report the real URL, serve until cancelled."""

from __future__ import annotations

import logging
from functools import partial

import hypercorn.trio
import trio

from ...server.binding import hypercorn_config
from .app import Emulator, EmulatorOptions, create_app
from .keys import Signer

log = logging.getLogger("aws_outbound_jwt_proxy.emulator")

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


def issuer_for(base_url: str) -> str:
    """The default issuer: the bound base URL, with a wildcard host replaced by loopback."""
    scheme, _, hostport = base_url.partition("://")
    host, _, port = hostport.rpartition(":")
    return f"{scheme}://{_WILDCARDS.get(host, host)}:{port}"


async def serve(
    options: EmulatorOptions, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Bind (port 0 = any free port), call ``task_status.started(base_url)``, serve until cancelled.

    Logs ``sts emulator listening`` with ``url`` and ``issuer`` once bound.
    Keys come from ``options.key_dir`` when set (created there the first time).
    """
    signer = await trio.to_thread.run_sync(Signer.create, options.key_dir)
    emulator = Emulator(options, signer)
    app = create_app(emulator)
    config = hypercorn_config(options.host, options.port)  # no access log: the app logs each STS call
    config.include_server_header = config.include_date_header = True  # as STS does; only the proxy omits them
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(hypercorn.trio.serve, app, config))
        url = binds[0]
        emulator.issuer = options.issuer or issuer_for(url)
        log.info(
            "sts emulator listening",
            extra={
                "url": url,
                "addr": url.partition("://")[2],
                "issuer": emulator.issuer,
                "admin": options.enable_admin,
                "verify_signatures": bool(options.credentials),
                "kids": {alg: signer.kid(alg) for alg in signer.keys},
            },
        )
        task_status.started(url)
