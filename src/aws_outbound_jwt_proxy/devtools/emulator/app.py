"""The emulator's HTTP side: a Quart-Trio app serving STS calls, OIDC discovery, JWKS and the admin API.

All decisions are made by the pure modules (:mod:`.sigv4`, :mod:`.params`,
:mod:`.claims`, :mod:`.faults`, :mod:`.render`); this module reads requests,
waits (fault latency, cancel-safe) and writes responses. Each STS call is
logged once (action, audiences, result — never the token or the credential)
and recorded for ``GET /_emulator/calls``.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from quart import Response, request
from quart_trio import QuartTrio

from ...config.settings import ALGORITHMS
from . import params, render, sigv4
from .claims import identity_for, token_claims
from .errors import StsError
from .faults import Fault, Faults, parse_rules
from .keys import Signer

log = logging.getLogger("aws_outbound_jwt_proxy.emulator")

MAX_CALLS = 10_000  # oldest calls are dropped beyond this
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class EmulatorOptions:
    """Settings of one emulator. ``credentials`` empty = accept any well-formed SigV4 signature."""

    host: str = "127.0.0.1"
    port: int = 4566
    issuer: str | None = None  # None = the bound base URL
    account_id: str = "123456789012"
    credentials: dict[str, str] = field(default_factory=dict)
    key_dir: Path | None = None
    enable_admin: bool = False


class Emulator:
    """State shared by the requests: keys, issuer, fault rules and the call record."""

    def __init__(self, options: EmulatorOptions, signer: Signer) -> None:
        self.options = options
        self.signer = signer
        self.issuer = options.issuer or ""
        self.faults = Faults()
        self.calls: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_CALLS)

    async def sts(self, signed: sigv4.SignedRequest, form: dict[str, str]) -> tuple[int, str, str]:
        """Answer one STS Query call: (HTTP status, XML body, request id)."""
        started = time.time()
        request_id = str(uuid.uuid4())
        audiences = params.members(form, "Audience")
        call: dict[str, Any] = {
            "action": form.get("Action", ""),
            "audiences": audiences,
            "duration": form.get("DurationSeconds"),
            "algorithm": form.get("SigningAlgorithm"),
            "tags": {k: v for k, v in params.tag_members(form) if k is not None and v is not None},
            "time": started,
            "request_id": request_id,
        }
        if isinstance(call["duration"], str) and call["duration"].isdigit():
            call["duration"] = int(call["duration"])
        try:
            status, body = await self._answer(signed, form, call, request_id)
            call["result"] = "ok"
        except StsError as exc:
            status = exc.status
            body = render.error(exc.type, exc.code, exc.message, request_id)
            call["result"] = exc.code
        call["status"] = status
        self.calls.append(call)
        log.info(
            "sts call",
            extra={
                "action": call["action"],
                "audiences": audiences,
                "result": call["result"],
                "status": status,
                "duration_ms": round((time.time() - started) * 1000, 1),
            },
        )
        return status, body, request_id

    async def _answer(
        self, signed: sigv4.SignedRequest, form: dict[str, str], call: dict[str, Any], request_id: str
    ) -> tuple[int, str]:
        auth = sigv4.check(signed, self.options.credentials, time.time())
        call["region"] = auth.region
        identity = identity_for(auth.access_key, self.options.account_id, auth.region)
        action = params.action(form)
        if action == "GetWebIdentityToken":
            token_request = params.token_request(form)
            fault = await self._fault(token_request.audiences)
            lifetime = token_request.duration
            if fault is not None and fault.expiration_seconds is not None:
                lifetime = fault.expiration_seconds
            now = int(time.time())
            claims = token_claims(
                identity, token_request, issuer=self.issuer, now=now, lifetime=lifetime, jti=str(uuid.uuid4())
            )
            token = self.signer.sign(token_request.algorithm, claims)
            call["expiration"] = claims["exp"]
            fields = {"WebIdentityToken": token, "Expiration": render.iso8601(claims["exp"])}
            return 200, render.success(action, fields, request_id)
        if action == "GetCallerIdentity":
            await self._fault(None)
            fields = {"UserId": f"{identity.role_id}:emulator", "Account": identity.account}
            fields["Arn"] = identity.session_arn
            return 200, render.success(action, fields, request_id)
        raise StsError("InvalidAction", f"Could not find operation {action} for version {params.VERSION}")

    async def _fault(self, audiences: tuple[str, ...] | None) -> Fault | None:
        """Apply the matching fault rule: wait its latency, raise its error, else return it."""
        fault = self.faults.take(audiences)
        if fault is None:
            return None
        if fault.latency_ms:
            await trio.sleep(fault.latency_ms / 1000)
        if fault.error is not None:
            raise StsError(fault.error, fault.message or "")
        return fault

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(ALGORITHMS),
            "scopes_supported": ["openid"],
            "claims_supported": ["iss", "sub", "aud", "iat", "exp", "jti", "https://sts.amazonaws.com/"],
        }


def _json(doc: object, status: int = 200) -> Response:
    return Response(json.dumps(doc, indent=1) + "\n", status, content_type="application/json")


def _form(body: bytes, content_type: str) -> dict[str, str]:
    if not content_type.lower().startswith("application/x-www-form-urlencoded"):
        return {}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def create_app(emulator: Emulator) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.route("/", methods=["GET", "POST"])
    async def sts() -> Response:
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        query = request.scope["query_string"].decode("latin-1")
        form = dict(parse_qsl(query, keep_blank_values=True)) | _form(body, request.content_type or "")
        headers = [(k.lower(), v) for k, v in request.headers.items()]
        path = request.scope.get("raw_path", b"/").decode("latin-1")
        signed = sigv4.SignedRequest(request.method, path, query, headers, body)
        status, xml, request_id = await emulator.sts(signed, form)
        response = Response(xml, status, content_type=render.CONTENT_TYPE)
        response.headers["x-amzn-RequestId"] = request_id
        return response

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> Response:
        return _json(emulator.discovery())

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        return _json(emulator.signer.jwks())

    if not emulator.options.enable_admin:
        return app

    @app.get("/_emulator/faults")
    async def get_faults() -> Response:
        return _json(emulator.faults.describe())

    @app.post("/_emulator/faults")
    async def set_faults() -> Response:
        try:
            rules = parse_rules(json.loads(await request.get_data(as_text=True)))
        except ValueError as exc:  # includes JSONDecodeError
            return _json({"error": str(exc)}, 400)
        emulator.faults.rules = rules
        log.info("faults set", extra={"faults": [r.describe() for r in rules]})
        return _json(emulator.faults.describe())

    @app.delete("/_emulator/faults")
    async def clear_faults() -> Response:
        emulator.faults.rules = []
        return _json([])

    @app.get("/_emulator/calls")
    async def get_calls() -> Response:
        return _json(list(emulator.calls))

    @app.delete("/_emulator/calls")
    async def clear_calls() -> Response:
        emulator.calls.clear()
        return _json([])

    return app
