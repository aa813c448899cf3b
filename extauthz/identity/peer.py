"""The caller's workload identity, from what Envoy saw on the mTLS connection, or from a
trusted ``x-forwarded-client-cert`` when proxies stand between the caller and this Envoy."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ..request import CheckInput
from . import spiffe, xfcc

XFCC_HEADER = "x-forwarded-client-cert"


@dataclass(frozen=True, slots=True)
class Peer:
    """``spiffe`` is set for SPIFFE peers; ``principal`` is Istio's form (no ``spiffe://``).

    A non-SPIFFE certificate (DNS SAN or Subject) still has a principal, so ``principals``
    can match it; it simply has no trust domain, namespace or service account. ``source``
    says where the identity came from, for the audit trail.
    """

    spiffe: spiffe.SpiffeId | None
    principal: str
    source: Literal["source.principal", "certificate", "xfcc"] = "source.principal"


def resolve(inp: CheckInput, *, trust_xfcc: bool = False) -> Peer | None:
    """The peer identity, or None when the request did not come over mTLS.

    With ``trust_xfcc``, a request carrying ``x-forwarded-client-cert`` is identified by its
    first element, the original client as the first proxy saw it; no other source is then
    consulted, because falling back to the proxy's own identity would lend its rights to a
    caller without a certificate. Otherwise ``source.principal`` wins because Envoy derived
    it from the verified chain; the forwarded certificate is the fallback for Envoy configs
    that send the certificate only. Raises :class:`~extauthz.errors.SpiffeIdError` /
    ``PeerCertificateError`` / ``XfccError`` for a malformed identity: a broken identity is
    an authentication failure, not an anonymous caller.
    """
    if trust_xfcc:
        forwarded = inp.headers.get(XFCC_HEADER)
        if forwarded is not None:
            return _from_xfcc(forwarded)
    principal = inp.source_principal
    if principal:
        return _from_principal(principal)
    if inp.peer_certificate:
        from_cert = spiffe.from_certificate(inp.peer_certificate)
        if from_cert is not None:
            return Peer(from_cert, from_cert.principal, "certificate")
    return None


@lru_cache(maxsize=4096)  # a caller's principal repeats on every request it sends
def _from_principal(principal: str) -> Peer:
    if principal.startswith(spiffe.SCHEME):
        sid = spiffe.parse(principal)  # raises for a malformed ID: not cached
        return Peer(sid, sid.principal)
    return Peer(None, principal)


@lru_cache(maxsize=1024)  # a client's header repeats on every request it sends
def _from_xfcc(value: str) -> Peer | None:
    first = xfcc.parse(value)[0]
    for uri in first.uris:
        if uri.startswith(spiffe.SCHEME):
            sid = spiffe.parse(uri)
            return Peer(sid, sid.principal, "xfcc")
    if first.cert:
        from_cert = spiffe.from_certificate(first.cert)
        if from_cert is not None:
            return Peer(from_cert, from_cert.principal, "xfcc")
    if first.uris:
        return Peer(None, first.uris[0], "xfcc")
    if first.dns:
        return Peer(None, first.dns[0], "xfcc")
    return None
