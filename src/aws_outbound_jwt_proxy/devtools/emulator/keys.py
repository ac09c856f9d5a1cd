"""Signing keys: one RSA-2048 (RS256) and one P-384 (ES384) key, their JWKS, and JWT signing.

Keys are generated at start, or with a key directory loaded from (and, the
first time, saved to) ``rs256.json`` / ``es384.json`` there as private JWKs
(mode 0600), so tokens stay verifiable across restarts. ``kid`` is the key's
RFC 7638 thumbprint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from ...config.settings import ALGORITHMS

Key = RSAKey | ECKey


def generate(algorithm: str) -> Key:
    if algorithm == "RS256":
        return RSAKey.generate_key(2048, private=True)
    return ECKey.generate_key("P-384", private=True)


def _load(path: Path, algorithm: str) -> Key:
    try:
        data = json.loads(path.read_text())
        key: Key = RSAKey.import_key(data) if algorithm == "RS256" else ECKey.import_key(data)
    except (ValueError, KeyError, TypeError, JoseError) as exc:
        raise ValueError(f"{path}: not a private {algorithm} JWK ({exc})") from None
    if not key.is_private:
        raise ValueError(f"{path}: not a private {algorithm} JWK (public key only)")
    return key


def _load_or_create(path: Path, algorithm: str) -> Key:
    """The key in ``path``; when missing, a new one saved there (complete file or none, never half)."""
    if path.exists():
        return _load(path, algorithm)
    key = generate(algorithm)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(key.as_dict(private=True), f)
        os.link(tmp, path)  # fails if another process saved its key first: use that one
    except FileExistsError:
        return _load(path, algorithm)
    finally:
        tmp.unlink(missing_ok=True)
    return key


class Signer:
    """Holds both keys; :meth:`sign` makes a compact JWT, :meth:`jwks` publishes the public halves."""

    def __init__(self, keys: dict[str, Key]) -> None:
        self.keys = keys

    @classmethod
    def create(cls, key_dir: Path | None) -> Signer:
        """Fresh keys, or the ones kept in ``key_dir`` (created there when missing)."""
        if key_dir is None:
            return cls({alg: generate(alg) for alg in ALGORITHMS})
        return cls({alg: _load_or_create(key_dir / f"{alg.lower()}.json", alg) for alg in ALGORITHMS})

    def kid(self, algorithm: str) -> str:
        return self.keys[algorithm].thumbprint()

    def sign(self, algorithm: str, claims: dict[str, Any]) -> str:
        header = {"alg": algorithm, "typ": "JWT", "kid": self.kid(algorithm)}
        return jwt.encode(header, claims, self.keys[algorithm], algorithms=[algorithm])

    def jwks(self) -> dict[str, Any]:
        keys = []
        for alg, key in self.keys.items():
            public = dict(key.as_dict(private=False))
            public.update({"kid": key.thumbprint(), "alg": alg, "use": "sig"})
            keys.append(public)
        return {"keys": keys}
