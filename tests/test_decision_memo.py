"""Remembered decisions: reused only when everything the policies read is the same.

A workload whose rules read nothing but the peer, the verified token, method, host, path and
named headers has its decisions remembered per authorizer (``Authorizer._check``); the
property test (tests/test_policy_properties.py) sends every request twice against the
reference. These tests pin down the edges: what turns the memo off, what is in its key, and
that a reused decision carries its own id.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz import authorizer as authorizer_module
from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Outcome
from extauthz.errors import TokenExpiredError
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import DECISION_ID_HEADER

ISSUER = "https://idp.test"
SETTINGS = Settings(workload_namespace="ns1", workload_labels="app=a")
_KEY = ec.generate_private_key(ec.SECP256R1())
_JWKS = json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(_KEY.public_key())) | {"kid": "k"}]})


def _authn() -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "ns1"},
        "spec": {
            "jwtRules": [
                {
                    "issuer": ISSUER,
                    "jwks": _JWKS,
                    "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                }
            ]
        },
    }


def _policy(rule: dict[str, Any], action: str = "ALLOW", kind: str = "security.istio.io/v1") -> Any:
    return {
        "apiVersion": kind,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "ns1"},
        "spec": {"action": action, "rules": [rule]},
    }


def _authorizer(tmp_path: Path, *docs: dict[str, Any]) -> Authorizer:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([_authn(), *docs]))
    return Authorizer(PolicySet.load(tmp_path), SETTINGS)


def _token(sub: str, ttl: int = 600, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, _KEY, algorithm="ES256", headers={"kid": "k"})


def _inp(path: str = "/a", token: str | None = None, **headers: str) -> CheckInput:
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return CheckInput(
        method="GET",
        host="h",
        path=path,
        headers=headers,
        source_principal="spiffe://td/ns/ns1/sa/client",
        source_ip="10.0.0.1",
        destination_port=8080,
    )


ALLOW_ALICE = _policy(
    {
        "from": [{"source": {"principals": ["td/ns/ns1/sa/client"]}}],
        "to": [{"operation": {"paths": ["/a"]}}],
        "when": [{"key": "request.auth.claims[sub]", "values": ["alice"]}],
    }
)


def test_a_repeated_request_gets_the_same_decision_under_a_new_id(tmp_path: Path) -> None:
    authorizer = _authorizer(tmp_path, ALLOW_ALICE)
    token = _token("alice")
    first, again = authorizer.check(_inp(token=token)), authorizer.check(_inp(token=token))
    assert first.outcome is again.outcome is Outcome.ALLOW
    assert first.decision_id != again.decision_id
    assert again == first._replace(
        decision_id=again.decision_id,
        upstream_headers=tuple(
            (k, again.decision_id if k == DECISION_ID_HEADER else v)
            for k, v in first.upstream_headers
        ),
    )
    assert dict(again.upstream_headers)[DECISION_ID_HEADER] == again.decision_id
    assert dict(again.upstream_headers)["x-user"] == "alice"
    assert len(authorizer._memos) == 1  # it was remembered, not decided twice by chance


def test_what_the_policies_read_is_in_the_key(tmp_path: Path) -> None:
    rule = {"when": [{"key": "request.headers[x-tenant]", "values": ["t1"]}]}
    authorizer = _authorizer(
        tmp_path,
        ALLOW_ALICE,
        _policy(rule, "DENY") | {"metadata": {"name": "d", "namespace": "ns1"}},
    )
    alice, bob = _token("alice"), _token("bob")
    assert authorizer.check(_inp(token=alice)).allowed
    assert not authorizer.check(_inp(token=bob)).allowed  # another token
    assert not authorizer.check(_inp("/b", token=alice)).allowed  # another path
    assert authorizer.check(_inp(token=alice, **{"x-tenant": "t2"})).allowed
    denied = authorizer.check(_inp(token=alice, **{"x-tenant": "t1"}))  # a header it reads
    assert (denied.outcome, denied.reason) == (Outcome.PERMISSION_DENIED, "denied_by_policy")
    assert authorizer.check(_inp(token=alice)).allowed


def test_the_token_is_verified_on_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authorizer = _authorizer(tmp_path, ALLOW_ALICE)
    token = _token("alice")
    assert authorizer.check(_inp(token=token)).allowed
    verifier = authorizer.policies.for_workload("ns1", "app=a").verifier

    def expired(inp: CheckInput) -> None:
        raise TokenExpiredError("expired since the last request")

    monkeypatch.setattr(verifier, "verify", expired)  # as the token cache finds it past exp
    refused = authorizer.check(_inp(token=token))
    assert (refused.outcome, refused.reason) == (Outcome.UNAUTHENTICATED, "jwt_expired")


@pytest.mark.parametrize(
    "rule",
    [
        {"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]},
        {"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]},
        {"to": [{"operation": {"ports": ["8080"]}}]},
        {"when": [{"key": "destination.port", "values": ["8080"]}]},
        {"when": [{"key": "connection.sni", "values": ["h"]}]},
    ],
)
def test_rules_reading_more_are_never_remembered(tmp_path: Path, rule: dict[str, Any]) -> None:
    authorizer = _authorizer(
        tmp_path, ALLOW_ALICE, _policy(rule) | {"metadata": {"name": "q", "namespace": "ns1"}}
    )
    workload = authorizer.policies.for_workload("ns1", "app=a")
    assert workload.memo_headers is None
    authorizer.check(_inp(token=_token("alice")))
    assert authorizer._memos == {}


def test_cel_and_minting_are_never_remembered(tmp_path: Path) -> None:
    cel = _policy({"when": [{"cel": "request.path == '/a'"}]}, kind="extauthz.io/v1alpha1")
    mint = _policy({"token": {"claims": ["email"]}}, kind="extauthz.io/v1alpha1")
    for i, doc in enumerate((cel, mint)):
        here = tmp_path / str(i)
        here.mkdir()
        authorizer = _authorizer(here, doc)
        assert authorizer.policies.for_workload("ns1", "app=a").memo_headers is None


def test_a_reload_forgets(tmp_path: Path) -> None:
    authorizer = _authorizer(tmp_path, ALLOW_ALICE)
    token = _token("alice")
    assert authorizer.check(_inp(token=token)).allowed
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([_authn()]))  # no ALLOW policy now
    authorizer.swap(PolicySet.load(tmp_path))
    assert authorizer._memos == {}
    assert authorizer.check(_inp(token=token)).reason == "no_allow_policy"


def test_remembered_decisions_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authorizer_module, "_MEMO_SIZE", 3)
    authorizer = _authorizer(tmp_path, ALLOW_ALICE)
    token = _token("alice")
    for i in range(10):
        authorizer.check(_inp(f"/p{i}", token=token))
        remembered = sum(len(memo) for _, memo in authorizer._memos.values())
        assert 1 <= remembered <= 3


def test_long_keys_are_decided_afresh_and_never_remembered(tmp_path: Path) -> None:
    """Callers choose the path and headers: a key longer than the bound is not kept."""
    authorizer = _authorizer(tmp_path, ALLOW_ALICE)
    token = _token("alice")
    long_path = "/a" + "x" * authorizer_module._MEMO_KEY_CHARS
    decisions = [authorizer.check(_inp(long_path, token=token)) for _ in range(2)]
    assert [(d.outcome, d.reason) for d in decisions] == [
        (Outcome.PERMISSION_DENIED, "no_allow_policy_matched")
    ] * 2
    assert sum(len(memo) for _, memo in authorizer._memos.values()) == 0
    authorizer.check(_inp("/a", token=token))  # a short one still is
    assert sum(len(memo) for _, memo in authorizer._memos.values()) == 1
