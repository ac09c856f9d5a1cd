"""AWS Signature Version 4 checks (pure): parse the Authorization header, recompute the signature.

The expected signature comes from botocore's ``SigV4Auth`` (canonical request,
string to sign, key derivation), fed the request as received, the client's
X-Amz-Date and the headers its Authorization header lists as signed.
"""

from __future__ import annotations

import calendar
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPMessage

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

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


class _ClientSignedHeaders(SigV4Auth):
    """botocore's SigV4 signer over the headers the client says it signed (botocore would pick its own)."""

    def __init__(self, secret: str, auth: Authorization) -> None:
        super().__init__(Credentials(auth.access_key, secret), auth.service, auth.region)
        self._signed = dict.fromkeys(auth.signed_headers)

    def headers_to_sign(self, request: AWSRequest) -> HTTPMessage:
        pairs = [(name, value) for name in self._signed for value in request.headers.get_all(name, [""])]
        return HTTPHeaders.from_pairs(pairs)


def signature(request: SignedRequest, auth: Authorization, secret: str, amz_date: str) -> str:
    """The signature botocore computes for ``request`` at ``amz_date`` with ``secret``."""
    query = f"?{request.query}" if request.query else ""
    # http: botocore always hashes the payload then (unless x-amz-content-sha256 says otherwise)
    received = AWSRequest(request.method, f"http://sts{request.path}{query}", data=request.body)
    received.headers = HTTPHeaders.from_pairs(request.headers)
    received.context["timestamp"] = amz_date  # what add_auth would set from the clock
    signer = _ClientSignedHeaders(secret, auth)
    canonical = signer.canonical_request(received)
    return signer.signature(signer.string_to_sign(received, canonical), received)


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
    expected = signature(request, auth, secret, amz_date)
    if not hmac.compare_digest(expected, auth.signature):
        raise StsError("SignatureDoesNotMatch")
    return auth
