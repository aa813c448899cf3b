"""``extauthz certs`` and ``extauthz token``: throwaway SPIFFE SVIDs and dev JWTs.

DEVELOPMENT ONLY. The demo mesh makes its certificates and tokens with these same functions,
so what the README shows for the CLI is what the demo runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigError
from ..identity.mint import jwk_thumbprint
from .idp import DevIdP
from .pki import DevCA, write_pki

DEFAULT_TRUST_DOMAIN = "demo.local"
DEFAULT_NAMESPACE = "shop"
DEFAULT_ISSUER = "https://idp.demo.local"
DEFAULT_AUDIENCE = "shop"
DEFAULT_SUBJECT = "alice"
DEFAULT_TTL = 3600.0
# `extauthz demo`: extauthz on this port, the frontend, orders and payments sidecars on the
# next three. Fixed, so the README's curl commands can be copied.
DEMO_BASE_PORT = 18440

BANNER = (
    "extauthz {command}: DEVELOPMENT ONLY. Throwaway credentials with unencrypted keys; "
    "never use them where real trust is needed."
)

# SPIFFE ID spec: a lowercase trust domain; path segments of [A-Za-z0-9._-], not "." or "..".
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# Claims with a flag of their own: a --claim must not silently fight it.
_OWN_FLAGS = {
    "iss": "--issuer",
    "sub": "--subject",
    "aud": "--audience",
    "exp": "--ttl",
    "iat": "--ttl",
}


def trust_domain(text: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(text):
        raise ValueError(f"not a SPIFFE trust domain (lowercase a-z, 0-9, '.', '_', '-'): {text!r}")
    return text


def path_segment(text: str) -> str:
    """A namespace or workload name: one SPIFFE path segment, also usable as a file name."""
    if not _SEGMENT.fullmatch(text) or text in {".", ".."} or text.startswith("."):
        raise ValueError(f"not a SPIFFE path segment (A-Z, a-z, 0-9, '.', '_', '-'): {text!r}")
    return text


def ttl(text: str) -> float:
    """Seconds, finite; negative makes an expired token."""
    value = float(text)  # its ValueError names the text
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number of seconds, got {text!r}")
    return value


def spiffe_id(domain: str, namespace: str, name: str) -> str:
    """Istio's form of a workload's SPIFFE ID: its service account ``name`` in ``namespace``."""
    return f"spiffe://{domain}/ns/{namespace}/sa/{name}"


def write_svids(
    out_dir: Path,
    names: Sequence[str],
    *,
    domain: str = DEFAULT_TRUST_DOMAIN,
    namespace: str = DEFAULT_NAMESPACE,
    dns_names: Sequence[str] = ("localhost",),
    ca: DevCA | None = None,
) -> dict[str, Path]:
    """A CA (``ca.pem``; fresh unless given) and ``NAME.pem``/``NAME-key.pem`` per name.

    ``localhost`` in every SVID lets curl verify a sidecar it reaches on 127.0.0.1.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"names repeat: {', '.join(sorted(names))}")
    return write_pki(
        out_dir,
        domain,
        {name: spiffe_id(domain, namespace, name) for name in names},
        dns_names=dns_names,
        ca=ca,
    )


def create_signing_key(path: Path, *, overwrite: bool = False) -> None:
    """Write a new EC P-256 key (PKCS#8 PEM, mode 0600) for :func:`load_idp`."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: a new key never replaces one (delete it first)")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)


def load_idp(path: Path, issuer: str = DEFAULT_ISSUER) -> DevIdP:
    """The dev IdP of a key file; its ``kid`` is the key's RFC 7638 thumbprint, so tokens
    signed later with the same file match the JWKS written earlier."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{path}: the dev IdP signs ES256 and needs an EC P-256 key")
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return DevIdP(issuer, key, jwk_thumbprint(public))


def write_jwks(idp: DevIdP, path: Path) -> None:
    """The public key set a RequestAuthentication's ``jwksUri`` (a file) or ``jwks`` uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(idp.jwks() + "\n")


def parse_claim(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses (``roles=["admin"]``, ``n=3``), else
    the string itself (``email=a@b.c``)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"expected key=value, got {text!r}")
    if name in _OWN_FLAGS:
        raise ValueError(f"{name!r} has its own flag: use {_OWN_FLAGS[name]}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name, value


def sign(
    idp: DevIdP,
    *,
    subject: str = DEFAULT_SUBJECT,
    audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
    ttl: float = DEFAULT_TTL,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A token from ``idp``; a negative ``ttl`` makes an expired one (to see the 401)."""
    now = int(time.time())
    # Built here, not by DevIdP.token, whose keyword arguments a claim named "ttl" would hit.
    payload: dict[str, Any] = {**(claims or {}), "iss": idp.issuer, "sub": subject}
    payload.update(iat=now, exp=int(now + ttl))
    if audiences:
        payload["aud"] = audiences[0] if len(audiences) == 1 else list(audiences)
    return jwt.encode(payload, idp.key, algorithm="ES256", headers={"kid": idp.kid})
