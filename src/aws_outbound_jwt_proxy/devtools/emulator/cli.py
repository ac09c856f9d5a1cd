"""``sts-emulator`` command: flags (or env vars) → EmulatorOptions → serve until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from joserfc.errors import JoseError

from ...config import flags
from ...config.flags import ConfigError, Flag
from ...observe import logs
from ...server.running import run
from .app import EmulatorOptions
from .server import serve

log = logging.getLogger("aws_outbound_jwt_proxy.emulator")

PROG = "aws-outbound-jwt-proxy sts-emulator"
DESCRIPTION = (
    "Local STS emulator for development and tests (never production).\n"
    "Answers GetWebIdentityToken and GetCallerIdentity like AWS STS (Query protocol, SigV4), mints "
    "real RS256/ES384 JWTs and serves OIDC discovery and JWKS. Point boto3 at it with "
    "AWS_ENDPOINT_URL_STS=http://HOST:PORT."
)
FLAGS: tuple[Flag, ...] = flags.prefixed(
    "STS_EMULATOR_",
    (
        Flag("listen-addr", "127.0.0.1:4566", "host:port to listen on (port 0 = any free port)"),
        Flag(
            "issuer", "", "iss claim and discovery issuer; empty = the listener's base URL http://host:port"
        ),
        Flag("account-id", "123456789012", "12-digit AWS account id used in ARNs and claims"),
        Flag(
            "credential",
            "",
            "AKID:SECRET accepted, SigV4 signature verified; none = any well-formed signature passes",
            repeatable=True,
            env_list=True,
            metavar="AKID:SECRET",
        ),
        Flag(
            "key-dir", "", "directory keeping the signing keys across restarts; empty = new keys each start"
        ),
        Flag("enable-admin", "false", "serve the /_emulator/ fault and call-record API", boolean=True),
        Flag("log-level", "info", "debug, info, warn or error"),
        Flag("log-format", "json", "json or text"),
    ),
)


def load(argv: Sequence[str], env: Mapping[str, str]) -> tuple[EmulatorOptions, str, str]:
    """Flags (then env vars) → (options, log level, log format); raises ConfigError."""
    raw = flags.parse(PROG, DESCRIPTION, FLAGS, argv, env)
    values = {name: value for name, value in raw.items() if isinstance(value, str)}
    host, port = flags.parse_listen_addr("listen-addr", values["listen-addr"])
    issuer = values["issuer"].strip().rstrip("/")
    if issuer and (not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", issuer)):
        raise ConfigError("--issuer", f"must be an http(s) URL without query or fragment, got {issuer!r}")
    account = values["account-id"].strip()
    if not re.fullmatch(r"\d{12}", account):
        raise ConfigError("--account-id", f"must be 12 digits, got {account!r}")
    credentials: dict[str, str] = {}
    for item in raw["credential"]:
        akid, sep, secret = item.partition(":")
        if not sep or not akid.strip() or not secret or any(c.isspace() for c in akid):
            raise ConfigError("--credential", "must be ACCESS_KEY_ID:SECRET_ACCESS_KEY")
        credentials[akid] = secret
    key_dir = Path(values["key-dir"]) if values["key-dir"].strip() else None
    if key_dir is not None and key_dir.exists() and not key_dir.is_dir():
        raise ConfigError("--key-dir", f"{str(key_dir)!r} exists and is not a directory")
    enable_admin = flags.parse_bool("enable-admin", values["enable-admin"])
    level, fmt = values["log-level"].strip().lower(), values["log-format"].strip().lower()
    if level not in logs.LEVELS:
        raise ConfigError("--log-level", f"must be debug, info, warn or error, got {level!r}")
    if fmt not in ("json", "text"):
        raise ConfigError("--log-format", f"must be json or text, got {fmt!r}")
    options = EmulatorOptions(host, port, issuer or None, account, credentials, key_dir, enable_admin)
    return options, level, fmt


def main(argv: list[str]) -> int:
    try:
        options, level, fmt = load(argv, os.environ)
    except ConfigError as exc:
        flags.fail(PROG, exc)
    logs.setup(level, fmt)
    addr = flags.bind_string(options.host, options.port)
    return run(
        log, serve, options, addr=addr, errors=(OSError, ValueError, JoseError), failed="sts emulator failed"
    )
