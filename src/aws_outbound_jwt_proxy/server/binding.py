"""The listening sockets, bound before anything runs: hypercorn's settings for them, one-line errors.

Light on purpose (hypercorn's config, the settings): the ``--workers``
supervisor binds here without loading the serving stack it never runs.
"""

from __future__ import annotations

import logging
import ssl
import sys
from dataclasses import dataclass

from hypercorn.config import Config as HyperConfig
from hypercorn.config import Sockets

from ..config import flags
from ..config.settings import Settings

EXIT_STARTUP = 1


class StartupError(Exception):
    """Start-up failed for a reason an operator can fix (the message says how)."""


def hypercorn_config(
    host: str,
    port: int,
    *,
    certfile: str = "",
    keyfile: str = "",
    graceful_timeout: float = 10.0,
    read_header_timeout: float = 10.0,
) -> HyperConfig:
    """hypercorn settings for a proxy: no request cap per connection, no own headers.

    ``read_header_timeout``: a connection must complete its request headers this long
    after it opened or after its previous response, else it is closed. hypercorn's
    keep-alive timer is exactly that: it runs while the connection has no request in
    progress and stops only when the headers are complete (dribbled bytes do not stop
    it), so an idle keep-alive connection is closed after it too, as Go does when no
    separate idle timeout is set.
    """
    cfg = HyperConfig()
    cfg.bind = [flags.bind_string(host, port)]
    if certfile:
        cfg.certfile = certfile
        cfg.keyfile = keyfile
    cfg.alpn_protocols = ["h2", "http/1.1"]
    cfg.graceful_timeout = graceful_timeout
    # hypercorn closes connections after 1,000 requests by default; a proxy must not.
    cfg.keep_alive_max_requests = sys.maxsize
    cfg.keep_alive_timeout = read_header_timeout
    # The upstream's Server/Date pass through; don't add a second copy.
    cfg.include_server_header = False
    cfg.include_date_header = False
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    return cfg


def bind(cfg: HyperConfig, what: str) -> Sockets:
    """Bind (and listen on) the configured address, or raise StartupError naming it."""
    try:
        sockets = cfg.create_sockets()
    except OSError as exc:
        raise StartupError(f"{what}: cannot listen on {', '.join(cfg.bind)}: {exc.strerror or exc}") from None
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"{what}: TLS certificate/key: {exc}") from None
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(cfg.backlog)
    return sockets


@dataclass(frozen=True)
class Bound:
    """The proxy's listening sockets (and the metrics listener's, when enabled), bound and listening."""

    proxy: Sockets
    metrics: Sockets | None


def proxy_config(settings: Settings) -> HyperConfig:
    """hypercorn settings of the proxy listener (address, TLS, drain, header timeout)."""
    return hypercorn_config(
        settings.listen_host,
        settings.listen_port,
        certfile=settings.tls_cert,
        keyfile=settings.tls_key,
        graceful_timeout=settings.shutdown_timeout,
        read_header_timeout=settings.read_header_timeout,
    )


def metrics_config(settings: Settings) -> HyperConfig:
    """hypercorn settings of the metrics and health listener."""
    return hypercorn_config(
        settings.metrics_host, settings.metrics_port, read_header_timeout=settings.read_header_timeout
    )


def bind_all(settings: Settings) -> Bound:
    """Bind every listener first: a port in use stops start-up before anything runs."""
    proxy_sockets = bind(proxy_config(settings), "--listen-addr")
    metrics_sockets = (
        bind(metrics_config(settings), "--metrics-listen-addr") if settings.metrics_enabled else None
    )
    return Bound(proxy_sockets, metrics_sockets)
