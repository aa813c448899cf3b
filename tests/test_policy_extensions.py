"""The ``extauthz.io/v1alpha1`` AuthorizationPolicy: custom deny responses, allow headers,
and the load-time refusals that keep them safe. CEL conditions are in tests/test_cel.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.errors import PolicySetError
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import to_check_response

EXT = "extauthz.io/v1alpha1"
SETTINGS = Settings(workload_namespace="ns1")


def resource(name: str, spec: dict[str, Any], *, api: str = EXT, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "ns1", **meta},
        "spec": spec,
    }


def load(tmp_path: Path, *docs: dict[str, Any]) -> Authorizer:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(docs))
    return Authorizer(PolicySet.load(tmp_path), SETTINGS)


def check(authorizer: Authorizer, path: str, method: str = "GET") -> Any:
    return to_check_response(authorizer.check(CheckInput(method=method, host="h", path=path)))


def headers(resp: Any, *, denied: bool) -> dict[str, str]:
    part = resp.denied_response if denied else resp.ok_response
    return {h.header.key: h.header.value for h in part.headers}


QUOTA = {
    "action": "DENY",
    "rules": [{"to": [{"operation": {"paths": ["/quota*"]}}]}],
    "denyResponse": {
        "status": 429,
        "headers": {"retry-after": "30"},
        "body": {"error": "quota_exceeded", "docs": "https://example.com/quota"},
    },
}


def test_a_deny_policy_answers_with_its_own_status_headers_and_json_body(tmp_path: Path) -> None:
    resp = check(load(tmp_path, resource("quota", QUOTA)), "/quota/x")
    assert resp.status.code == 7  # still PERMISSION_DENIED for Envoy
    assert resp.denied_response.status.code == 429
    h = headers(resp, denied=True)
    assert h["retry-after"] == "30"
    assert h["content-type"] == "application/json"
    assert "x-extauthz-decision-id" in h  # the id stays, so the decision can be looked up
    assert json.loads(resp.denied_response.body) == QUOTA["denyResponse"]["body"]  # type: ignore[index]


def test_a_string_body_is_plain_text_and_status_defaults_to_403(tmp_path: Path) -> None:
    spec = {**QUOTA, "denyResponse": {"body": "go away\n"}}
    resp = check(load(tmp_path, resource("quota", spec)), "/quota")
    assert resp.denied_response.status.code == 403
    assert resp.denied_response.body == "go away\n"
    assert headers(resp, denied=True)["content-type"] == "text/plain"


def test_the_first_allow_policy_with_a_deny_response_answers_when_none_matched(
    tmp_path: Path,
) -> None:
    login = {
        "status": 302,
        "headers": {"location": "https://login.example.com/"},
        "body": "",
    }
    authz = load(
        tmp_path,
        resource("plain", {"rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}),
        resource(
            "web",
            {"rules": [{"to": [{"operation": {"paths": ["/b"]}}]}], "denyResponse": login},
        ),
    )
    resp = check(authz, "/c")
    assert resp.denied_response.status.code == 302
    assert headers(resp, denied=True)["location"] == "https://login.example.com/"
    assert check(authz, "/a").status.code == 0


def test_an_allow_rule_adds_its_headers_upstream(tmp_path: Path) -> None:
    spec = {
        "rules": [
            {"to": [{"operation": {"paths": ["/gold*"]}}], "headers": {"x-tier": "gold"}},
            {"to": [{"operation": {"paths": ["/*"]}}], "headers": {"x-tier": "free"}},
        ]
    }
    authz = load(tmp_path, resource("tiers", spec))
    assert headers(check(authz, "/gold/1"), denied=False)["x-tier"] == "gold"
    assert headers(check(authz, "/x"), denied=False)["x-tier"] == "free"


def test_istio_policies_keep_the_default_answers(tmp_path: Path) -> None:
    plain = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]}
    resp = check(load(tmp_path, resource("d", plain, api="security.istio.io/v1")), "/x")
    assert resp.denied_response.status.code == 403
    assert json.loads(resp.denied_response.body)["reason"] == "denied_by_policy"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (resource("x", {**QUOTA, "denyResponse": {"status": 200}}), "not an HTTP status Envoy"),
        (resource("x", {**QUOTA, "denyResponse": {"status": 299}}), "not an HTTP status Envoy"),
        (resource("x", {**QUOTA, "denyResponse": {"status": "429"}}), "not an HTTP status"),
        (resource("x", {**QUOTA, "denyResponse": {"body": 3}}), "must be a string, map or list"),
        (resource("x", {**QUOTA, "denyResponse": {"statsu": 429}}), "did you mean 'status'"),
        (
            resource("x", {**QUOTA, "denyResponse": {"headers": {"x-extauthz-spiffe-id": "a"}}}),
            "x-extauthz-* or a reserved header",
        ),
        (
            resource("x", {**QUOTA, "denyResponse": {"headers": {"x-a": "line\r\nbreak"}}}),
            "must be a printable string",
        ),
        (
            resource("x", {"action": "AUDIT", "rules": [{}], "denyResponse": {"status": 403}}),
            "an AUDIT policy never denies",
        ),
        (
            resource("x", {"action": "DENY", "rules": [{"headers": {"x-a": "b"}}]}),
            "only an ALLOW rule adds headers",
        ),
        (
            resource("x", {"rules": [{"headers": {"authorization": "Bearer x"}}]}),
            "reserved header",
        ),
        (
            resource("x", {**QUOTA, "denyResponse": {"headers": {"content-length": "0"}}}),
            "reserved header",
        ),
        (
            resource("x", {"rules": [{"headers": {"x-a": "b"}}]}, api="security.istio.io/v1"),
            "unknown field 'headers'",
        ),
        (
            resource("x", {**QUOTA}, api="security.istio.io/v1"),
            "unknown field 'denyResponse'",
        ),
        (
            resource("x", {"rules": [{"when": [{"cel": "true"}]}]}, api="security.istio.io/v1"),
            "unknown field 'cel'",
        ),
        (resource("x", {"rules": [{}]}, api="extauthz.io/v1"), "extends only AuthorizationPolicy"),
        (
            {**resource("x", {}), "kind": "RequestAuthentication"},
            "write RequestAuthentication as security.istio.io/v1",
        ),
    ],
)
def test_refused_at_load_with_the_field_named(
    tmp_path: Path, doc: dict[str, Any], message: str
) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicySetError) as err:
        PolicySet.load(tmp_path)
    text = str(err.value)
    assert message in text, text
    assert f"{tmp_path / 'p.yaml'}:" in text


CEL_DENY = resource(
    "limits",
    {
        "action": "DENY",
        "rules": [
            {
                "to": [{"operation": {"methods": ["POST"]}}],
                "when": [{"cel": 'int(request.headers["x-amount"]) > 100'}],
            }
        ],
    },
)
CEL_ALLOW = resource(
    "admins",
    {"rules": [{"when": [{"cel": '"admin" in request.auth.claims.groups'}]}]},
)


def post(authorizer: Authorizer, amount: str | None) -> Any:
    hdrs = {"x-amount": amount} if amount is not None else {}
    return authorizer.check(CheckInput(method="POST", host="h", path="/pay", headers=hdrs))


@pytest.mark.parametrize(
    ("amount", "allowed"),
    [
        ("50", True),
        ("101", False),
        # evaluation errors fail closed: in a DENY policy the condition holds
        (None, False),
        ("lots", False),
    ],
)
def test_cel_condition_in_a_deny_policy(tmp_path: Path, amount: str | None, allowed: bool) -> None:
    decision = post(load(tmp_path, CEL_DENY), amount)
    assert decision.allowed is allowed
    if not allowed:
        assert (decision.policy, decision.rule) == ("ns1/limits", "rules[0]")


def test_cel_condition_in_an_allow_policy_fails_closed_without_a_token(tmp_path: Path) -> None:
    decision = post(load(tmp_path, CEL_ALLOW), "1")
    assert not decision.allowed
    assert decision.reason == "no_allow_policy_matched"


def test_cel_is_explained(tmp_path: Path) -> None:
    ex = load(tmp_path, CEL_DENY).explain(
        CheckInput(method="POST", path="/pay", headers={"x-amount": "5"})
    )
    text = "\n".join(ex.lines())
    assert 'FAILED: int(request.headers["x-amount"]) > 100 -> false' in text


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("request.methd == 'GET'", "request.methd"),
        ("request.method == ", "Syntax error"),
        ("request.method", "bool"),
    ],
)
def test_bad_cel_is_a_load_error_with_the_line(tmp_path: Path, expr: str, message: str) -> None:
    doc = resource("x", {"rules": [{"when": [{"cel": expr}]}]})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicySetError) as err:
        PolicySet.load(tmp_path)
    text = str(err.value)
    assert message in text, text
    assert "rules[0].when[0].cel" in text
    assert f"{tmp_path / 'p.yaml'}:" in text


def test_a_rule_header_never_stands_in_for_an_identity_header(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    ra = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "ra", "namespace": "ns1"},
        "spec": {
            "jwtRules": [
                {
                    "issuer": "https://idp",
                    "jwks": f'{{"keys": [{jwk}]}}',
                    "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                }
            ]
        },
    }
    rule = {"headers": {"x-user": "admin", "x-tier": "gold"}}
    authz = load(tmp_path, ra, resource("p", {"rules": [rule]}))
    decision = authz.check(CheckInput(method="GET", host="h", path="/", headers={"x-user": "me"}))
    assert decision.allowed
    assert dict(decision.upstream_headers).get("x-tier") == "gold"
    assert "x-user" not in dict(decision.upstream_headers)
    assert "x-user" in decision.remove_headers  # the caller's forged one is stripped too
