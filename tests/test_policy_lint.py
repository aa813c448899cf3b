"""``extauthz policy lint`` warnings: never-matching values and shadowed rules, by table.

Each case is a list of policy specs (YAML mappings) and the warnings expected, as substrings;
an empty list asserts the set is clean, so a linter that warns on everything fails too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz.cli import main
from extauthz.policy.engine import PolicySet
from extauthz.policy.lint import lint

_KEY = ec.generate_private_key(ec.SECP256R1())
RA = {
    "apiVersion": "security.istio.io/v1",
    "kind": "RequestAuthentication",
    "metadata": {"name": "ra", "namespace": "ns1"},
    "spec": {
        "jwtRules": [
            {
                "issuer": "https://idp",
                "jwks": f'{{"keys": [{ECAlgorithm.to_jwk(_KEY.public_key())}]}}',
            }
        ]
    },
}


def policy(name: str, spec: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns1"}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


def to(**operation: list[str]) -> dict[str, Any]:
    return {"to": [{"operation": operation}]}


def frm(**source: list[str]) -> dict[str, Any]:
    return {"from": [{"source": source}]}


def allow(*rules: dict[str, Any], name: str = "a", **spec: Any) -> dict[str, Any]:
    return policy(name, {"action": "ALLOW", "rules": list(rules), **spec})


def deny(*rules: dict[str, Any], name: str = "d", **kw: Any) -> dict[str, Any]:
    return policy(name, {"action": "DENY", "rules": list(rules)}, **kw)


CASES: list[tuple[str, list[dict[str, Any]], list[str]]] = [
    ("clean", [allow(to(paths=["/a"]), to(paths=["/b"]))], []),
    (
        "spiffe scheme in principals",
        [allow(frm(principals=["spiffe://td/ns/a/sa/b"]))],
        ["never matches: Istio principals drop 'spiffe://'"],
    ),
    (
        "spiffe scheme in a when key",
        [allow({"when": [{"key": "source.principal", "values": ["spiffe://td/x"]}]})],
        ["Istio principals drop"],
    ),
    ("path without slash", [allow(to(paths=["api/v1"]))], ["paths start with '/'"]),
    ("suffix path is fine", [allow(to(paths=["*.png"]))], []),
    ("lower-case method", [allow(to(methods=["get"]))], ["methods are case-sensitive"]),
    (
        "request principal without slash",
        [RA, allow(frm(requestPrincipals=["alice"]))],
        ["<iss>/<sub>"],
    ),
    (
        "claims without any RequestAuthentication",
        [allow({"when": [{"key": "request.auth.claims[group]", "values": ["a"]}]})],
        ["no RequestAuthentication is loaded"],
    ),
    (
        "claims with a RequestAuthentication",
        [RA, allow({"when": [{"key": "request.auth.claims[group]", "values": ["a"]}]})],
        [],
    ),
    (
        "notValues on a claim need no token",
        [allow({"when": [{"key": "request.auth.claims[group]", "notValues": ["a"]}]})],
        [],
    ),
    (
        "field and its not form cancel",
        [allow(to(methods=["GET"], notMethods=["GET", "POST"]))],
        ["methods and not methods exclude each other"],
    ),
    ("field and a narrower not form are fine", [allow(to(paths=["/a*"], notPaths=["/a/b"]))], []),
    (
        "a not form wider than the field cancels",
        [allow(to(paths=["/a/b", "/a/c"], notPaths=["/a/*"]))],
        ["exclude each other"],
    ),
    (
        "duplicate rule in a policy",
        [allow(to(paths=["/a"]), to(paths=["/a"]))],
        ["rules[1] is shadowed by rules[0]"],
    ),
    (
        "prefix rule shadows an exact one after it",
        [allow(to(paths=["/api/*"]), to(paths=["/api/v1"], methods=["GET"]))],
        ["rules[1] is shadowed by rules[0]"],
    ),
    (
        "an exact rule before a prefix one shadows nothing",
        [allow(to(paths=["/api/v1"]), to(paths=["/api/*"]))],
        [],
    ),
    (
        "a rule without from is not covered by one with it",
        [allow(frm(principals=["a/ns/x/sa/y"]), {})],
        [],
    ),
    ("an empty rule shadows the rest", [allow({}, to(paths=["/x"]))], ["rules[1] is shadowed"]),
    (
        "suffix pattern covers",
        [allow(to(hosts=["*.example.com"]), to(hosts=["API.example.com"]))],
        ["rules[1] is shadowed by rules[0]"],
    ),
    (
        "more sources in the later rule are not covered",
        [
            allow(
                frm(principals=["td/ns/a/sa/x"]),
                {
                    "from": [
                        {"source": {"principals": ["td/ns/a/sa/x"]}},
                        {"source": {"namespaces": ["b"]}},
                    ]
                },
            )
        ],
        [],
    ),
    (
        "DENY covering an ALLOW rule",
        [deny(to(paths=["/admin*"])), allow(to(paths=["/admin/users"], methods=["GET"]))],
        ["never allows: DENY policy ns1/d rules[0]"],
    ),
    (
        "DENY narrower than the ALLOW rule is fine",
        [deny(to(paths=["/admin/users"])), allow(to(paths=["/admin*"]))],
        [],
    ),
    (
        "dry-run DENY shadows nothing",
        [deny(to(paths=["/admin*"]), dry_run=True), allow(to(paths=["/admin/x"]))],
        [],
    ),
    (
        "DENY selecting other workloads does not shadow",
        [
            policy(
                "d",
                {
                    "action": "DENY",
                    "selector": {"matchLabels": {"app": "b"}},
                    "rules": [to(paths=["/x"])],
                },
            ),
            allow(to(paths=["/x"]), selector={"matchLabels": {"app": "a"}}),
        ],
        [],
    ),
    (
        "DENY on all workloads shadows a selected ALLOW",
        [deny(to(paths=["/x"])), allow(to(paths=["/x"]), selector={"matchLabels": {"app": "a"}})],
        ["never allows"],
    ),
    (
        "DENY targeting one service does not shadow an ALLOW for the namespace",
        [
            policy(
                "d",
                {
                    "action": "DENY",
                    "targetRefs": [{"kind": "Service", "name": "orders"}],
                    "rules": [to(paths=["/x"])],
                },
            ),
            allow(to(paths=["/x"])),
        ],
        [],
    ),
    (
        "DENY targeting a service shadows an ALLOW targeting the same",
        [
            policy(
                "d",
                {
                    "action": "DENY",
                    "targetRefs": [{"kind": "Service", "name": "orders"}],
                    "rules": [to(paths=["/x"])],
                },
            ),
            allow(to(paths=["/x"]), targetRefs=[{"kind": "Service", "name": "orders"}]),
        ],
        ["never allows"],
    ),
    (
        "DENY with a when is wider only if the ALLOW has the same condition",
        [
            deny({**to(paths=["/x"]), "when": [{"key": "request.headers[x-a]", "values": ["1"]}]}),
            allow(to(paths=["/x"])),
        ],
        [],
    ),
    (
        "not forms: excluding more is narrower",
        [allow(to(notPaths=["/a"]), to(notPaths=["/a", "/b"]))],
        ["rules[1] is shadowed by rules[0]"],
    ),
]


@pytest.mark.parametrize(("docs", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lint(tmp_path: Path, docs: list[dict[str, Any]], expected: list[str]) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(docs))
    warnings = [str(w) for w in lint(PolicySet.load(tmp_path))]
    for want in expected:
        assert any(want in w for w in warnings), (want, warnings)
    assert len(warnings) == len(expected), warnings
    assert all(w.startswith(f"{tmp_path / 'p.yaml'}:") for w in warnings)


def test_lint_cli_strict_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(allow(to(methods=["get"]))))
    assert main(["policy", "lint", str(tmp_path)]) == 0
    assert main(["policy", "lint", "--strict", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "p.yaml:" in out
    assert "case-sensitive" in out
    assert "1 warning(s)" in out


def test_shipped_policies_are_clean() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert lint(PolicySet.load(repo / "policies")) == []
