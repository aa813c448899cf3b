"""``extauthz check`` (explanations), request descriptions and ``extauthz policy test``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.authorizer import Authorizer
from extauthz.cli import main
from extauthz.config import Settings
from extauthz.errors import ConfigError
from extauthz.policy.engine import PolicySet
from extauthz.policy.source import load_text
from extauthz.probe import parse_probe

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"

DENY_ADMIN = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "namespace": "ns1"},
    "spec": {
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/admin*"], "notMethods": ["GET"]}}]}],
    },
}
ALLOW = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "web", "namespace": "ns1"},
    "spec": {
        "rules": [
            {
                "from": [{"source": {"principals": ["td/ns/ns1/sa/web"]}}],
                "to": [{"operation": {"methods": ["GET", "POST"]}}],
            },
            {"to": [{"operation": {"paths": ["/health"]}}]},
        ]
    },
}
DRY = {
    **DENY_ADMIN,
    "metadata": {
        "name": "would-deny-post",
        "namespace": "ns1",
        "annotations": {"istio.io/dry-run": "true"},
    },
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]},
}


def probe(text: str) -> Any:
    (doc,) = load_text(text, "req.yaml")
    return parse_probe(doc.body)


@pytest.fixture
def authorizer(tmp_path: Path) -> Authorizer:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([DENY_ADMIN, ALLOW, DRY]))
    return Authorizer(PolicySet.load(tmp_path), Settings(workload_namespace="ns1"))


def test_explanation_names_the_failing_field_of_every_rule(authorizer: Authorizer) -> None:
    p = probe("method: DELETE\npath: /orders\nprincipal: spiffe://td/ns/ns1/sa/web\n")
    ex = authorizer.explain(p.input)
    assert not ex.decision.allowed
    text = "\n".join(ex.lines())
    assert "reason=no_allow_policy_matched" in text
    assert "FAILED: methods: 'DELETE' does not match [GET, POST]" in text
    assert "FAILED: paths: '/orders' does not match [/health]" in text
    assert "peer principal: td/ns/ns1/sa/web" in text
    # every policy is listed in Istio's order, dry-run ones marked
    order = [line.split()[0:2] for line in text.splitlines() if line.startswith(("DENY", "ALLOW"))]
    assert order == [
        ["DENY", "ns1/deny-admin"],
        ["DENY", "ns1/would-deny-post"],
        ["ALLOW", "ns1/web"],
    ]
    assert "ns1/would-deny-post (dry-run)" in text


def test_explanation_of_an_allow_and_a_dry_run_verdict(authorizer: Authorizer) -> None:
    p = probe("method: POST\npath: /orders\nprincipal: spiffe://td/ns/ns1/sa/web\n")
    ex = authorizer.explain(p.input)
    assert ex.decision.allowed
    assert (ex.decision.policy, ex.decision.rule) == ("ns1/web", "rules[0]")
    assert "dry-run: with dry-run policies enforced it would deny" in ex.lines()
    web = next(r for r in ex.policies if r.key == "ns1/web")
    assert web.matched_rule == "rules[0]"
    assert [r.matched for r in web.rules] == [True, False]


def test_a_negated_field_explains_itself(authorizer: Authorizer) -> None:
    ex = authorizer.explain(probe("method: GET\npath: /admin/x\n").input)
    deny = ex.policies[0]
    assert deny.key == "ns1/deny-admin"
    assert not deny.matched
    (failure,) = deny.rules[0].failures
    assert failure.negated
    assert failure.describe().endswith("FAILED: not methods: 'GET' matches [GET]")


def test_explanation_agrees_with_check_on_the_example_policies() -> None:
    auth = Authorizer(PolicySet.load(POLICIES))
    for path in ("/orders", "/admin", "/payments/x"):
        for labels in ("app=orders", "app=frontend", "app=payments"):
            p = probe(f"namespace: shop\nlabels: {labels}\npath: {path}\nmethod: POST\n")
            assert auth.explain(p.input).decision.outcome == auth.check(p.input).outcome


def test_identity_failure_is_explained_without_policies(tmp_path: Path) -> None:
    auth = Authorizer(PolicySet.load(POLICIES))
    p = probe("namespace: shop\nlabels: app=orders\ntoken: not.a.jwt\n")
    ex = auth.explain(p.input)
    assert ex.decision.reason == "jwt_malformed"
    assert ex.policies == ()
    assert any(line.startswith("policies: not evaluated") for line in ex.lines())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methd: GET\n", "req.yaml:1: request: unknown field 'methd' (did you mean 'method'?)"),
        ("headers: [a]\n", "req.yaml:1: request.headers: must map header names"),
        ("destination_port: 70000\n", "destination_port: must be a port number"),
        ("token: a.b.c\nclaims: {sub: x}\n", "give token or claims, not both"),
        ("labels: [a]\n", "labels: must be 'a=b,c=d' or a map"),
        ("claims: nope\n", "claims: must be a map"),
    ],
)
def test_bad_request_descriptions_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        probe(text)
    assert message in err.value.message


def test_a_description_becomes_what_envoy_would_send() -> None:
    p = probe(
        "method: POST\nhost: Shop.Example:8443\npath: /a/b?x=1\nheaders: {X-Tenant: acme}\n"
        "token: t0k\nlabels: {app: a, v: '1'}\nnamespace: ns\ndestination_port: 8443\n"
    )
    inp = p.input
    assert (inp.method, inp.host, inp.path, inp.query) == (
        "POST",
        "shop.example:8443",
        "/a/b",
        "x=1",
    )
    assert inp.headers["x-tenant"] == "acme"
    assert inp.headers["authorization"] == "Bearer t0k"
    assert inp.headers[":path"] == "/a/b?x=1"
    assert dict(inp.context_extensions) == {"namespace": "ns", "labels": "app=a,v=1"}
    assert inp.destination_port == 8443
    assert p.claims is None


def test_check_cli_prints_the_explanation_and_exits_by_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = tmp_path / "req.yaml"
    req.write_text(
        "namespace: shop\nlabels: app=payments\nmethod: POST\npath: /payments/charge\n"
        "principal: spiffe://demo.local/ns/shop/sa/frontend\n"
    )
    assert main(["check", "--policies", str(POLICIES), str(req)]) == 2
    out = capsys.readouterr().out
    assert "decision: PERMISSION_DENIED reason=no_allow_policy_matched" in out
    assert "principals: 'demo.local/ns/shop/sa/frontend' does not match" in out
    req.write_text(req.read_text().replace("sa/frontend", "sa/orders"))
    assert main(["check", "--policies", str(POLICIES), str(req)]) == 0
    assert (
        "decision: ALLOW reason=allowed_by_policy (shop/payments rules[0])"
        in capsys.readouterr().out
    )


def test_shipped_policy_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "test", str(POLICIES)]) == 0
    assert " 0 failed" in capsys.readouterr().out


def _suite(tmp_path: Path, cases: list[dict[str, Any]]) -> Path:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([DENY_ADMIN, ALLOW]))
    (tmp_path / "p.test.yaml").write_text(yaml.safe_dump({"tests": cases}))
    return tmp_path


def test_policy_test_reports_each_mismatch_with_the_explanation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        {
            "name": "health is open",
            "request": {"namespace": "ns1", "path": "/health"},
            "expect": {"decision": "allow", "policy": "ns1/web", "rule": "rules[1]"},
        },
        {
            "name": "wrong on purpose",
            "request": {"namespace": "ns1", "path": "/admin", "method": "POST"},
            "expect": {"decision": "allow", "status": 200, "reason": "allowed_by_policy"},
        },
    ]
    d = _suite(tmp_path, cases)
    assert main(["policy", "test", str(d)]) == 1
    out = capsys.readouterr().out
    assert "FAIL:" in out
    assert "wrong on purpose" in out
    assert "health is open" not in out  # passing cases are quiet unless -v
    assert "expected decision 'allow', got 'deny'" in out
    assert "expected status 200, got 403" in out
    assert "| DENY ns1/deny-admin" in out  # the explanation follows the failure
    assert "1/2 passed, 1 failed" in out
    assert main(["policy", "test", str(d), "--run", "health"]) == 0


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ([{"name": "x", "request": {}, "expect": {"decison": "allow"}}], "did you mean 'decision'"),
        (
            [{"name": "x", "request": {}, "expect": {"decision": "maybe"}}],
            "expect.decision must be",
        ),
        ([{"name": "x", "expect": {"decision": "allow"}}], "needs request and expect"),
        ([{"name": "x", "request": {"pth": "/"}, "expect": {"decision": "allow"}}], "'pth'"),
    ],
)
def test_policy_test_refuses_malformed_cases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cases: list[dict[str, Any]], message: str
) -> None:
    assert main(["policy", "test", str(_suite(tmp_path, cases))]) == 1
    out = capsys.readouterr().out
    assert message in out
    assert "p.test.yaml:" in out


def test_policy_test_without_cases_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(ALLOW))
    assert main(["policy", "test", str(tmp_path)]) == 1
    assert "no test cases found" in capsys.readouterr().out


def test_headers_expectation_checks_values_and_absence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = {
        "name": "h",
        "request": {
            "namespace": "ns1",
            "path": "/health",
            "principal": "spiffe://td/ns/ns1/sa/web",
        },
        "expect": {
            "decision": "allow",
            "headers": {"x-extauthz-spiffe-id": "spiffe://td/ns/ns1/sa/web", "x-user": None},
        },
    }
    assert main(["policy", "test", str(_suite(tmp_path, [case]))]) == 0
    case["expect"]["headers"]["x-extauthz-spiffe-id"] = "spiffe://other"  # type: ignore[index]
    assert main(["policy", "test", str(_suite(tmp_path, [case]))]) == 1
    assert "expected header 'x-extauthz-spiffe-id'" in capsys.readouterr().out


def test_explanations_never_show_credentials(tmp_path: Path) -> None:
    policy = {
        **ALLOW,
        "spec": {
            "rules": [
                {
                    "when": [
                        {"key": "request.headers[authorization]", "values": ["Bearer x"]},
                        {"key": "request.headers[cookie]", "values": ["a=b"]},
                    ]
                }
            ]
        },
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
    auth = Authorizer(PolicySet.load(tmp_path), Settings(workload_namespace="ns1"))
    headers = "headers: {authorization: Bearer s3cr3t, cookie: session=s3cr3t}\n"
    text = "\n".join(auth.explain(probe(headers).input).lines())
    assert "s3cr3t" not in text
    assert "<redacted>" in text
