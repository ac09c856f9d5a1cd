"""``sts-emulator`` command: flags (or env vars) → EmulatorOptions → serve until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from joserfc.errors import JoseError

from ...config import flags, values
from ...config.flags import ConfigError, Flag, ListFlag
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


def _issuer(value: str) -> str | None:
    issuer = value.strip().rstrip("/")
    if issuer and not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", issuer):
        raise ValueError(f"must be an http(s) URL without query or fragment, got {issuer!r}")
    return issuer or None


def _account_id(value: str) -> str:
    account = value.strip()
    if not re.fullmatch(r"\d{12}", account):
        raise ValueError(f"must be 12 digits, got {account!r}")
    return account


def _credentials(items: list[str]) -> dict[str, str]:
    credentials: dict[str, str] = {}
    for item in items:
        akid, sep, secret = item.partition(":")
        if not sep or not akid.strip() or not secret or any(c.isspace() for c in akid):
            raise ValueError("must be ACCESS_KEY_ID:SECRET_ACCESS_KEY")
        credentials[akid] = secret
    return credentials


def _key_dir(value: str) -> Path | None:
    key_dir = Path(value) if value.strip() else None
    if key_dir is not None and key_dir.exists() and not key_dir.is_dir():
        raise ValueError(f"{str(key_dir)!r} exists and is not a directory")
    return key_dir


FLAGS: tuple[flags.Row, ...] = flags.prefixed(
    "STS_EMULATOR_",
    (
        Flag(
            "listen-addr",
            "127.0.0.1:4566",
            values.listen_addr,
            "host:port to listen on (port 0 = any free port)",
            into=("host", "port"),
        ),
        Flag(
            "issuer",
            "",
            _issuer,
            "iss claim and discovery issuer; empty = the listener's base URL http://host:port",
        ),
        Flag("account-id", "123456789012", _account_id, "12-digit AWS account id used in ARNs and claims"),
        ListFlag(
            "credential",
            "",
            _credentials,
            "AKID:SECRET accepted, SigV4 signature verified; none = any well-formed signature passes",
            into="credentials",
            metavar="AKID:SECRET",
        ),
        Flag(
            "key-dir",
            "",
            _key_dir,
            "directory keeping the signing keys across restarts; empty = new keys each start",
        ),
        Flag(
            "enable-admin",
            "false",
            values.boolean,
            "serve the /_emulator/ fault and call-record API",
            boolean=True,
        ),
        *values.log_flags(),
    ),
)


def load(argv: Sequence[str], env: Mapping[str, str]) -> tuple[EmulatorOptions, str, str]:
    """Flags (then env vars) → (options, log level, log format); raises ConfigError."""
    given = flags.parse(PROG, DESCRIPTION, FLAGS, argv, env)
    fields = given.fields()
    return given.build(EmulatorOptions), fields["log_level"], fields["log_format"]


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
