"""Proxy flags + env vars → one frozen :class:`Settings`, validated once.

:data:`PROXY_FLAGS` is the drop-in contract with the Go tool (same flag and
env var names) plus our additions. Each row declares a setting once: its
flag, env var, default, help and the parse function that checks the text and
turns it into the value of its :class:`Settings` field(s). The same table
builds ``--help``. Checks that need two values (TLS pair, skew < duration,
metrics address ≠ listen address, the interception CA pair and its allow-list)
run after that, in :func:`_check`.

Every failure is a :class:`ConfigError` naming what the user set (``--flag``
or ``ENV_VAR``); the CLI prints it as one line and exits 2 before anything starts.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..intercept import ca
from ..routing.egress import EgressConfigError, EgressProxies
from ..routing.guard import DEFAULT_DENIED_CIDRS, IPNetwork, parse_cidrs
from ..routing.target import parse_authority
from . import flags, values
from .flags import ConfigError, Flag, ListFlag
from .values import LOG_FORMATS, LOG_LEVELS

__all__ = [
    "ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PROG",
    "PROXY_FLAGS",
    "ConfigError",
    "Settings",
    "load",
]

PROG = "aws-outbound-jwt-proxy"
ALGORITHMS = ("RS256", "ES384")

DESCRIPTION = (
    "Reverse proxy that puts a short-lived AWS STS web identity JWT "
    "(Authorization: Bearer) on every outbound request.\n"
    "AWS region and credentials come from the standard AWS chain; "
    "AWS_ENDPOINT_URL_STS points STS elsewhere."
)

_TAG_KEY = re.compile(r"^[\w+=,.@:/-]{1,128}$")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 header name


# ---- one value at a time -----------------------------------------------------------------


def _upstream_host(value: str) -> str:
    host = value.strip()
    if not host:
        return host
    if "://" in host:
        raise ValueError(f"must be host[:port] without a scheme, got {host!r}")
    try:
        parse_authority("https", host)
    except ValueError as exc:
        raise ValueError(f"must be host[:port]: {exc}, got {host!r}") from None
    return host


def _scheme(value: str) -> str:
    scheme = value.strip().lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"must be http or https, got {scheme!r}")
    return scheme


def _host_header(value: str) -> str:
    name = value.strip()
    if not name:
        raise ValueError("must not be empty")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


def _audiences(items: list[str]) -> tuple[str, ...]:
    for aud in items:
        if aud == "" or any(c.isspace() for c in aud):
            raise ValueError(f"empty or contains whitespace: {aud!r}")
    return tuple(items)


def _algorithm(value: str) -> str:
    algorithm = value.strip().upper()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"must be RS256 or ES384, got {algorithm!r}")
    return algorithm


_lifetime = values.duration(at_least=60, at_most=3600)


def _token_duration(value: str) -> int:
    return int(_lifetime(value))


def _tags(items: list[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"must be key=value with both non-empty, got {item!r}")
        if not _TAG_KEY.match(key) or len(value) > 256:
            raise ValueError(f"invalid tag {key!r} (key <= 128, value <= 256 chars)")
        if key in seen:
            raise ValueError(f"duplicate tag key {key!r}")
        seen.add(key)
        out.append((key, value))
    if len(out) > 50:
        raise ValueError(f"at most 50 tags, got {len(out)}")
    return tuple(out)


def _allowed_hosts(items: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    # Repeatable, and each value may itself be a comma list (as in the env var).
    for item in (part for value in items for part in value.split(",")):
        pattern = item.strip().lower()
        body = pattern[2:] if pattern.startswith("*.") else pattern
        if not body or "*" in body or "/" in body or any(c.isspace() for c in body):
            raise ValueError(f"invalid pattern {item!r} (use host, host:port or *.suffix)")
        out.append(pattern)
    return tuple(out)


def _ca_file(value: str) -> str:
    path = value.strip()
    if not path:
        return path
    if not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"not a PEM certificate bundle: {path} ({exc})") from None
    return path


def _intercept_cert(value: str) -> str:
    path = value.strip()
    if path:
        ca.read_certificate(path)  # ValueError: unreadable, not PEM, not a CA, expired
    return path


def _intercept_key(value: str) -> str:
    path = value.strip()
    if path:
        ca.read_key(path)  # ValueError: unreadable, not PEM, encrypted
    return path


def _rate(value: str) -> float:
    text = value.strip()
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"must be a number of calls per second, got {text!r}") from None
    if not rate >= 0 or rate == float("inf"):
        raise ValueError(f"must be >= 0 (0 = no limit), got {text!r}")
    return rate


def _denied_cidrs(items: list[str]) -> tuple[IPNetwork, ...]:
    # Repeatable, and each value may itself be a comma list (as in the env var); "" turns it off.
    return parse_cidrs(part for value in items for part in value.split(","))


def _file(value: str) -> str:
    path = value.strip()
    if path and not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    return path


MAX_WORKERS = 64


def _workers(value: str) -> int:
    count = values.positive_int(value)
    if count > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS} (one per CPU core is plenty), got {count}")
    return count


def _metrics_path(value: str) -> str:
    path = value.strip()
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {path!r}")
    return path


LISTEN_ADDR = Flag(
    "listen-addr",
    ":8080",
    values.listen_addr,
    "host:port of the proxy listener (:8080 = all interfaces)",
    into=("listen_host", "listen_port"),
)
TOKEN_DURATION = Flag("token-duration", "1h", _token_duration, "requested JWT lifetime, 60s..1h")
TOKEN_REFRESH_SKEW = Flag(
    "token-refresh-skew",
    "5m",
    values.duration(above=0),
    "refresh this long before expiry (> 0, < token-duration)",
)
TLS_CERT = Flag("tls-cert", "", _file, "PEM certificate for an HTTPS listener (with --tls-key)")
TLS_KEY = Flag("tls-key", "", _file, "PEM private key for an HTTPS listener (with --tls-cert)")
UPSTREAM_HOST = Flag(
    "upstream-host",
    "",
    _upstream_host,
    "pinned upstream host[:port]; when set the routing header is ignored",
)
ALLOWED_UPSTREAM_HOSTS = ListFlag(
    "allowed-upstream-hosts",
    "",
    _allowed_hosts,
    "header/Host routing and intercepted CONNECT: allowed targets (host, host:port, *.suffix); empty = any",
)
INTERCEPT_CA_CERT = Flag(
    "intercept-ca-cert",
    "",
    _intercept_cert,
    "PEM CA certificate: intercept HTTPS (CONNECT) to allowed hosts with leaves it signs "
    "(with --intercept-ca-key; local development)",
)
INTERCEPT_CA_KEY = Flag(
    "intercept-ca-key", "", _intercept_key, "PEM private key of --intercept-ca-cert; keep it private"
)
METRICS_ENABLED = Flag(
    "metrics-enabled", "true", values.boolean, "serve Prometheus metrics and health probes", boolean=True
)
METRICS_LISTEN_ADDR = Flag(
    "metrics-listen-addr",
    ":9090",
    values.listen_addr,
    "host:port of the metrics listener",
    into=("metrics_host", "metrics_port"),
)

PROXY_FLAGS: tuple[flags.Row, ...] = (
    LISTEN_ADDR,
    UPSTREAM_HOST,
    Flag("upstream-scheme", "https", _scheme, "scheme for the outbound call: http or https"),
    Flag(
        "host-header",
        "X-Upstream-Host",
        _host_header,
        "request header naming the upstream when not pinned; 'Host' = the request's own Host",
    ),
    Flag(
        "upstream-timeout",
        "30s",
        values.duration(above=0),
        "max wait for the upstream's response headers",
    ),
    ListFlag(
        "token-audience",
        "",
        _audiences,
        "static JWT audience; empty = dynamic audience <scheme>://<host>",
        into="token_audiences",
    ),
    Flag("token-signing-algorithm", "RS256", _algorithm, "JWT signing algorithm: RS256 or ES384"),
    TOKEN_DURATION,
    TOKEN_REFRESH_SKEW,
    ListFlag(
        "token-tag",
        "",
        _tags,
        "key=value session tag put in the JWT's request_tags",
        into="token_tags",
        env_name="TOKEN_TAGS",
    ),
    Flag(
        "token-cache-max-entries",
        "1024",
        values.positive_int,
        "most audience sets kept (least recently used evicted)",
    ),
    Flag(
        "sts-max-rate",
        "20",
        _rate,
        "STS calls per second at most (small burst); refreshes go first, new sets get 503; 0 = no limit",
    ),
    Flag(
        "token-cache-idle-ttl",
        "1h",
        values.duration(above=0),
        "a dynamic audience set unused this long is dropped",
    ),
    ALLOWED_UPSTREAM_HOSTS,
    ListFlag(
        "denied-upstream-cidrs",
        ",".join(DEFAULT_DENIED_CIDRS),
        _denied_cidrs,
        "SSRF guard: ranges routed requests never reach; empty = off",
    ),
    Flag(
        "upstream-ca-file",
        "",
        _ca_file,
        "PEM bundle that replaces the system trust store for upstream TLS",
    ),
    INTERCEPT_CA_CERT,
    INTERCEPT_CA_KEY,
    Flag(
        "read-header-timeout",
        "10s",
        values.duration(above=0),
        "close a connection that has not sent complete request headers this long after it opened "
        "or after its previous response",
    ),
    Flag(
        "request-body-timeout",
        "60s",
        values.duration(above=0),
        "abort a request whose body sends no byte for this long (408)",
    ),
    Flag(
        "shutdown-timeout",
        "10s",
        values.duration(at_least=0),
        "on SIGTERM/SIGINT, how long in-flight requests may finish",
    ),
    Flag(
        "workers",
        "1",
        _workers,
        "processes serving the proxy, sharing its listeners, each with its own token cache; "
        "1 = this process alone",
    ),
    *values.log_flags(),
    TLS_CERT,
    TLS_KEY,
    METRICS_ENABLED,
    METRICS_LISTEN_ADDR,
    Flag("metrics-path", "/metrics", _metrics_path, "path of the metrics endpoint on the metrics listener"),
    Flag(
        "metrics-max-upstreams",
        "100",
        values.positive_int,
        "distinct upstreams with series of their own; the rest share server_address=_OTHER",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Everything the proxy needs, validated; never mutated after start-up.

    Built from :data:`PROXY_FLAGS`: every field is filled by the row naming it.
    """

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
    sts_max_rate: float
    allowed_upstream_hosts: tuple[str, ...]
    denied_upstream_cidrs: tuple[IPNetwork, ...]
    upstream_ca_file: str
    intercept_ca_cert: str
    intercept_ca_key: str
    read_header_timeout: float
    request_body_timeout: float
    shutdown_timeout: float
    workers: int
    log_level: str
    log_format: str
    tls_cert: str
    tls_key: str
    metrics_enabled: bool
    metrics_host: str
    metrics_port: int
    metrics_path: str
    metrics_max_upstreams: int
    # Not a flag: HTTP_PROXY / HTTPS_PROXY / NO_PROXY (either case), as Go reads them.
    egress: EgressProxies = field(default_factory=EgressProxies)

    @property
    def pinned(self) -> bool:
        return self.upstream_host != ""

    @property
    def tls(self) -> bool:
        return self.tls_cert != ""

    @property
    def intercepting(self) -> bool:
        """CONNECT to an allowed host is intercepted (TLS terminated with a leaf from the CA)."""
        return self.intercept_ca_cert != ""


# ---- values that must agree ------------------------------------------------------------


def _check(s: Settings, given: flags.Values) -> None:
    """Cross-field checks; each error names the value to change, as the user set it."""
    if bool(s.tls_cert) != bool(s.tls_key):
        have, missing = (TLS_CERT, TLS_KEY) if s.tls_cert else (TLS_KEY, TLS_CERT)
        raise ConfigError(
            given.name(missing, like=have),
            f"{given.name(TLS_CERT, like=have)} and {given.name(TLS_KEY, like=have)} must be given together",
        )
    if s.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(s.tls_cert, s.tls_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(given.name(TLS_CERT), f"cannot load certificate/key pair: {exc}") from None

    if s.intercept_ca_cert or s.intercept_ca_key:
        _check_interception(s, given)

    if s.token_refresh_skew >= s.token_duration:
        duration = f"{given.name(TOKEN_DURATION, like=TOKEN_REFRESH_SKEW)} ({values.show(s.token_duration)})"
        raise ConfigError(
            given.name(TOKEN_REFRESH_SKEW, like=TOKEN_DURATION),
            f"must be < {duration}, got {values.show(s.token_refresh_skew)}",
        )

    # Port 0 asks the OS for a free port, so two ":0" addresses never collide.
    def everywhere(host: str) -> str:
        return "0.0.0.0" if host == "" else host

    same = (everywhere(s.metrics_host), s.metrics_port) == (everywhere(s.listen_host), s.listen_port)
    if s.metrics_enabled and same and s.metrics_port != 0:
        raise ConfigError(
            given.name(METRICS_LISTEN_ADDR, like=LISTEN_ADDR),
            f"must differ from {given.name(LISTEN_ADDR, like=METRICS_LISTEN_ADDR)}",
        )


def _check_interception(s: Settings, given: flags.Values) -> None:
    cert, key = INTERCEPT_CA_CERT, INTERCEPT_CA_KEY
    if bool(s.intercept_ca_cert) != bool(s.intercept_ca_key):
        have, missing = (cert, key) if s.intercept_ca_cert else (key, cert)
        raise ConfigError(
            given.name(missing, like=have),
            f"{given.name(cert, like=have)} and {given.name(key, like=have)} must be given together",
        )
    if s.pinned:
        raise ConfigError(
            given.name(cert),
            f"cannot be combined with {given.name(UPSTREAM_HOST, like=cert)}: "
            "interception forwards to the host each CONNECT names",
        )
    if not s.allowed_upstream_hosts:
        raise ConfigError(
            given.name(ALLOWED_UPSTREAM_HOSTS, like=cert),
            f"required with {given.name(cert)}: interception only tunnels to allowed hosts",
        )
    try:
        ca.load(s.intercept_ca_cert, s.intercept_ca_key)
    except ca.CAError as exc:
        raise ConfigError(given.name(cert if exc.which == "cert" else key), str(exc)) from None


# ---- entry points ----------------------------------------------------------------------


def _usage(commands: Sequence[str]) -> str:
    usage = "%(prog)s [--FLAG VALUE ...]"
    if commands:
        usage += "\n       %(prog)s {" + ",".join(commands) + "} [ARGS ...]"
    return usage


def _epilog(commands: Mapping[str, str]) -> str | None:
    if not commands:
        return None
    width = max(len(name) for name in commands) + 2
    lines = [f"  {name:<{width}}{summary}" for name, summary in commands.items()]
    return "commands (each has --help):\n" + "\n".join(lines)


def load(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    commands: Mapping[str, str] | None = None,
    version: str | None = None,
) -> Settings:
    """Parse argv + env into Settings; raises ConfigError (argparse exits itself: 2, or 0 for --help).

    ``commands`` (name → one-line summary) are the CLI's sub-commands, listed in
    the usage line and ``--help``; ``version`` enables ``--version``.
    """
    commands = commands or {}
    given = flags.parse(
        PROG,
        DESCRIPTION,
        PROXY_FLAGS,
        argv,
        os.environ if env is None else env,
        usage=_usage(list(commands)),
        epilog=_epilog(commands),
        version=version,
    )
    env = os.environ if env is None else env
    try:
        egress = EgressProxies.from_environ(env)
    except EgressConfigError as exc:
        variable, _, message = str(exc).partition(": ")
        raise ConfigError(variable, message) from None
    settings = Settings(**given.fields(), egress=egress)
    _check(settings, given)
    return settings
