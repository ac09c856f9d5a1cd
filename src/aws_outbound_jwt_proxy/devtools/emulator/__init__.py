"""Local STS emulator for development and tests (never production).

Speaks the STS Query protocol for GetWebIdentityToken and GetCallerIdentity so
boto3 and the AWS CLI work against it unchanged, mints real RS256/ES384 JWTs
with AWS-shaped claims, serves OIDC discovery and JWKS, and (with the admin
API enabled) injects faults and records calls. Programmatic use::

    url = await nursery.start(serve, EmulatorOptions(port=0, enable_admin=True))
"""

from __future__ import annotations

from .app import EmulatorOptions
from .server import serve

__all__ = ["EmulatorOptions", "serve"]
