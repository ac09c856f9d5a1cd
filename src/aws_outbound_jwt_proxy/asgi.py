"""``hypercorn --worker-class trio aws_outbound_jwt_proxy.asgi:app`` — configured from env.

The same app as the console script. Here hypercorn owns the proxy sockets and
the process, so the token supervisor and the metrics listener run in the app's
lifespan nursery. With ``-w N`` every worker binds the metrics address with
SO_REUSEPORT; set ``PROMETHEUS_MULTIPROC_DIR`` so any worker's scrape covers all.
"""

from __future__ import annotations

import logging
import os

import trio
from quart_trio import QuartTrio

from .config import flags
from .config import settings as config
from .observe import health, logs, metrics
from .proxy.app import create_app
from .server import patches, serve
from .tokens import sts
from .tokens import supervisor as tokens

log = logging.getLogger("aws_outbound_jwt_proxy.asgi")


def build() -> QuartTrio:
    try:
        settings = config.load([], os.environ)
    except flags.ConfigError as exc:
        flags.fail(config.PROG, exc)
    logs.setup(settings.log_level, settings.log_format)
    patches.install()
    m: metrics.Metrics | metrics.NullMetrics = (
        metrics.Metrics() if settings.metrics_enabled else metrics.NullMetrics()
    )
    supervisor = tokens.Supervisor(settings, sts.build_fetcher(), m.tokens)
    readiness = health.Readiness(supervisor.ready, supervisor.snapshot)
    app = create_app(settings, supervisor, observer=m)

    @app.before_serving
    async def start_background() -> None:
        await app.nursery.start(supervisor.run)
        if isinstance(m, metrics.Metrics):
            m.watch(supervisor.snapshot)
            cfg = serve.hypercorn_config(settings.metrics_host, settings.metrics_port)
            cfg.workers = 2  # only makes hypercorn set SO_REUSEPORT: workers share the port
            sockets = serve.bind(cfg, "--metrics-listen-addr")
            metrics_app = metrics.create_app(m, readiness, settings.metrics_path)
            binds = await app.nursery.start(serve.serve_app, metrics_app, cfg, sockets, trio.sleep_forever)
            log.info("metrics listening", extra={"addresses": binds, "path": settings.metrics_path})
        readiness.listening()

    @app.after_serving
    async def stop_background() -> None:
        readiness.draining()
        m.close()

    return app


app = build()
