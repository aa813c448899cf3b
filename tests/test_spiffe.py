"""SPIFFE ID parsing, the peer-certificate fallback and peer-identity precedence."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from extauthz.devtools.pki import DevCA
from extauthz.errors import PeerCertificateError, SpiffeIdError
from extauthz.identity import peer, spiffe
from extauthz.request import CheckInput

TRUST_DOMAIN = "example.org"


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(TRUST_DOMAIN)


def _encoded(pem: bytes) -> str:
    """The peer certificate as Envoy forwards it: URL-encoded PEM."""
    return quote(pem.decode())


# --- parse: valid IDs ---------------------------------------------------------------------

# (id, principal, namespace, service_account, trust_domain, path)
VALID: list[tuple[str, str, str, str, str, str]] = [
    (
        "spiffe://cluster.local/ns/shop/sa/orders",
        "cluster.local/ns/shop/sa/orders",
        "shop",
        "orders",
        "cluster.local",
        "/ns/shop/sa/orders",
    ),
    ("spiffe://example.org", "example.org", "", "", "example.org", ""),
    ("spiffe://td/workload", "td/workload", "", "", "td", "/workload"),
    (
        "spiffe://my-td_1.example/A.b_C-d/0",
        "my-td_1.example/A.b_C-d/0",
        "",
        "",
        "my-td_1.example",
        "/A.b_C-d/0",
    ),
    # Istio reads namespaces as .*/ns/<ns>/.* and accounts as /ns/<ns>/(.+/|)sa/<sa>(/.+)?
    ("spiffe://td/ns/x/sa/y/extra", "td/ns/x/sa/y/extra", "x", "y", "td", "/ns/x/sa/y/extra"),
    ("spiffe://td/prefix/ns/x/sa/y", "td/prefix/ns/x/sa/y", "x", "y", "td", "/prefix/ns/x/sa/y"),
    ("spiffe://td/ns/x/svc/y", "td/ns/x/svc/y", "x", "", "td", "/ns/x/svc/y"),
    ("spiffe://td/ns/x/a/sa/y", "td/ns/x/a/sa/y", "x", "y", "td", "/ns/x/a/sa/y"),
    ("spiffe://td/ns/x", "td/ns/x", "", "", "td", "/ns/x"),
    # segments that merely contain dots are fine
    ("spiffe://td/.../a..b/.x", "td/.../a..b/.x", "", "", "td", "/.../a..b/.x"),
]


@pytest.mark.parametrize(
    ("value", "principal", "namespace", "service_account", "trust_domain", "path"),
    VALID,
    ids=[
        "istio-form",
        "trust-domain-only",
        "one-segment",
        "all-allowed-characters",
        "istio-form-plus-extra-segment",
        "istio-form-after-prefix",
        "not-sa-keyword",
        "sa-after-extra-segment",
        "ns-without-more-path",
        "dots-inside-segments",
    ],
)
def test_parse_valid(
    value: str,
    principal: str,
    namespace: str,
    service_account: str,
    trust_domain: str,
    path: str,
) -> None:
    sid = spiffe.parse(value)
    assert sid.principal == principal
    assert sid.namespace == namespace
    assert sid.service_account == service_account
    assert sid.trust_domain == trust_domain
    assert sid.path == path
    assert sid.uri == value
    assert str(sid) == value


def test_parse_max_length_is_inclusive() -> None:
    prefix = "spiffe://td/"
    exact = prefix + "a" * (2048 - len(prefix))
    assert len(exact.encode()) == 2048
    assert spiffe.parse(exact).path == "/" + "a" * (2048 - len(prefix))


# --- parse: invalid IDs -------------------------------------------------------------------

INVALID: list[tuple[str, str, str]] = [
    ("", "empty", "must start with 'spiffe://'"),
    ("SPIFFE://td/a", "scheme-uppercase", "must start with 'spiffe://'"),
    ("Spiffe://td/a", "scheme-mixed-case", "must start with 'spiffe://'"),
    ("https://td/a", "other-scheme", "must start with 'spiffe://'"),
    ("spiffe:/td/a", "one-slash", "must start with 'spiffe://'"),
    ("td/ns/x/sa/y", "no-scheme", "must start with 'spiffe://'"),
    ("spiffe://", "scheme-only", "trust domain ''"),
    ("spiffe:///a", "empty-trust-domain", "trust domain ''"),
    ("spiffe://Example.org/a", "uppercase-trust-domain", "trust domain 'Example.org'"),
    ("spiffe://td:8080/a", "port", "trust domain 'td:8080'"),
    ("spiffe://td:8080", "port-no-path", "trust domain 'td:8080'"),
    ("spiffe://user@td/a", "userinfo", "trust domain 'user@td'"),
    ("spiffe://user:pw@td/a", "userinfo-password", "trust domain 'user:pw@td'"),
    ("spiffe://t%64/a", "percent-in-trust-domain", "trust domain 't%64'"),
    ("spiffe://" + "a" * 256, "trust-domain-too-long", "1-255 characters"),
    ("spiffe://td/", "trailing-slash-only", "no trailing '/'"),
    ("spiffe://td/a/", "trailing-slash", "no trailing '/'"),
    ("spiffe://td//a", "empty-segment", "must be non-empty"),
    ("spiffe://td/a//b", "empty-middle-segment", "must be non-empty"),
    ("spiffe://td/.", "dot-segment", "'.' or '..'"),
    ("spiffe://td/a/./b", "dot-middle-segment", "'.' or '..'"),
    ("spiffe://td/..", "dotdot-segment", "'.' or '..'"),
    ("spiffe://td/a/../b", "dotdot-middle-segment", "'.' or '..'"),
    ("spiffe://td/a?x=1", "query", "query or fragment"),
    ("spiffe://td/a#frag", "fragment", "query or fragment"),
    ("spiffe://td?x", "query-on-trust-domain", "query or fragment"),
    ("spiffe://td/a%20b", "percent-encoded-segment", "[A-Za-z0-9._-]"),
    ("spiffe://td/a%2Fb", "percent-encoded-slash", "[A-Za-z0-9._-]"),
    ("spiffe://td/a b", "space", "[A-Za-z0-9._-]"),
    ("spiffe://td/caf\u00e9", "non-ascii", "[A-Za-z0-9._-]"),
    ("spiffe://td/a*", "star", "[A-Za-z0-9._-]"),
    ("spiffe://td/" + "a" * 2037, "2049-bytes", "longer than 2048 bytes"),
    ("spiffe://td/" + "\u00e9" * 1019, "2050-bytes-multibyte", "longer than 2048 bytes"),
]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(v, f) for v, _, f in INVALID],
    ids=[i for _, i, _ in INVALID],
)
def test_parse_invalid(value: str, fragment: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        spiffe.parse(value)
    assert info.value.reason == "spiffe_id_invalid"
    assert fragment in info.value.message


def test_long_id_checks_bytes_not_characters() -> None:
    # 1018 two-byte characters + 12 bytes of prefix = 2048 bytes: still too long for a
    # segment (non-ASCII), but the length check must not be what refuses it.
    value = "spiffe://td/" + "\u00e9" * 1018
    assert len(value.encode()) == 2048
    with pytest.raises(SpiffeIdError) as info:
        spiffe.parse(value)
    assert "longer than" not in info.value.message


# --- from_certificate ---------------------------------------------------------------------


def test_from_certificate_svid(ca: DevCA) -> None:
    pair = ca.issue_svid("spiffe://example.org/ns/shop/sa/orders")
    sid = spiffe.from_certificate(_encoded(pair.cert_pem))
    assert sid is not None
    assert sid.uri == "spiffe://example.org/ns/shop/sa/orders"
    assert sid.principal == "example.org/ns/shop/sa/orders"
    assert sid.namespace == "shop"
    assert sid.service_account == "orders"


def test_from_certificate_svid_with_dns_names(ca: DevCA) -> None:
    pair = ca.issue_svid("spiffe://example.org/web", dns_names=["web.example.org"])
    sid = spiffe.from_certificate(_encoded(pair.cert_pem))
    assert sid == spiffe.SpiffeId("example.org", "/web")


def test_from_certificate_without_san_encoding_is_plain_pem(ca: DevCA) -> None:
    # Envoy URL-encodes; a PEM that happens not to be encoded still decodes the same way.
    pair = ca.issue_svid("spiffe://example.org/plain")
    sid = spiffe.from_certificate(pair.cert_pem.decode())
    assert sid == spiffe.SpiffeId("example.org", "/plain")


@pytest.mark.parametrize(
    ("common_name", "dns_names"),
    [("just-a-cn", ()), ("with-dns", ("svc.example.org",)), ("", ("svc.example.org",))],
    ids=["cn-only-no-san", "dns-san-only", "dns-san-empty-subject"],
)
def test_from_certificate_without_uri_san_is_none(
    ca: DevCA, common_name: str, dns_names: tuple[str, ...]
) -> None:
    pair = ca.issue_cert(common_name=common_name, dns_names=dns_names)
    assert spiffe.from_certificate(_encoded(pair.cert_pem)) is None


def test_from_certificate_two_uri_sans_refused(ca: DevCA) -> None:
    pair = ca.issue_cert(
        common_name="two",
        uris=["spiffe://example.org/a", "spiffe://example.org/b"],
    )
    with pytest.raises(PeerCertificateError) as info:
        spiffe.from_certificate(_encoded(pair.cert_pem))
    assert info.value.reason == "peer_certificate_invalid"
    assert "more than one URI SAN" in info.value.message


def test_from_certificate_non_spiffe_uri_san_refused(ca: DevCA) -> None:
    pair = ca.issue_cert(common_name="web", uris=["https://example.org/web"])
    with pytest.raises(SpiffeIdError) as info:
        spiffe.from_certificate(_encoded(pair.cert_pem))
    assert info.value.reason == "spiffe_id_invalid"


def test_from_certificate_malformed_spiffe_uri_san_refused(ca: DevCA) -> None:
    pair = ca.issue_cert(common_name="bad", uris=["spiffe://example.org/a/../b"])
    with pytest.raises(SpiffeIdError) as info:
        spiffe.from_certificate(_encoded(pair.cert_pem))
    assert info.value.reason == "spiffe_id_invalid"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not a certificate",
        quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        quote("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
    ],
    ids=["empty", "text", "pem-armour-bad-der", "pem-armour-bad-base64"],
)
def test_from_certificate_garbage_refused(garbage: str) -> None:
    with pytest.raises(PeerCertificateError) as info:
        spiffe.from_certificate(garbage)
    assert info.value.reason == "peer_certificate_invalid"
    assert "not a PEM X.509 certificate" in info.value.message


def test_from_certificate_truncated_pem_refused(ca: DevCA) -> None:
    pem = ca.issue_svid("spiffe://example.org/t").cert_pem
    with pytest.raises(PeerCertificateError):
        spiffe.from_certificate(_encoded(pem[: len(pem) // 2]))


# --- peer.resolve -------------------------------------------------------------------------


def test_resolve_no_identity_is_none() -> None:
    assert peer.resolve(CheckInput()) is None


def test_resolve_source_principal_beats_certificate(ca: DevCA) -> None:
    cert = _encoded(ca.issue_svid("spiffe://example.org/ns/cert/sa/from-cert").cert_pem)
    got = peer.resolve(
        CheckInput(
            source_principal="spiffe://example.org/ns/shop/sa/orders",
            peer_certificate=cert,
        )
    )
    assert got == peer.Peer(
        spiffe.SpiffeId("example.org", "/ns/shop/sa/orders"), "example.org/ns/shop/sa/orders"
    )


def test_resolve_source_principal_beats_broken_certificate() -> None:
    got = peer.resolve(
        CheckInput(source_principal="spiffe://td/ns/a/sa/b", peer_certificate="garbage")
    )
    assert got is not None
    assert got.principal == "td/ns/a/sa/b"


def test_resolve_certificate_fallback(ca: DevCA) -> None:
    cert = _encoded(ca.issue_svid("spiffe://example.org/ns/cert/sa/from-cert").cert_pem)
    got = peer.resolve(CheckInput(peer_certificate=cert))
    assert got == peer.Peer(
        spiffe.SpiffeId("example.org", "/ns/cert/sa/from-cert"),
        "example.org/ns/cert/sa/from-cert",
        "certificate",
    )


def test_resolve_certificate_without_uri_san_is_anonymous(ca: DevCA) -> None:
    cert = _encoded(ca.issue_cert(common_name="legacy", dns_names=["legacy.example"]).cert_pem)
    assert peer.resolve(CheckInput(peer_certificate=cert)) is None


@pytest.mark.parametrize(
    "principal",
    ["legacy.example.org", "CN=legacy,O=corp", "https://example.org/x", "SPIFFE://td/a"],
    ids=["dns-name", "subject", "https-uri", "uppercase-scheme-is-not-spiffe"],
)
def test_resolve_non_spiffe_principal_kept(principal: str) -> None:
    got = peer.resolve(CheckInput(source_principal=principal))
    assert got == peer.Peer(None, principal)


@pytest.mark.parametrize(
    "principal",
    ["spiffe://td/a/", "spiffe://TD/a", "spiffe://td/a?x", "spiffe://"],
    ids=["trailing-slash", "uppercase-td", "query", "empty"],
)
def test_resolve_malformed_spiffe_principal_raises(principal: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        peer.resolve(CheckInput(source_principal=principal))
    assert info.value.reason == "spiffe_id_invalid"


def test_resolve_two_uri_san_certificate_raises(ca: DevCA) -> None:
    cert = _encoded(
        ca.issue_cert(
            common_name="x", uris=["spiffe://example.org/a", "spiffe://example.org/b"]
        ).cert_pem
    )
    with pytest.raises(PeerCertificateError):
        peer.resolve(CheckInput(peer_certificate=cert))
