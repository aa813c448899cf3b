"""Token exchange: short-lived JWTs minted for the upstream ("tailored tokens").

A rule with ``token:`` (an ``extauthz.io`` extension) asks extauthz, on allow, to sign a JWT
that carries only the claims the rule names, the caller's SPIFFE ID as ``azp`` and ``act``
(RFC 8693), and the upstream as ``aud``. The upstream then trusts one issuer (extauthz, whose
JWKS :mod:`extauthz.jwks_server` publishes) instead of every IdP, and a token that leaks from
it is good for that one audience for a minute.

The key is loaded once at start (:func:`load_signing_key`); its ``kid`` is the RFC 7638
thumbprint and the algorithm follows from the key type, so nothing about signing is chosen
per request. Signing costs a private-key operation, so minted tokens are cached per (caller,
original token, rule, audience) and reused while more than half their lifetime remains.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..errors import SigningKeyError, TokenExpiredError
from .jwt import VerifiedToken

DEFAULT_ISSUER = "extauthz"
AUTHORIZATION_HEADER = "authorization"
DEFAULT_TTL_SECONDS = 60
MAX_TTL_SECONDS = 3600
MIN_RSA_BITS = 2048
# Set by extauthz on every minted token: a rule may not copy them from the caller's token.
RESERVED_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "azp", "act"})

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384"}
# RFC 7638 section 3.2: the members a thumbprint hashes, per key type.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """One rule's ``token:``: what to mint when the rule allows.

    ``audience`` empty means the request's host without its port; ``header`` is where the
    token goes (``authorization`` gets ``Bearer <jwt>``, any other header the bare token).
    """

    claims: tuple[str, ...] = ()
    audience: str = ""
    header: str = AUTHORIZATION_HEADER
    ttl: int = DEFAULT_TTL_SECONDS


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """extauthz's private key, its algorithm, and the public JWK upstreams verify with."""

    private_key: PrivateKey
    algorithm: str
    kid: str
    public_jwk: Mapping[str, Any]  # with kid, alg and use: one entry of the served JWKS

    @classmethod
    def of(cls, key: object) -> SigningKey:
        """Wrap a private key object; refuse the types and sizes extauthz does not sign with."""
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = _EC_ALGORITHMS.get(key.curve.name)
            if algorithm is None:
                raise SigningKeyError(
                    f"EC curve {key.curve.name} is not supported; use P-256 or P-384"
                )
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise SigningKeyError(
                    f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required"
                )
            algorithm, jwk = "RS256", RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm, jwk = "EdDSA", OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            raise SigningKeyError(
                f"{type(key).__name__} is not supported; use EC P-256/P-384, RSA or Ed25519"
            )
        public = {k: jwk[k] for k in _THUMBPRINT_MEMBERS[jwk["kty"]]}
        kid = jwk_thumbprint(public)
        public.update(kid=kid, alg=algorithm, use="sig")
        return cls(key, algorithm, kid, MappingProxyType(public))

    @classmethod
    def generate(cls) -> SigningKey:
        """A throwaway P-256 key (``policy test``, tests): nothing outside can verify with it."""
        return cls.of(ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.public_jwk)]}


def load_signing_key(path: Path) -> SigningKey:
    """Read ``--signing-key``: an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"--signing-key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(
            f"--signing-key {path}: the key is encrypted; give an unencrypted PEM key "
            "(e.g. mounted from a Secret)"
        ) from None
    except ValueError:
        hint = " (it holds a public key)" if b"PUBLIC KEY-----" in data else ""
        raise SigningKeyError(f"--signing-key {path}: not a PEM private key{hint}") from None
    try:
        return SigningKey.of(key)
    except SigningKeyError as exc:
        raise SigningKeyError(f"--signing-key {path}: {exc.message}") from None


def request_audience(host: str) -> str:
    """The default ``aud``: the request's ``:authority`` without its port."""
    if host.startswith("["):  # [v6]:port
        return host[: host.find("]") + 1] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def token_header(spec: TokenSpec, token: str) -> tuple[str, str]:
    """Where the minted token goes: ``Bearer`` in ``authorization``, bare anywhere else."""
    if spec.header == AUTHORIZATION_HEADER:
        return spec.header, f"Bearer {token}"
    return spec.header, token


# (digest of the original token's payload, caller SPIFFE ID, rule's spec, audience)
CacheKey = tuple[bytes, str, TokenSpec, str]


class MintedTokenCache:
    """Minted tokens, reused while more than half their lifetime remains.

    Reuse saves a signature per request; stopping at half-life leaves the upstream a token
    with at least ``ttl/2`` to live, so one slow hop does not carry it past its ``exp``.
    Bounded: the least recently used goes first.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, tuple[str, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> str | None:
        entry = self._entries.get(key)
        if entry is not None:
            token, iat, exp = entry
            # iat <= now: a clock stepped back must not hand out a token "from the future".
            if iat <= now and (exp - now) * 2 > exp - iat:
                self._entries.move_to_end(key)
                self.hits += 1
                return token
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: CacheKey, token: str, iat: int, exp: int) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = (token, iat, exp)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class TokenMinter:
    """Signs tailored tokens as ``issuer`` with ``key``. One per server: survives reloads."""

    def __init__(
        self,
        key: SigningKey,
        issuer: str = DEFAULT_ISSUER,
        *,
        cache: MintedTokenCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.cache = cache if cache is not None else MintedTokenCache()
        self.clock = clock

    def mint(
        self,
        spec: TokenSpec,
        *,
        audience: str,
        subject: str,
        actor: str,
        original: VerifiedToken | None,
        cached: bool = True,
    ) -> str:
        """A signed JWT for ``audience``. ``actor`` is the caller's SPIFFE ID ("" if none);
        ``original`` the caller's verified token, whose named claims are copied and whose
        ``exp`` the minted one never outlives. ``cached=False`` neither reads nor fills the
        cache (explanations, whose claims are assumed, not verified)."""
        now = self.clock()
        key: CacheKey | None = None
        if cached:
            # The payload decides everything copied from the token; hashed to bound memory.
            digest = hashlib.sha256(original.payload_segment.encode()).digest() if original else b""
            key = (digest, actor, spec, audience)
            hit = self.cache.get(key, now)
            if hit is not None:
                return hit
        iat = int(now)
        exp = iat + spec.ttl
        claims: Mapping[str, Any] = original.claims if original is not None else {}
        original_exp = claims.get("exp")
        if isinstance(original_exp, int | float) and not isinstance(original_exp, bool):
            exp = min(exp, math.floor(original_exp))
            if exp <= iat:
                # Accepted within the clock skew, but a token minted from it would be born dead.
                raise TokenExpiredError("the token expires before a token minted from it would")
        payload: dict[str, Any] = {name: claims[name] for name in spec.claims if name in claims}
        payload.update(
            iss=self.issuer,
            sub=subject,
            aud=audience,
            iat=iat,
            exp=exp,
            jti=os.urandom(16).hex(),
        )
        if actor:
            act: dict[str, Any] = {"sub": actor}
            prior = claims.get("act")
            if isinstance(prior, Mapping):
                act["act"] = dict(prior)  # RFC 8693 4.1: earlier actors nest inside
            payload.update(azp=actor, act=act)
        token = jwt.encode(
            payload,
            self.key.private_key,
            algorithm=self.key.algorithm,
            headers={"kid": self.key.kid, "typ": "JWT"},
        )
        if key is not None:
            self.cache.put(key, token, iat, exp)
        return token
