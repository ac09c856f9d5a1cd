"""Proxy flags + env vars → one frozen :class:`Settings`, validated once.

The flag table is the drop-in contract with the Go reference (REFERENCE.md A1)
plus our additions. Every validation failure is a :class:`ConfigError` naming
the flag; the CLI prints it as one line and exits 2 before anything starts.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..routing.target import parse_authority
from . import flags
from .durations import parse_duration
from .flags import ConfigError, Flag

PROG = "aws-outbound-jwt-proxy"

PROXY_FLAGS: tuple[Flag, ...] = (
    Flag("listen-addr", ":8080", "host:port of the proxy listener (:8080 = all interfaces)"),
    Flag("upstream-host", "", "pinned upstream host[:port]; when set the routing header is ignored"),
    Flag("upstream-scheme", "https", "scheme for the outbound call: http or https"),
    Flag(
        "host-header",
        "X-Upstream-Host",
        "request header naming the upstream when not pinned; 'Host' = the request's own Host",
    ),
    Flag("upstream-timeout", "30s", "max wait for the upstream's response headers"),
    Flag(
        "token-audience",
        "",
        "static JWT audience; empty = dynamic audience <scheme>://<host>",
        repeatable=True,
        env_list=True,
    ),
    Flag("token-signing-algorithm", "RS256", "JWT signing algorithm: RS256 or ES384"),
    Flag("token-duration", "1h", "requested JWT lifetime, 60s..1h"),
    Flag("token-refresh-skew", "5m", "refresh this long before expiry (> 0, < token-duration)"),
    Flag(
        "token-tag",
        "",
        "key=value session tag put in the JWT's request_tags",
        repeatable=True,
        env_list=True,
        env_name="TOKEN_TAGS",
    ),
    Flag("token-cache-max-entries", "1024", "most audience sets kept (least recently used evicted)"),
    Flag("token-cache-idle-ttl", "1h", "a dynamic audience set unused this long is dropped"),
    Flag(
        "allowed-upstream-hosts",
        "",
        "header/Host routing only: allowed targets (host, host:port, *.suffix); empty = any",
        repeatable=True,
        env_list=True,
    ),
    Flag("upstream-ca-file", "", "PEM bundle to verify upstream TLS (default: system/certifi roots)"),
    Flag("shutdown-timeout", "10s", "on SIGTERM/SIGINT, how long in-flight requests may finish"),
    Flag("log-level", "info", "debug, info, warn or error"),
    Flag("log-format", "json", "json or text"),
    Flag("tls-cert", "", "PEM certificate for an HTTPS listener (with --tls-key)"),
    Flag("tls-key", "", "PEM private key for an HTTPS listener (with --tls-cert)"),
    Flag("metrics-enabled", "true", "serve Prometheus metrics and health probes", boolean=True),
    Flag("metrics-listen-addr", ":9090", "host:port of the metrics listener"),
    Flag("metrics-path", "/metrics", "path of the metrics endpoint on the metrics listener"),
)

DESCRIPTION = (
    "Reverse proxy that puts a short-lived AWS STS web identity JWT "
    "(Authorization: Bearer) on every outbound request.\n"
    "Sub-commands: sts-emulator, echo-upstream, demo (each has --help).\n"
    "AWS region and credentials come from the standard AWS chain; "
    "AWS_ENDPOINT_URL_STS points STS elsewhere."
)

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("json", "text")
ALGORITHMS = ("RS256", "ES384")

_TAG_KEY = re.compile(r"^[\w+=,.@:/-]{1,128}$")


@dataclass(frozen=True)
class Settings:
    """Everything the proxy needs, validated; never mutated after start-up."""

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_scheme: str
    host_header: str
    upstream_timeout: float
    token_audiences: tuple[str, ...]
    token_signing_algorithm: str
    token_duration: int
    token_refresh_skew: float
    token_tags: tuple[tuple[str, str], ...]
    token_cache_max_entries: int
    token_cache_idle_ttl: float
    allowed_upstream_hosts: tuple[str, ...]
    upstream_ca_file: str
    shutdown_timeout: float
    log_level: str
    log_format: str
    tls_cert: str
    tls_key: str
    metrics_enabled: bool
    metrics_host: str
    metrics_port: int
    metrics_path: str

    @property
    def pinned(self) -> bool:
        return self.upstream_host != ""

    @property
    def tls(self) -> bool:
        return self.tls_cert != ""


def _one(raw: flags.Raw, name: str) -> str:
    value = raw[name]
    assert isinstance(value, str)
    return value


def _many(raw: flags.Raw, name: str) -> list[str]:
    value = raw[name]
    assert isinstance(value, list)
    return value


def _duration(raw: flags.Raw, name: str) -> float:
    try:
        return parse_duration(_one(raw, name))
    except ValueError as exc:
        raise ConfigError(f"--{name}", str(exc)) from None


def _positive_int(raw: flags.Raw, name: str) -> int:
    text = _one(raw, name).strip()
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"--{name}", f"must be a positive integer, got {text!r}")
    return int(text)


def validate_upstream_host(value: str) -> str:
    if "://" in value:
        raise ConfigError("--upstream-host", f"must be host[:port] without a scheme, got {value!r}")

    try:
        parse_authority("https", value)
    except ValueError as exc:
        raise ConfigError("--upstream-host", f"must be host[:port]: {exc}, got {value!r}") from None
    return value


def _ca_file(path: str) -> str:
    if not path:
        return path
    if not os.path.isfile(path):
        raise ConfigError("--upstream-ca-file", f"file not found: {path}")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError("--upstream-ca-file", f"not a PEM certificate bundle: {path} ({exc})") from None
    return path


def _tls_pair(cert: str, key: str) -> None:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError("--tls-cert", f"cannot load certificate/key pair: {exc}") from None


def _tags(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in values:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError("--token-tag", f"must be key=value with both non-empty, got {item!r}")
        if not _TAG_KEY.match(key) or len(value) > 256:
            raise ConfigError("--token-tag", f"invalid tag {key!r} (key <= 128, value <= 256 chars)")
        if key in seen:
            raise ConfigError("--token-tag", f"duplicate tag key {key!r}")
        seen.add(key)
        out.append((key, value))
    if len(out) > 50:
        raise ConfigError("--token-tag", f"at most 50 tags, got {len(out)}")
    return tuple(out)


def _allowed_hosts(values: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    # Repeatable, and each value may itself be a comma list (as in the env var).
    for item in (part for value in values for part in value.split(",")):
        pattern = item.strip().lower()
        body = pattern[2:] if pattern.startswith("*.") else pattern
        if not body or "*" in body or "/" in body or any(c.isspace() for c in body):
            raise ConfigError(
                "--allowed-upstream-hosts",
                f"invalid pattern {item!r} (use host, host:port or *.suffix)",
            )
        out.append(pattern)
    return tuple(out)


def from_raw(raw: flags.Raw) -> Settings:
    """Validate raw flag strings into :class:`Settings` (raises ConfigError)."""
    listen_host, listen_port = flags.parse_listen_addr("listen-addr", _one(raw, "listen-addr"))

    scheme = _one(raw, "upstream-scheme").strip().lower()
    if scheme not in ("http", "https"):
        raise ConfigError("--upstream-scheme", f"must be http or https, got {scheme!r}")

    upstream_host = _one(raw, "upstream-host").strip()
    if upstream_host:
        validate_upstream_host(upstream_host)

    host_header = _one(raw, "host-header").strip()
    if not host_header:
        raise ConfigError("--host-header", "must not be empty")
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", host_header):
        raise ConfigError("--host-header", f"invalid header name {host_header!r}")

    tls_cert, tls_key = _one(raw, "tls-cert").strip(), _one(raw, "tls-key").strip()
    if bool(tls_cert) != bool(tls_key):
        missing = "--tls-key" if tls_cert else "--tls-cert"
        raise ConfigError(missing, "--tls-cert and --tls-key must be given together")
    for name, path in (("tls-cert", tls_cert), ("tls-key", tls_key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{name}", f"file not found: {path}")
    if tls_cert:
        _tls_pair(tls_cert, tls_key)

    upstream_timeout = _duration(raw, "upstream-timeout")
    if upstream_timeout <= 0:
        raise ConfigError("--upstream-timeout", "must be > 0")

    audiences: list[str] = []
    for aud in _many(raw, "token-audience"):
        if aud == "" or any(c.isspace() for c in aud):
            raise ConfigError("--token-audience", f"empty or contains whitespace: {aud!r}")
        audiences.append(aud)

    algorithm = _one(raw, "token-signing-algorithm").strip().upper()
    if algorithm not in ALGORITHMS:
        raise ConfigError("--token-signing-algorithm", f"must be RS256 or ES384, got {algorithm!r}")

    duration = _duration(raw, "token-duration")
    if not 60 <= duration <= 3600:
        raise ConfigError("--token-duration", "must be between 60s and 1h inclusive")
    skew = _duration(raw, "token-refresh-skew")
    if skew <= 0 or skew >= duration:
        raise ConfigError("--token-refresh-skew", "must be > 0 and < --token-duration")

    idle_ttl = _duration(raw, "token-cache-idle-ttl")
    if idle_ttl <= 0:
        raise ConfigError("--token-cache-idle-ttl", "must be > 0")
    shutdown_timeout = _duration(raw, "shutdown-timeout")
    if shutdown_timeout < 0:
        raise ConfigError("--shutdown-timeout", "must be >= 0")

    ca_file = _ca_file(_one(raw, "upstream-ca-file").strip())

    level = _one(raw, "log-level").strip().lower()
    if level == "warning":
        level = "warn"
    if level not in LOG_LEVELS:
        raise ConfigError("--log-level", f"must be one of debug, info, warn, error, got {level!r}")
    fmt = _one(raw, "log-format").strip().lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError("--log-format", f"must be json or text, got {fmt!r}")

    metrics_enabled = flags.parse_bool("metrics-enabled", _one(raw, "metrics-enabled"))
    metrics_addr = _one(raw, "metrics-listen-addr").strip()
    if not metrics_addr:
        raise ConfigError("--metrics-listen-addr", "must not be empty")
    metrics_host, metrics_port = flags.parse_listen_addr("metrics-listen-addr", metrics_addr)
    # Port 0 asks the OS for a free port, so two ":0" addresses never collide.
    same = (metrics_host, metrics_port) == (listen_host, listen_port)
    clash = same or metrics_addr == _one(raw, "listen-addr").strip()
    if metrics_enabled and clash and metrics_port != 0:
        raise ConfigError("--metrics-listen-addr", "must differ from --listen-addr")
    metrics_path = _one(raw, "metrics-path").strip()
    if not metrics_path.startswith("/"):
        raise ConfigError("--metrics-path", f"must start with '/', got {metrics_path!r}")

    return Settings(
        listen_host=listen_host,
        listen_port=listen_port,
        upstream_host=upstream_host,
        upstream_scheme=scheme,
        host_header=host_header,
        upstream_timeout=upstream_timeout,
        token_audiences=tuple(audiences),
        token_signing_algorithm=algorithm,
        token_duration=int(duration),
        token_refresh_skew=skew,
        token_tags=_tags(_many(raw, "token-tag")),
        token_cache_max_entries=_positive_int(raw, "token-cache-max-entries"),
        token_cache_idle_ttl=idle_ttl,
        allowed_upstream_hosts=_allowed_hosts(_many(raw, "allowed-upstream-hosts")),
        upstream_ca_file=ca_file,
        shutdown_timeout=shutdown_timeout,
        log_level=level,
        log_format=fmt,
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_enabled=metrics_enabled,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_path=metrics_path,
    )


def load(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse argv + env into Settings; raises ConfigError (argparse exits 2 itself)."""
    raw = flags.parse(PROG, DESCRIPTION, PROXY_FLAGS, argv, os.environ if env is None else env)
    return from_raw(raw)
