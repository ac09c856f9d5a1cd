"""``echo-upstream``: a test upstream that echoes each request as JSON and can verify its bearer JWT.

Any method, any path. The reply says what arrived: method, the request target
exactly as sent (ASGI ``raw_path`` + ``query_string``), headers in order with
duplicates, and the body's length and sha256 — hashed chunk by chunk straight
from the ASGI receive channel, so a multi-GB upload runs in flat memory
(Quart's request body would buffer without backpressure, so HTTP is handled
below Quart's routing; Quart still runs the lifespan). With ``--issuer`` the
bearer token is checked by :class:`~.verify.Verifier` first: invalid or missing
→ 401 ``{"error": "invalid_token", "reason": ...}``, valid → the claims are
echoed too. One log line per request shows Host and a truncated credential.
With ``--tls-cert``/``--tls-key`` it serves HTTPS (HTTP/2 and HTTP/1.1 by ALPN),
as the upstream of an intercepted tunnel must.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import hypercorn.trio
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart_trio import QuartTrio

from ..config import flags, values
from ..config.flags import ConfigError, Flag
from ..observe import logs
from ..server.binding import hypercorn_config
from ..server.running import run
from .verify import InvalidToken, KeysUnavailable, Verifier

log = logging.getLogger("aws_outbound_jwt_proxy.echo")

PROG = "aws-outbound-jwt-proxy echo-upstream"
DESCRIPTION = (
    "Test upstream: echoes every request (method, raw target, headers, body length and sha256) "
    "as JSON.\nWith --issuer it verifies the bearer JWT like a third party would "
    "(OIDC discovery, JWKS, signature, exp, iss, aud) and answers 401 when it is invalid."
)


def _issuer(value: str) -> str | None:
    issuer = value.strip()
    if issuer and (not issuer.startswith(("http://", "https://")) or any(c in issuer for c in "?# ")):
        raise ValueError(f"must be an http(s) URL without query or fragment, got {issuer!r}")
    return issuer or None


def _audience(value: str) -> str | None:
    audience = value.strip()
    if any(c.isspace() for c in audience):
        raise ValueError(f"must not contain whitespace, got {audience!r}")
    return audience or None


LISTEN_ADDR = Flag(
    "listen-addr",
    "127.0.0.1:8081",
    values.listen_addr,
    "host:port to listen on (port 0 = any free port)",
    into=("host", "port"),
)
ISSUER = Flag(
    "issuer", "", _issuer, "OIDC issuer URL; when set every request needs a valid bearer JWT from it"
)
AUDIENCE = Flag(
    "audience",
    "",
    _audience,
    "with --issuer: aud must contain this; empty = any aud, but aud must be present",
)


def _file(value: str) -> str:
    path = value.strip()
    if path and not os.path.isfile(path):
        raise ValueError(f"file not found: {path}")
    return path


TLS_CERT = Flag("tls-cert", "", _file, "PEM certificate: serve HTTPS (with --tls-key)")
TLS_KEY = Flag("tls-key", "", _file, "PEM private key of --tls-cert")
FLAGS: tuple[flags.Row, ...] = flags.prefixed(
    "ECHO_UPSTREAM_",
    (
        LISTEN_ADDR,
        ISSUER,
        AUDIENCE,
        TLS_CERT,
        TLS_KEY,
        Flag(
            "leeway",
            "60s",
            values.duration(at_least=0, at_most=3600),
            "clock skew allowed when checking exp, iat and nbf",
        ),
        *values.log_flags(),
    ),
)
SHOWN_CHARS = 12  # of a credential, in the request log line
ERRORS = {401: "invalid_token", 503: "keys_unavailable"}


@dataclass(frozen=True)
class Options:
    """What :func:`serve` needs. ``issuer=None`` = echo only, no verification."""

    host: str = "127.0.0.1"
    port: int = 8081
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 60.0
    tls_cert: str = ""  # with tls_key: serve HTTPS
    tls_key: str = ""


# ---- configuration -------------------------------------------------------


def load(argv: Sequence[str], env: Mapping[str, str]) -> tuple[Options, str, str]:
    """Flags (then env vars) → (options, log level, log format); raises ConfigError."""
    given = flags.parse(PROG, DESCRIPTION, FLAGS, argv, env)
    options = given.build(Options)
    if options.audience is not None and options.issuer is None:
        raise ConfigError(given.name(AUDIENCE), f"only makes sense with {given.name(ISSUER, like=AUDIENCE)}")
    if bool(options.tls_cert) != bool(options.tls_key):
        have, missing = (TLS_CERT, TLS_KEY) if options.tls_cert else (TLS_KEY, TLS_CERT)
        cert, key = given.name(TLS_CERT, like=have), given.name(TLS_KEY, like=have)
        raise ConfigError(given.name(missing, like=have), f"{cert} and {key} must be given together")
    if options.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                options.tls_cert, options.tls_key
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(given.name(TLS_CERT), f"cannot load certificate/key pair: {exc}") from None
    fields = given.fields()
    return options, fields["log_level"], fields["log_format"]


# ---- pure request helpers ------------------------------------------------


def redact(credential: str) -> str:
    """``"Bearer eyJhbGciOiJSUzI1NiJ9..."`` → ``"Bearer eyJhbGciOiJS…"``: never the whole secret.

    At most 12 characters and at most a third of the secret are shown.
    """
    scheme, _, secret = credential.strip().partition(" ")
    if not secret:  # no scheme: the whole value is the secret
        scheme, secret = "", scheme
    secret = secret.strip()
    shown = secret[: min(SHOWN_CHARS, len(secret) // 3)] + "…" if secret else ""
    return f"{scheme} {shown}".strip()


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The token of the one ``Authorization: Bearer`` header, else InvalidToken."""
    values = [value for name, value in headers if name.lower() == b"authorization"]
    if not values:
        raise InvalidToken("missing bearer token")
    if len(values) > 1:
        raise InvalidToken("more than one Authorization header")
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("missing bearer token")
    if " " in token:
        raise InvalidToken("malformed token")
    return token


def target(scope: HTTPScope) -> str:
    """Path and query exactly as the client sent them (bytes kept 1:1 via latin-1)."""
    path = scope["raw_path"].decode("latin-1")
    query = scope["query_string"].decode("latin-1")
    return f"{path}?{query}" if query else path


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    return next((v.decode("latin-1") for n, v in headers if n.lower() == name), "")


def echo_document(
    scope: HTTPScope, length: int, sha256: str, claims: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON a 200 reply carries (see docs/echo-upstream.md)."""
    doc: dict[str, Any] = {
        "method": scope["method"],
        "target": target(scope),
        "path": scope["raw_path"].decode("latin-1"),
        "query": scope["query_string"].decode("latin-1"),
        "http_version": scope["http_version"],
        "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope["headers"]],
        "body": {"length": length, "sha256": sha256},
    }
    if claims is not None:
        doc["claims"] = claims
    return doc


def log_fields(scope: HTTPScope, status: int, length: int, reason: str | None) -> dict[str, Any]:
    """Fields of the one log line per request: Host and a redacted credential, never a whole token."""
    authorization = header_value(scope["headers"], b"authorization")
    fields: dict[str, Any] = {
        "method": scope["method"],
        "target": target(scope),
        "host": header_value(scope["headers"], b"host"),  # hypercorn maps HTTP/2 :authority to host
        "authorization": redact(authorization) if authorization else "none",
        "status": status,
        "body_bytes": length,
    }
    if reason is not None:
        fields["reason"] = reason
    return fields


# ---- the app -------------------------------------------------------------


async def read_body(receive: ASGIReceiveCallable) -> tuple[int, str] | None:
    """(length, sha256 hex) of the request body, streamed; None if the client left."""
    digest = hashlib.sha256()
    length = 0
    while True:
        event = await receive()
        if event["type"] != "http.request":
            return None
        chunk = event.get("body", b"")
        digest.update(chunk)
        length += len(chunk)
        if not event.get("more_body", False):
            return length, digest.hexdigest()


class EchoApp(QuartTrio):
    """Quart-Trio app whose every HTTP request is answered by :meth:`echo` at the ASGI level."""

    def __init__(self, verifier: Verifier | None) -> None:
        super().__init__(__name__)
        self.verifier = verifier

    async def asgi_app(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            await self.echo(scope, receive, send)
        else:
            await super().asgi_app(scope, receive, send)

    async def echo(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        headers = list(scope["headers"])
        status, claims, reason = 200, None, None
        if self.verifier is not None:
            try:
                claims = await self.verifier.verify(bearer_token(headers))
            except InvalidToken as exc:
                status, reason = 401, exc.reason
            except KeysUnavailable as exc:
                status, reason = 503, exc.reason
        # Read (and hash) the body even when refusing, so the client can finish sending.
        body = await read_body(receive)
        if body is None:
            return
        length, sha256 = body
        if reason is None:
            doc = echo_document(scope, length, sha256, claims)
        else:
            doc = {"error": ERRORS[status], "reason": reason}
        log.info("request", extra=log_fields(scope, status, length, reason))
        payload = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        response_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
        if status == 401:
            response_headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        if scope["method"] == "HEAD":
            payload = b""
        await send({"type": "http.response.body", "body": payload, "more_body": False})


# ---- serving -------------------------------------------------------------


async def serve(options: Options, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind, report the base URL (``http(s)://127.0.0.1:PORT``) via task_status, serve until cancelled."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
        verifier = None
        if options.issuer is not None:
            verifier = Verifier(options.issuer, options.audience, options.leeway, http)
        app = EchoApp(verifier)
        async with trio.open_nursery() as nursery:
            # No access log: EchoApp logs each request.
            config = hypercorn_config(
                options.host, options.port, certfile=options.tls_cert, keyfile=options.tls_key
            )
            config.include_server_header = config.include_date_header = True  # a plain server's headers
            binds: list[str] = await nursery.start(partial(hypercorn.trio.serve, app, config))
            url = binds[0]
            log.info(
                "echo upstream listening",
                extra={
                    "url": url,
                    "addr": url.partition("://")[2],
                    "issuer": options.issuer or "",
                    "audience": options.audience or "",
                },
            )
            task_status.started(url)


def main(argv: list[str]) -> int:
    try:
        options, level, fmt = load(argv, os.environ)
    except ConfigError as exc:
        flags.fail(PROG, exc)
    logs.setup(level, fmt)
    addr = flags.bind_string(options.host, options.port)
    return run(log, serve, options, addr=addr, errors=(OSError,), failed="echo upstream failed")
