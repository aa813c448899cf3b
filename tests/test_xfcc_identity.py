"""``x-forwarded-client-cert`` as the caller's identity: only with ``--trust-xfcc``.

The parser has its own tests (``test_xfcc.py``); these are about what extauthz does with the
header: who the caller is, what reaches the upstream, and what is refused.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from extauthz.authorizer import Authorizer
from extauthz.cli import _settings, parser
from extauthz.config import Settings
from extauthz.decision import Outcome
from extauthz.devtools.pki import DevCA
from extauthz.identity import peer
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput

XFCC = "x-forwarded-client-cert"
PROXY = "spiffe://demo.local/ns/edge/sa/gateway"
CLIENT = "spiffe://demo.local/ns/shop/sa/frontend"
TRUSTED = Settings(trust_xfcc=True)


def request(xfcc: str | None, principal: str = PROXY) -> CheckInput:
    headers = {XFCC: xfcc} if xfcc is not None else {}
    return CheckInput(
        method="GET", host="orders", path="/", headers=headers, source_principal=principal
    )


@pytest.fixture(scope="module")
def client_cert() -> str:
    """The client's SVID as Envoy puts it in ``Cert=``: URL-encoded PEM."""
    pem = DevCA.create("demo.local").issue_svid(CLIENT).cert_pem.decode()
    return quote(pem, safe="")


@pytest.mark.parametrize(
    ("xfcc", "principal", "expected"),
    [
        # Envoy's SANITIZE_SET: one element, this hop's client.
        (f"By={PROXY};Hash=ab12;URI={CLIENT}", PROXY, ("demo.local/ns/shop/sa/frontend", "xfcc")),
        # Several hops: the first element is the original client.
        (
            f"By=spiffe://x/a;URI={CLIENT},By=spiffe://x/b;URI={PROXY}",
            PROXY,
            ("demo.local/ns/shop/sa/frontend", "xfcc"),
        ),
        # A non-SPIFFE URI, then a DNS SAN, still name a principal (no trust domain).
        ("URI=https://legacy.example/app", PROXY, ("https://legacy.example/app", "xfcc")),
        ("DNS=legacy.example;DNS=other.example", PROXY, ("legacy.example", "xfcc")),
        # The SPIFFE URI wins over a non-SPIFFE one in the same element.
        (f"URI=https://a.example;URI={CLIENT}", PROXY, ("demo.local/ns/shop/sa/frontend", "xfcc")),
        # No header: the mTLS peer, as without the flag.
        (None, PROXY, ("demo.local/ns/edge/sa/gateway", "source.principal")),
    ],
)
def test_trusted_xfcc_names_the_caller(
    xfcc: str | None, principal: str, expected: tuple[str, str]
) -> None:
    found = peer.resolve(request(xfcc, principal), trust_xfcc=True)
    assert found is not None
    assert (found.principal, found.source) == expected


def test_the_certificate_in_an_element_names_the_caller(client_cert: str) -> None:
    found = peer.resolve(request(f'Hash=ab;Cert="{client_cert}"'), trust_xfcc=True)
    assert found is not None
    assert found.spiffe is not None
    assert found.spiffe.uri == CLIENT


def test_an_element_without_identity_is_an_anonymous_caller_not_the_proxy() -> None:
    # Falling back to source.principal would lend the proxy's rights to the client.
    assert peer.resolve(request('Hash=ab12;Subject="CN=x"'), trust_xfcc=True) is None


def test_untrusted_xfcc_is_ignored() -> None:
    found = peer.resolve(request(f"URI={CLIENT}"))
    assert found is not None
    assert found.principal == "demo.local/ns/edge/sa/gateway"


@pytest.mark.parametrize(
    "xfcc",
    ['URI="unterminated', "novalue", "URI=spiffe://demo.local/ns/a/../b", ""],
    ids=["unterminated-quote", "pair-without-equals", "bad-spiffe-id", "empty"],
)
def test_a_bad_trusted_header_is_a_401(xfcc: str) -> None:
    decision = Authorizer(PolicySet.empty(), TRUSTED).check(request(xfcc))
    assert decision.outcome is Outcome.UNAUTHENTICATED
    assert decision.reason in {"xfcc_invalid", "spiffe_id_invalid"}


def test_a_bad_untrusted_header_changes_nothing() -> None:
    decision = Authorizer(PolicySet.empty()).check(request('URI="unterminated'))
    assert decision.allowed


def test_untrusted_xfcc_is_stripped_before_the_upstream() -> None:
    decision = Authorizer(PolicySet.empty()).check(request(f"URI={CLIENT}"))
    assert decision.allowed
    assert XFCC in decision.remove_headers
    assert decision.spiffe_id == PROXY


def test_trusted_xfcc_goes_upstream_and_names_the_client() -> None:
    decision = Authorizer(PolicySet.empty(), TRUSTED).check(request(f"URI={CLIENT}"))
    assert decision.allowed
    assert XFCC not in decision.remove_headers
    assert decision.spiffe_id == CLIENT
    assert ("x-extauthz-spiffe-id", CLIENT) in decision.upstream_headers


def test_trust_domains_apply_to_the_xfcc_identity() -> None:
    settings = Settings(trust_xfcc=True, trust_domains=frozenset({"demo.local"}))
    authorizer = Authorizer(PolicySet.empty(), settings)
    assert authorizer.check(request(f"URI={CLIENT}")).allowed
    decision = authorizer.check(request("URI=spiffe://evil.example/ns/shop/sa/frontend"))
    assert decision.reason == "spiffe_trust_domain_untrusted"


POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-frontend}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [demo.local/ns/shop/sa/frontend]}}]
"""


@pytest.mark.parametrize(
    ("settings", "xfcc", "allowed"),
    [
        (TRUSTED, f"URI={CLIENT}", True),
        (TRUSTED, "URI=spiffe://demo.local/ns/shop/sa/other", False),
        (TRUSTED, "Hash=ab", False),  # anonymous behind the proxy
        (Settings(), f"URI={CLIENT}", False),  # untrusted: the caller is the proxy
    ],
)
def test_policies_see_the_xfcc_caller(
    tmp_path: Path, settings: Settings, xfcc: str, allowed: bool
) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    decision = Authorizer(PolicySet.load(tmp_path), settings).check(request(xfcc))
    assert decision.allowed is allowed


def test_the_flag() -> None:
    assert _settings(parser().parse_args(["serve", "--trust-xfcc"])).trust_xfcc
    assert not _settings(parser().parse_args(["serve"])).trust_xfcc
