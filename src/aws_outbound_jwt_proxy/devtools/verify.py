"""Verify a bearer JWT the way a third party does: OIDC discovery → JWKS → signature → claims.

The pure steps (:func:`read_header`, :func:`find_key`, :func:`check_token`,
:func:`jwks_uri_from`, :func:`keys_from`) take no I/O and are tested directly;
:class:`Verifier` adds the fetches (httpx, on the event loop) and the key cache.
Signatures are checked by joserfc. Error reasons are fixed texts: they never
carry the token or anything copied out of it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import httpx
import trio
from joserfc import jwk, jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    JoseError,
    MissingClaimError,
)

from ..config.settings import ALGORITHMS

log = logging.getLogger("aws_outbound_jwt_proxy.verify")

_KEY_TYPES = ("RSA", "EC")
# claim name → reason when joserfc finds it invalid
_CLAIM_REASONS = {
    "iss": "wrong issuer",
    "aud": "wrong audience",
    "iat": "issued in the future",
    "nbf": "not yet valid",
    "exp": "invalid exp",
}


class InvalidToken(Exception):
    """The token is not acceptable; ``reason`` is safe to show to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """Discovery or JWKS could not be fetched or read (the issuer's fault, not the token's)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- pure parts ----------------------------------------------------------


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def jwks_uri_from(doc: object, issuer: str) -> str:
    """The ``jwks_uri`` of a discovery document that names ``issuer`` as its issuer."""
    if not isinstance(doc, dict):
        raise KeysUnavailable("discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise KeysUnavailable("discovery document names another issuer")
    uri = doc.get("jwks_uri")
    if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
        raise KeysUnavailable("discovery document has no http(s) jwks_uri")
    return uri


def keys_from(doc: object) -> list[jwk.Key]:
    """Public RSA/EC signing keys of a JWKS document; unusable entries are skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeysUnavailable("JWKS document has no keys list")
    keys: list[jwk.Key] = []
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in _KEY_TYPES:
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        try:
            keys.append(jwk.import_key(entry))
        except (JoseError, ValueError, TypeError):
            continue
    return keys


def read_header(token: str) -> tuple[str, str | None]:
    """``(alg, kid)`` from the unverified header; rejects algorithms outside the allow-list."""
    try:
        headers = jws.extract_compact(token.encode("ascii")).headers()
    except (JoseError, ValueError, TypeError):
        raise InvalidToken("malformed token") from None
    alg, kid = headers.get("alg"), headers.get("kid")
    if alg not in ALGORITHMS:
        raise InvalidToken(f"algorithm not allowed ({' or '.join(ALGORITHMS)} only)")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("malformed token")
    return alg, kid


def find_key(keys: list[jwk.Key], kid: str | None) -> jwk.Key | None:
    """The key named ``kid``; without a kid, the only key of a one-key set."""
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    return next((key for key in keys if key.kid == kid), None)


def check_token(
    token: str,
    key: jwk.Key,
    *,
    issuer: str,
    audience: str | None,
    leeway: float,
    now: float,
) -> dict[str, Any]:
    """Signature (joserfc, allow-listed algorithms) then exp/iat/nbf/iss/aud; returns the claims."""
    alg, _ = read_header(token)
    if key.alg is not None and key.alg != alg:
        raise InvalidToken("key does not allow this algorithm")
    try:
        decoded = jwt.decode(token, key, algorithms=list(ALGORITHMS))
    except BadSignatureError:
        raise InvalidToken("bad signature") from None
    except (JoseError, ValueError, TypeError):
        raise InvalidToken("token does not match its key") from None
    registry = jwt.JWTClaimsRegistry(
        now=math.floor(now),
        leeway=math.ceil(leeway),
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience} if audience else {"essential": True},
        exp={"essential": True},
    )
    try:
        registry.validate(decoded.claims)
    except ExpiredTokenError:
        raise InvalidToken("token expired") from None
    except MissingClaimError as exc:
        raise InvalidToken(f"missing claim: {exc.claim}") from None
    except ClaimError as exc:
        raise InvalidToken(_CLAIM_REASONS.get(exc.claim, "invalid claim")) from None
    return decoded.claims


# ---- with I/O ------------------------------------------------------------


class Verifier:
    """Checks bearer tokens against one issuer; keys fetched lazily and cached.

    An unknown ``kid`` refetches the JWKS once (at most every
    ``refetch_interval`` seconds, so junk kids cannot make us hammer the issuer).
    """

    def __init__(
        self,
        issuer: str,
        audience: str | None,
        leeway: float,
        http: httpx.AsyncClient,
        *,
        refetch_interval: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.refetch_interval = refetch_interval
        self._http = http
        self._keys: list[jwk.Key] | None = None
        self._jwks_uri: str | None = None
        self._refetched_at = -math.inf
        self._lock = trio.Lock()

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`InvalidToken` / :class:`KeysUnavailable`."""
        _, kid = read_header(token)
        keys = self._keys if self._keys is not None else await self._first_keys()
        key = find_key(keys, kid)
        if key is None and kid is not None:
            key = find_key(await self._refetch(keys), kid)
        if key is None:
            raise InvalidToken("unknown key id")
        return check_token(
            token, key, issuer=self.issuer, audience=self.audience, leeway=self.leeway, now=time.time()
        )

    async def _first_keys(self) -> list[jwk.Key]:
        async with self._lock:
            if self._keys is None:
                self._keys = await self._fetch()
            return self._keys

    async def _refetch(self, seen: list[jwk.Key]) -> list[jwk.Key]:
        async with self._lock:
            assert self._keys is not None
            if self._keys is not seen:  # another request refetched while we waited
                return self._keys
            if trio.current_time() - self._refetched_at < self.refetch_interval:
                return seen
            self._refetched_at = trio.current_time()
            self._keys = await self._fetch()
            return self._keys

    async def _fetch(self) -> list[jwk.Key]:
        if self._jwks_uri is None:
            doc = await self._get_json(discovery_url(self.issuer), "discovery")
            self._jwks_uri = jwks_uri_from(doc, self.issuer)
        keys = keys_from(await self._get_json(self._jwks_uri, "JWKS"))
        log.info("fetched JWKS", extra={"jwks_uri": self._jwks_uri, "keys": len(keys)})
        return keys

    async def _get_json(self, url: str, what: str) -> object:
        try:
            response = await self._http.get(url)
            response.raise_for_status()
            return response.json()
        except httpx.HTTPStatusError as exc:
            log.warning(f"{what} fetch failed", extra={"url": url, "status": exc.response.status_code})
            raise KeysUnavailable(f"{what} fetch failed: HTTP {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            log.warning(f"{what} fetch failed", extra={"url": url, "error": type(exc).__name__})
            raise KeysUnavailable(f"{what} fetch failed: {type(exc).__name__}") from None
        except ValueError:
            raise KeysUnavailable(f"{what} document is not JSON") from None
