"""``--trust-domain``: with an allow-list, only SPIFFE peers of those trust domains call."""

from __future__ import annotations

import pytest

from extauthz.authorizer import Authorizer
from extauthz.cli import _settings, parser
from extauthz.config import Settings
from extauthz.decision import Outcome
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import to_check_response

TRUSTED = Settings(trust_domains=frozenset({"demo.local", "partner.example"}))


@pytest.mark.parametrize(
    ("principal", "settings", "outcome"),
    [
        ("spiffe://demo.local/ns/shop/sa/frontend", TRUSTED, Outcome.ALLOW),
        ("spiffe://partner.example/ns/x/sa/y", TRUSTED, Outcome.ALLOW),
        ("spiffe://evil.local/ns/shop/sa/frontend", TRUSTED, Outcome.UNAUTHENTICATED),
        # a look-alike is another trust domain
        ("spiffe://demo.local.evil/ns/shop/sa/frontend", TRUSTED, Outcome.UNAUTHENTICATED),
        ("frontend.shop.svc", TRUSTED, Outcome.UNAUTHENTICATED),  # DNS SAN: not SPIFFE
        ("", TRUSTED, Outcome.ALLOW),  # no mTLS peer: policies decide, as without a list
        ("spiffe://evil.local/ns/shop/sa/frontend", Settings(), Outcome.ALLOW),  # no list
    ],
)
def test_trust_domain_allow_list(principal: str, settings: Settings, outcome: Outcome) -> None:
    decision = Authorizer(PolicySet.empty(), settings).check(
        CheckInput(method="GET", path="/", source_principal=principal)
    )
    assert decision.outcome is outcome
    if outcome is Outcome.UNAUTHENTICATED:
        assert decision.reason == "spiffe_trust_domain_untrusted"
        assert to_check_response(decision).denied_response.status.code == 401


def test_the_flag_repeats() -> None:
    args = parser().parse_args(
        ["serve", "--trust-domain", "demo.local", "--trust-domain", "partner.example"]
    )
    assert _settings(args).trust_domains == {"demo.local", "partner.example"}
    assert _settings(parser().parse_args(["serve"])).trust_domains == frozenset()
