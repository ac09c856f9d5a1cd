"""The emulator's identities and JWT claims (pure), shaped like the tokens AWS STS mints.

Every access key maps to one role in the configured account:
``arn:aws:iam::<account>:role/emulator-<first 10 hex of sha256(access key)>``,
so two credentials get two stable, different subjects and the key itself
never appears in a token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .params import TokenRequest

AWS_CLAIMS = "https://sts.amazonaws.com/"
SESSION_NAME = "emulator"


@dataclass(frozen=True)
class Identity:
    """Who called: account, role and the region of the credential scope."""

    account: str
    role_name: str
    region: str
    org_id: str = "o-emulator000"

    @property
    def role_arn(self) -> str:
        return f"arn:aws:iam::{self.account}:role/{self.role_name}"

    @property
    def session_arn(self) -> str:
        return f"arn:aws:sts::{self.account}:assumed-role/{self.role_name}/{SESSION_NAME}"

    @property
    def role_id(self) -> str:
        """A stable ``AROA…`` unique id, like AWS gives roles."""
        return "AROA" + hashlib.sha256(self.role_name.encode()).hexdigest()[:17].upper()

    @property
    def ou_path(self) -> str:
        return f"{self.org_id}/r-emu0/ou-emu0-00000000/"


def identity_for(access_key: str, account: str, region: str) -> Identity:
    role = "emulator-" + hashlib.sha256(access_key.encode()).hexdigest()[:10]
    return Identity(account, role, region)


def token_claims(
    identity: Identity, request: TokenRequest, *, issuer: str, now: int, lifetime: int, jti: str
) -> dict[str, Any]:
    """Claims of a GetWebIdentityToken JWT: ``exp = now + lifetime`` (lifetime may be negative)."""
    audiences = list(request.audiences)
    aws: dict[str, Any] = {
        "aws_account": identity.account,
        "source_region": identity.region,
        "principal_id": identity.role_arn,
        "org_id": identity.org_id,
        "ou_path": identity.ou_path,
    }
    if request.tags:
        aws["request_tags"] = dict(request.tags)
    return {
        "iss": issuer,
        "sub": identity.role_arn,
        "aud": audiences[0] if len(audiences) == 1 else audiences,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti,
        AWS_CLAIMS: aws,
    }
