"""AWS Signature Version 4 checks (pure): parse the Authorization header, recompute the signature.

The canonical request follows the SigV4 specification as botocore's
``SigV4Auth`` builds it: method, normalised URI path, sorted raw query pairs,
the signed headers (lower-case name, whitespace-collapsed values, repeated
values joined by ``,``), the signed-header list and the body's SHA-256 (or the
``x-amz-content-sha256`` header when the client sent one).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from .errors import StsError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "sts"
MAX_SKEW_SECONDS = 15 * 60
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Authorization:
    """The parts of ``Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…``."""

    access_key: str
    date: str  # YYYYMMDD from the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@dataclass(frozen=True)
class SignedRequest:
    """What the signature covers, as received. Header names lower-case, in arrival order."""

    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        return ",".join(values) if values else None


def parse_authorization(value: str | None) -> Authorization:
    """Parse the header; MissingAuthenticationToken when absent, IncompleteSignature when malformed."""
    if value is None or not value.strip():
        raise StsError("MissingAuthenticationToken", "Request is missing Authentication Token")
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise StsError("IncompleteSignature", f"Unsupported signing algorithm; use {ALGORITHM}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if sep:
            fields[name] = field_value.strip()
    credential = fields.get("Credential", "").split("/")
    signed = fields.get("SignedHeaders", "")
    signature = fields.get("Signature", "")
    if (
        len(credential) != 5
        or not all(credential)
        or credential[4] != "aws4_request"
        or not re.fullmatch(r"\d{8}", credential[1])
        or not signed
        or not _SIGNATURE.fullmatch(signature)
    ):
        raise StsError(
            "IncompleteSignature",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters "
            "in SigV4 form",
        )
    headers = tuple(signed.split(";"))
    return Authorization(credential[0], credential[1], credential[2], credential[3], headers, signature)


def canonical_uri(path: str) -> str:
    """Normalised and URI-encoded path, as botocore computes it for non-S3 services."""
    normalized = posixpath.normpath(path or "/")
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    if normalized.startswith("//"):
        normalized = "/" + normalized.lstrip("/")
    return quote(normalized, safe="/~")


def canonical_query(query: str) -> str:
    """Raw ``key=value`` pairs sorted by key then value."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{key}={value}" for key, value in pairs)


def canonical_request(request: SignedRequest, signed_headers: Sequence[str]) -> str:
    lines = [request.method.upper(), canonical_uri(request.path), canonical_query(request.query)]
    for name in signed_headers:
        values = [" ".join(v.split()) for n, v in request.headers if n == name]
        lines.append(f"{name}:{','.join(values)}")
    lines.append("")
    lines.append(";".join(signed_headers))
    lines.append(request.header("x-amz-content-sha256") or hashlib.sha256(request.body).hexdigest())
    return "\n".join(lines)


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def signature(secret: str, auth: Authorization, amz_date: str, canonical: str) -> str:
    key = _hmac(f"AWS4{secret}".encode(), auth.date)
    for part in (auth.region, auth.service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign(amz_date, auth.scope, canonical).encode(), hashlib.sha256).hexdigest()


def _epoch(amz_date: str) -> int:
    return calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))


def check(request: SignedRequest, credentials: Mapping[str, str], now: float) -> Authorization:
    """Authenticate ``request``; returns its Authorization or raises the StsError AWS would send.

    Empty ``credentials``: any well-formed SigV4 header is accepted. Otherwise the
    access key must be known and the signature must match its secret.
    """
    auth = parse_authorization(request.header("authorization"))
    amz_date = request.header("x-amz-date")
    if amz_date is None or not _AMZ_DATE.fullmatch(amz_date):
        raise StsError("IncompleteSignature", "Authorization header requires a valid 'X-Amz-Date' header")
    if auth.service != SERVICE:
        raise StsError(
            "SignatureDoesNotMatch", f"Credential should be scoped to correct service: '{SERVICE}'."
        )
    if "host" not in auth.signed_headers:
        raise StsError("SignatureDoesNotMatch", "'Host' must be a 'SignedHeader' in the AWS Authorization.")
    if not credentials:
        return auth
    secret = credentials.get(auth.access_key)
    if secret is None:
        raise StsError("InvalidClientTokenId")
    if auth.date != amz_date[:8]:
        raise StsError("SignatureDoesNotMatch", "Credential scope date does not match X-Amz-Date")
    if abs(now - _epoch(amz_date)) > MAX_SKEW_SECONDS:
        raise StsError("SignatureDoesNotMatch", "Signature expired: request time is more than 15 minutes off")
    expected = signature(secret, auth, amz_date, canonical_request(request, auth.signed_headers))
    if not hmac.compare_digest(expected, auth.signature):
        raise StsError("SignatureDoesNotMatch")
    return auth
