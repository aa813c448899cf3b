"""A development identity provider: one EC key, its JWKS, and tokens on demand. Dev only."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass(frozen=True)
class DevIdP:
    """Signs ES256 tokens as ``issuer``; :meth:`jwks` is what a RequestAuthentication trusts."""

    issuer: str
    key: ec.EllipticCurvePrivateKey
    kid: str = "dev-1"

    @classmethod
    def create(cls, issuer: str, kid: str = "dev-1") -> DevIdP:
        return cls(issuer, ec.generate_private_key(ec.SECP256R1()), kid)

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="ES256", use="sig")
        return json.dumps({"keys": [jwk]}, indent=2)

    def token(
        self,
        subject: str,
        *,
        audience: str | list[str] | None = None,
        ttl: float = 600,
        issued: float | None = None,
        **claims: Any,
    ) -> str:
        """A signed token; a negative ``ttl`` makes an expired one."""
        now = time.time() if issued is None else issued
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "iat": int(now),
            "exp": int(now + ttl),
            **claims,
        }
        if audience is not None:
            payload["aud"] = audience
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})
