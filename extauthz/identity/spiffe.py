"""SPIFFE IDs: parsing, validation and the peer-certificate fallback.

Syntax per the SPIFFE ID standard: ``spiffe://<trust-domain>[/<segment>...]``, trust domain
of ``[a-z0-9._-]``, segments of ``[A-Za-z0-9._-]`` that are neither empty nor ``.``/``..``,
no query, fragment, port or userinfo, at most 2048 bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from cryptography import x509

from ..errors import PeerCertificateError, SpiffeIdError

SCHEME = "spiffe://"
_MAX_LEN = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID. ``namespace``/``service_account`` come from ``/ns/x/sa/y``."""

    trust_domain: str
    path: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def principal(self) -> str:
        """The Istio form: the ID without ``spiffe://`` (``cluster.local/ns/x/sa/y``)."""
        return f"{self.trust_domain}{self.path}"

    @property
    def namespace(self) -> str:
        return _istio_parts(self.path)[0]

    @property
    def service_account(self) -> str:
        return _istio_parts(self.path)[1]

    def __str__(self) -> str:
        return self.uri


def _istio_parts(path: str) -> tuple[str, str]:
    """Namespace and service account as Istio reads them from a SPIFFE path.

    Istio matches namespaces with ``.*/ns/<ns>/.*`` and service accounts with
    ``/ns/<ns>/(.+/|)sa/<sa>(/.+)?``, so ``/ns/a/sa/b/v2`` is namespace ``a``, account ``b``.
    Reading less would let such a peer slip past a DENY on its namespace.
    """
    parts = path.split("/")
    for i in range(1, len(parts) - 2):  # "ns" must be followed by a name and more path
        if parts[i] == "ns":
            namespace = parts[i + 1]
            for j in range(i + 2, len(parts) - 1):
                if parts[j] == "sa":
                    return namespace, parts[j + 1]
            return namespace, ""
    return "", ""


@lru_cache(maxsize=4096)
def parse(value: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID; raise :class:`SpiffeIdError` naming what is wrong."""
    if len(value.encode()) > _MAX_LEN:
        raise SpiffeIdError(f"SPIFFE ID longer than {_MAX_LEN} bytes")
    if not value.startswith(SCHEME):
        raise SpiffeIdError("SPIFFE ID must start with 'spiffe://'")
    rest = value[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise SpiffeIdError("SPIFFE ID must not have a query or fragment")
    trust_domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise SpiffeIdError(
            f"SPIFFE trust domain {trust_domain!r} must be 1-255 characters of [a-z0-9._-]"
        )
    if not slash:
        return SpiffeId(trust_domain, "")
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise SpiffeIdError(
                "SPIFFE ID path segments must be non-empty [A-Za-z0-9._-] (no trailing '/')"
            )
        if segment in (".", ".."):
            raise SpiffeIdError("SPIFFE ID path segments must not be '.' or '..'")
    return SpiffeId(trust_domain, "/" + path)


@lru_cache(maxsize=1024)
def from_certificate(url_encoded_pem: str) -> SpiffeId | None:
    """The SPIFFE ID of the peer certificate Envoy forwarded, or None if it has no URI SAN.

    An X.509-SVID has exactly one URI SAN; a certificate with several is refused rather than
    guessed at. Cached because Envoy resends the same certificate on every request of a
    connection.
    """
    try:
        cert = x509.load_pem_x509_certificate(unquote(url_encoded_pem).encode())
    except ValueError as exc:
        msg = f"peer certificate is not a PEM X.509 certificate: {exc}"
        raise PeerCertificateError(msg) from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        return None
    if len(uris) > 1:
        raise PeerCertificateError("peer certificate has more than one URI SAN; not an X.509-SVID")
    return parse(uris[0])
