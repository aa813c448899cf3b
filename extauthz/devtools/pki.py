"""Throwaway PKI for tests and the demo: a self-signed CA issuing SPIFFE X.509-SVIDs.

DEVELOPMENT ONLY. Keys are unencrypted, live for days, and nothing is revoked or rotated;
never use these certificates or this module for anything that needs real trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCA", "KeyPair", "write_pki"]

# SPIFFE-ID spec: lowercase trust domain, path segments of [A-Za-z0-9._-], no query/port/etc.
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_MAX_CN_BYTES = 64  # X.520 ub-common-name; cryptography rejects longer values
# Tolerate small clock differences between the host that issues and the one that verifies.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its unencrypted PKCS#8 PEM private key."""

    cert_pem: bytes
    key_pem: bytes


class DevCA:
    """A self-signed EC P-256 CA for one SPIFFE trust domain."""

    def __init__(self, *, trust_domain: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Wrap an existing CA; use :meth:`create` to make a new one."""
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("DevCA key must be an EC private key")
        self.trust_domain = trust_domain
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        self._key = key

    @classmethod
    def create(cls, trust_domain: str, *, days: int = 2) -> DevCA:
        """Create a fresh self-signed CA valid for ``days``."""
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise ValueError(f"invalid SPIFFE trust domain: {trust_domain!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "extauthz development (untrusted)"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, _fit_cn(f"extauthz dev CA ({trust_domain})")
                ),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(key_cert_sign=True, crl_sign=True, digital_signature=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain=trust_domain, cert_pem=_cert_pem(cert), key_pem=_key_pem(key))

    def issue_svid(
        self, spiffe_id: str, *, dns_names: Sequence[str] = (), days: int = 1
    ) -> KeyPair:
        """Issue a leaf X.509-SVID whose only URI SAN is ``spiffe_id``.

        The ID must be syntactically valid and belong to this CA's trust domain; use
        :meth:`issue_cert` to build deliberately non-conforming certificates.
        """
        match = _SPIFFE_ID.fullmatch(spiffe_id)
        if match is None or any(seg in {".", ".."} for seg in match.group(2).split("/")):
            raise ValueError(f"invalid SPIFFE ID: {spiffe_id!r}")
        if match.group(1) != self.trust_domain:
            raise ValueError(f"{spiffe_id!r} is not in trust domain {self.trust_domain!r}")
        # CN carries no meaning for SVIDs; it is only there to make certs readable in tooling.
        fits = len(spiffe_id.encode()) <= _MAX_CN_BYTES
        return self.issue_cert(
            common_name=spiffe_id if fits else "", uris=[spiffe_id], dns_names=dns_names, days=days
        )

    def issue_cert(
        self,
        *,
        common_name: str,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        days: int = 1,
    ) -> KeyPair:
        """Issue a leaf (non-CA) TLS client+server certificate with arbitrary SANs.

        An empty ``common_name`` yields an empty subject; the SAN is then critical as
        RFC 5280 requires.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(key_cert_sign=False, crl_sign=False, digital_signature=True),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans), critical=not common_name
            )
        elif not common_name:
            raise ValueError("a certificate needs a common_name or at least one SAN")
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def write_pki(
    out_dir: Path,
    trust_domain: str,
    workloads: Mapping[str, str],
    *,
    dns_names: Sequence[str] = (),
    ca: DevCA | None = None,
) -> dict[str, Path]:
    """Create a CA and one SVID per workload (name -> SPIFFE ID) under ``out_dir``.

    Writes ``ca.pem``, ``<name>.pem`` and ``<name>-key.pem`` (mode 0600) and returns
    file stem -> path for everything written, e.g. ``{"ca": ..., "web": ..., "web-key": ...}``.
    The CA key is not written: nothing should be able to mint more certs from disk.
    ``dns_names`` go into every SVID (e.g. ``localhost``, so curl can verify a sidecar).
    ``ca`` issues them (default: a new one), for a caller that issues more certificates later.
    """
    paths = {"ca": out_dir / "ca.pem"}
    for name in workloads:
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"workload name must be a plain file name: {name!r}")
        for stem in (name, f"{name}-key"):
            if stem in paths:
                raise ValueError(f"workload name {name!r} collides with another output file")
            paths[stem] = out_dir / f"{stem}.pem"

    ca = ca or DevCA.create(trust_domain)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["ca"].write_bytes(ca.cert_pem)
    for name, spiffe_id in workloads.items():
        pair = ca.issue_svid(spiffe_id, dns_names=dns_names)
        paths[name].write_bytes(pair.cert_pem)
        _write_private(paths[f"{name}-key"], pair.key_pem)
    return paths


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 so the key is never briefly world-readable; fchmod fixes pre-existing files.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _key_usage(*, key_cert_sign: bool, crl_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,  # meaningless for EC keys
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _fit_cn(text: str) -> str:
    return text if len(text.encode()) <= _MAX_CN_BYTES else text[: _MAX_CN_BYTES - 3] + "..."


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
