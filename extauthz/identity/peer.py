"""The caller's workload identity, from what Envoy saw on the mTLS connection."""

from __future__ import annotations

from dataclasses import dataclass

from ..request import CheckInput
from . import spiffe


@dataclass(frozen=True, slots=True)
class Peer:
    """``spiffe`` is set for SPIFFE peers; ``principal`` is Istio's form (no ``spiffe://``).

    A non-SPIFFE certificate (DNS SAN or Subject) still has a principal, so ``principals``
    can match it; it simply has no trust domain, namespace or service account.
    """

    spiffe: spiffe.SpiffeId | None
    principal: str


def resolve(inp: CheckInput) -> Peer | None:
    """The peer identity, or None when the request did not come over mTLS.

    ``source.principal`` wins because Envoy derived it from the verified chain; the forwarded
    certificate is the fallback for Envoy configs that send the certificate only. Raises
    :class:`~extauthz.errors.SpiffeIdError` / ``PeerCertificateError`` for a malformed
    identity: a broken identity is an authentication failure, not an anonymous caller.
    """
    principal = inp.source_principal
    if principal:
        if principal.startswith(spiffe.SCHEME):
            sid = spiffe.parse(principal)
            return Peer(sid, sid.principal)
        return Peer(None, principal)
    if inp.peer_certificate:
        from_cert = spiffe.from_certificate(inp.peer_certificate)
        if from_cert is not None:
            return Peer(from_cert, from_cert.principal)
    return None
