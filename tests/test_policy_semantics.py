"""Istio AuthorizationPolicy / RequestAuthentication conformance, through the real loader.

Every case writes YAML into a temporary policy directory, loads it with ``PolicySet.load``,
and asks an :class:`Authorizer` for workload ``ns1`` / ``app=a``. The semantics asserted here
are the ones summarised in the Istio research notes (``/tmp/research/istio.md``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Decision, Outcome
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import to_check_response

ISS = "https://idp.test"
PEER = "spiffe://cluster.local/ns/ns2/sa/client"
PEER_PRINCIPAL = "cluster.local/ns/ns2/sa/client"
SETTINGS = Settings(workload_namespace="ns1", workload_labels="app=a")
XFCC = "x-forwarded-client-cert"  # stripped: extauthz is not told to trust it
SPIFFE_HEADER = "x-extauthz-spiffe-id"
DECISION_HEADER = "x-extauthz-decision-id"

_KEY = ec.generate_private_key(ec.SECP256R1())
_JWK = json.loads(ECAlgorithm.to_jwk(_KEY.public_key())) | {"kid": "k1"}
JWKS = json.dumps({"keys": [_JWK]})

ALICE: dict[str, Any] = {
    "iss": ISS,
    "sub": "alice",
    "aud": ["web", "api"],
    "azp": "web-client",
    "groups": ["dev", "admin"],
    "org": {"tenant": "acme", "tier": 3},
    "scope": "read write",
    "roles": "read write",
    "level": 5,
    "foo.com/role": "editor",
}


def sign(claims: Mapping[str, Any], *, ttl: int = 600) -> str:
    body = {"exp": int(time.time()) + ttl, **claims}
    return jwt.encode(body, _KEY, algorithm="ES256", headers={"kid": "k1"})


def token_for(**overrides: Any) -> dict[str, Any]:
    """ALICE with some claims replaced; a value of None removes the claim."""
    out = {**ALICE, **overrides}
    return {k: v for k, v in out.items() if v is not None}


# --- YAML builders ------------------------------------------------------------------------


def authz(
    name: str = "p",
    *,
    action: str | None = "ALLOW",
    rules: Sequence[Mapping[str, Any]] | None = None,
    namespace: str | None = "ns1",
    selector: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {}
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    if action is not None:
        spec["action"] = action
    if rules is not None:
        spec["rules"] = list(rules)
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


def authn(
    name: str = "jwt",
    *,
    namespace: str | None = "ns1",
    **rule: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    jwt_rule = {"issuer": ISS, "jwks": JWKS, **rule}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": meta,
        "spec": {"jwtRules": [jwt_rule]},
    }


def src(**fields: list[str]) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: list[str]) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(key: str, values: list[str] | None = None, **kw: list[str]) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    cond.update(kw)
    return {"when": [cond]}


def load(tmp_path: Path, *docs: Mapping[str, Any] | str) -> PolicySet:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    text = "---\n".join(
        d if isinstance(d, str) else yaml.safe_dump(dict(d), sort_keys=False) for d in docs
    )
    (directory / "policies.yaml").write_text(text)
    return PolicySet.load(directory)


def run(
    tmp_path: Path,
    docs: Sequence[Mapping[str, Any] | str],
    inp: CheckInput,
    settings: Settings = SETTINGS,
) -> Decision:
    return Authorizer(load(tmp_path, *docs), settings).check(inp)


def request(
    *,
    peer: str | None = PEER,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    **overrides: Any,
) -> CheckInput:
    all_headers = dict(headers or {})
    if claims is not None:
        all_headers["authorization"] = f"Bearer {sign(claims)}"
    fields: dict[str, Any] = {
        "method": "GET",
        "host": "example.com",
        "path": "/api/v1/items",
        "source_ip": "10.1.2.3",
        "destination_ip": "10.9.9.9",
        "destination_port": 8080,
        "source_principal": peer or "",
        "headers": all_headers,
    }
    fields.update(overrides)
    return CheckInput(**fields)


def assert_decision(
    d: Decision, outcome: Outcome, reason: str, policy: str = "", rule: str = ""
) -> None:
    assert (d.outcome, d.reason, d.policy, d.rule) == (outcome, reason, policy, rule), d.message


# --- the matching table -------------------------------------------------------------------


@dataclass(frozen=True)
class M:
    """One rule and one request; ``matches`` says whether the rule applies to it."""

    id: str
    rule: dict[str, Any]
    matches: bool
    peer: str | None = PEER
    claims: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    req: Mapping[str, Any] = field(default_factory=dict)
    hops: int = 0


NO_PEER: str | None = None

MATCHES: list[M] = [
    # principals
    M("principals-exact", src(principals=[PEER_PRINCIPAL]), True),
    M("principals-exact-other", src(principals=["cluster.local/ns/ns2/sa/other"]), False),
    M("principals-with-spiffe-scheme-is-not-istio-form", src(principals=[PEER]), False),
    M("principals-prefix", src(principals=["cluster.local/ns/ns2/*"]), True),
    M("principals-prefix-miss", src(principals=["cluster.local/ns/ns3/*"]), False),
    M("principals-suffix", src(principals=["*/sa/client"]), True),
    M("principals-suffix-miss", src(principals=["*/sa/other"]), False),
    M("principals-star", src(principals=["*"]), True),
    M("principals-star-no-peer", src(principals=["*"]), False, peer=NO_PEER),
    M("principals-exact-no-peer", src(principals=[PEER_PRINCIPAL]), False, peer=NO_PEER),
    M("principals-non-spiffe-peer", src(principals=["legacy.corp"]), True, peer="legacy.corp"),
    M("principals-values-ored", src(principals=["x/y", PEER_PRINCIPAL]), True),
    M("not-principals-other", src(notPrincipals=["cluster.local/ns/ns2/sa/other"]), True),
    M("not-principals-same", src(notPrincipals=[PEER_PRINCIPAL]), False),
    M("not-principals-star-no-peer", src(notPrincipals=["*"]), True, peer=NO_PEER),
    M("not-principals-star-with-peer", src(notPrincipals=["*"]), False),
    M("not-principals-exact-no-peer", src(notPrincipals=[PEER_PRINCIPAL]), True, peer=NO_PEER),
    # requestPrincipals
    M("request-principals-exact", src(requestPrincipals=[f"{ISS}/alice"]), True, claims=ALICE),
    M("request-principals-other-sub", src(requestPrincipals=[f"{ISS}/bob"]), False, claims=ALICE),
    M("request-principals-no-token", src(requestPrincipals=[f"{ISS}/alice"]), False),
    M("request-principals-iss-star", src(requestPrincipals=[f"{ISS}/*"]), True, claims=ALICE),
    M(
        "request-principals-iss-star-no-sub",
        src(requestPrincipals=[f"{ISS}/*"]),
        False,
        claims=token_for(sub=None),
    ),
    M(
        "request-principals-iss-star-other-iss",
        src(requestPrincipals=["https://other.test/*"]),
        False,
        claims=ALICE,
    ),
    M("request-principals-star", src(requestPrincipals=["*"]), True, claims=ALICE),
    M(
        "request-principals-star-needs-sub",
        src(requestPrincipals=["*"]),
        False,
        claims=token_for(sub=None),
    ),
    M(
        "request-principals-star-empty-sub",
        src(requestPrincipals=["*"]),
        False,
        claims=token_for(sub=""),
    ),
    M("request-principals-star-no-token", src(requestPrincipals=["*"]), False),
    M("request-principals-any-iss-sub", src(requestPrincipals=["*/alice"]), True, claims=ALICE),
    M("request-principals-sub-prefix", src(requestPrincipals=[f"{ISS}/al*"]), True, claims=ALICE),
    M("not-request-principals-star-no-token", src(notRequestPrincipals=["*"]), True),
    M(
        "not-request-principals-star-token",
        src(notRequestPrincipals=["*"]),
        False,
        claims=ALICE,
    ),
    # namespaces (glob)
    M("namespaces-exact", src(namespaces=["ns2"]), True),
    M("namespaces-other", src(namespaces=["ns3"]), False),
    M("namespaces-glob-suffix-star", src(namespaces=["ns*"]), True),
    M("namespaces-glob-prefix-star", src(namespaces=["*2"]), True),
    M("namespaces-glob-middle-star", src(namespaces=["n*2"]), True),
    M("namespaces-glob-middle-star-miss", src(namespaces=["n*3"]), False),
    M("namespaces-star", src(namespaces=["*"]), True),
    M("namespaces-no-peer", src(namespaces=["ns2"]), False, peer=NO_PEER),
    M("namespaces-star-no-peer", src(namespaces=["*"]), False, peer=NO_PEER),
    M("namespaces-non-spiffe-peer", src(namespaces=["*"]), False, peer="legacy.corp"),
    M("not-namespaces-other", src(notNamespaces=["ns3"]), True),
    M("not-namespaces-same", src(notNamespaces=["ns2"]), False),
    M("not-namespaces-no-peer", src(notNamespaces=["ns2"]), True, peer=NO_PEER),
    # serviceAccounts: bare name is in the policy's namespace (ns1), not the caller's
    M("service-accounts-ns-sa", src(serviceAccounts=["ns2/client"]), True),
    M("service-accounts-bare-is-policy-namespace", src(serviceAccounts=["client"]), False),
    M(
        "service-accounts-bare-same-namespace",
        src(serviceAccounts=["client"]),
        True,
        peer="spiffe://cluster.local/ns/ns1/sa/client",
    ),
    M("service-accounts-other", src(serviceAccounts=["ns2/other"]), False),
    M(
        "service-accounts-any-trust-domain",
        src(serviceAccounts=["ns2/client"]),
        True,
        peer="spiffe://other.domain/ns/ns2/sa/client",
    ),
    M("service-accounts-no-peer", src(serviceAccounts=["ns2/client"]), False, peer=NO_PEER),
    M("not-service-accounts-same", src(notServiceAccounts=["ns2/client"]), False),
    M("not-service-accounts-no-peer", src(notServiceAccounts=["ns2/client"]), True, peer=NO_PEER),
    # ipBlocks (source.ip, the direct peer)
    M("ip-blocks-cidr", src(ipBlocks=["10.1.0.0/16"]), True),
    M("ip-blocks-bare-ip", src(ipBlocks=["10.1.2.3"]), True),
    M("ip-blocks-bare-ip-other", src(ipBlocks=["10.1.2.4"]), False),
    M("ip-blocks-cidr-miss", src(ipBlocks=["10.2.0.0/16"]), False),
    M("ip-blocks-ipv6", src(ipBlocks=["2001:db8::/32"]), True, req={"source_ip": "2001:db8::7"}),
    M("ip-blocks-no-ip", src(ipBlocks=["0.0.0.0/0"]), False, req={"source_ip": ""}),
    M("not-ip-blocks-miss", src(notIpBlocks=["10.2.0.0/16"]), True),
    M("not-ip-blocks-hit", src(notIpBlocks=["10.1.2.3"]), False),
    M(
        "ip-blocks-ignore-xff",
        src(ipBlocks=["203.0.113.0/24"]),
        False,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        hops=1,
    ),
    # remoteIpBlocks: XFF with trusted hops; without trusted hops, the direct peer
    M(
        "remote-ip-blocks-xff-one-hop",
        src(remoteIpBlocks=["203.0.113.0/24"]),
        True,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        hops=1,
    ),
    M(
        "remote-ip-blocks-xff-one-hop-not-the-proxy",
        src(remoteIpBlocks=["10.1.2.3"]),
        False,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        hops=1,
    ),
    M(
        "remote-ip-blocks-xff-untrusted",
        src(remoteIpBlocks=["203.0.113.0/24"]),
        False,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
    ),
    M("remote-ip-blocks-no-xff-is-peer", src(remoteIpBlocks=["10.1.2.3"]), True, hops=1),
    M(
        "not-remote-ip-blocks",
        src(notRemoteIpBlocks=["203.0.113.0/24"]),
        False,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        hops=1,
    ),
    # hosts: case-insensitive, port not stripped
    M("hosts-exact", op(hosts=["example.com"]), True),
    M("hosts-request-case", op(hosts=["example.com"]), True, req={"host": "EXAMPLE.Com"}),
    M("hosts-policy-case", op(hosts=["Example.COM"]), True),
    M(
        "hosts-exact-port-no-match",
        op(hosts=["example.com"]),
        False,
        req={"host": "example.com:8080"},
    ),
    M("hosts-port-star", op(hosts=["example.com:*"]), True, req={"host": "example.com:8080"}),
    M("hosts-port-star-no-port", op(hosts=["example.com:*"]), False),
    M("hosts-suffix", op(hosts=["*.example.com"]), True, req={"host": "api.example.com"}),
    M("hosts-suffix-apex", op(hosts=["*.example.com"]), False),
    M("hosts-other", op(hosts=["example.org"]), False),
    M("not-hosts", op(notHosts=["example.org"]), True),
    M("not-hosts-case", op(notHosts=["EXAMPLE.COM"]), False),
    # methods: case-sensitive
    M("methods", op(methods=["GET"]), True),
    M("methods-ored", op(methods=["POST", "GET"]), True),
    M("methods-lowercase", op(methods=["get"]), False),
    M("methods-other", op(methods=["POST"]), False),
    M("not-methods", op(notMethods=["POST"]), True),
    M("not-methods-same", op(notMethods=["GET"]), False),
    # paths
    M("paths-exact", op(paths=["/api/v1/items"]), True),
    M("paths-exact-miss", op(paths=["/api/v1"]), False),
    M("paths-case-sensitive", op(paths=["/API/v1/items"]), False),
    M("paths-prefix", op(paths=["/api/*"]), True),
    M("paths-suffix", op(paths=["*/items"]), True),
    M("paths-star", op(paths=["*"]), True),
    M("paths-query-ignored", op(paths=["/a"]), True, req={"path": "/a", "query": "x=1"}),
    M("paths-query-not-matched", op(paths=["/a?x=1"]), False, req={"path": "/a", "query": "x=1"}),
    M("paths-template-one-segment", op(paths=["/api/{*}/items"]), True),
    M(
        "paths-template-one-segment-not-two",
        op(paths=["/api/{*}/items"]),
        False,
        req={"path": "/api/v1/v2/items"},
    ),
    M("paths-template-single-not-deeper", op(paths=["/api/{*}"]), False),
    M("paths-template-single-not-empty", op(paths=["/api/{*}"]), False, req={"path": "/api/"}),
    M("paths-template-double", op(paths=["/api/{**}"]), True),
    M("paths-template-double-other-root", op(paths=["/web/{**}"]), False),
    M("paths-template-mixed", op(paths=["/{*}/v1/{**}"]), True),
    M("paths-template-with-plain", op(paths=["/nope", "/api/{*}/items"]), True),
    M("not-paths", op(notPaths=["/admin/*"]), True),
    M("not-paths-hit", op(notPaths=["/api/*"]), False),
    M("not-paths-template-hit", op(notPaths=["/api/{**}"]), False),
    # ports
    M("ports", op(ports=["8080"]), True),
    M("ports-other", op(ports=["9090"]), False),
    M("ports-no-port", op(ports=["8080"]), False, req={"destination_port": 0}),
    M("not-ports", op(notPorts=["9090"]), True),
    M("not-ports-same", op(notPorts=["8080"]), False),
    # combination: values OR'ed, fields AND'ed, entries OR'ed, from AND to AND when
    M("fields-anded-both", src(principals=[PEER_PRINCIPAL], namespaces=["ns2"]), True),
    M("fields-anded-one-fails", src(principals=[PEER_PRINCIPAL], namespaces=["ns3"]), False),
    M("op-fields-anded", op(methods=["GET"], paths=["/other"]), False),
    M(
        "from-entries-ored",
        {"from": [{"source": {"namespaces": ["ns3"]}}, {"source": {"namespaces": ["ns2"]}}]},
        True,
    ),
    M(
        "from-entries-ored-none",
        {"from": [{"source": {"namespaces": ["ns3"]}}, {"source": {"namespaces": ["ns4"]}}]},
        False,
    ),
    M(
        "to-entries-ored",
        {"to": [{"operation": {"methods": ["POST"]}}, {"operation": {"paths": ["/api/*"]}}]},
        True,
    ),
    M("from-and-to", src(namespaces=["ns2"]) | op(methods=["GET"]), True),
    M("from-and-to-to-fails", src(namespaces=["ns2"]) | op(methods=["POST"]), False),
    M("from-and-to-from-fails", src(namespaces=["ns3"]) | op(methods=["GET"]), False),
    M(
        "when-anded",
        {
            "when": [
                {"key": "request.headers[x-a]", "values": ["1"]},
                {"key": "request.headers[x-b]", "values": ["2"]},
            ]
        },
        False,
        headers={"x-a": "1", "x-b": "3"},
    ),
    M(
        "when-anded-all",
        {
            "when": [
                {"key": "request.headers[x-a]", "values": ["1"]},
                {"key": "request.headers[x-b]", "values": ["2"]},
            ]
        },
        True,
        headers={"x-a": "1", "x-b": "2"},
    ),
    M(
        "from-to-when",
        src(namespaces=["ns2"]) | op(methods=["GET"]) | when("destination.port", ["9"]),
        False,
    ),
    # when: request.headers
    M("headers-exact", when("request.headers[x-env]", ["prod"]), True, headers={"x-env": "prod"}),
    M(
        "headers-name-case",
        when("request.headers[X-Env]", ["prod"]),
        True,
        headers={"x-env": "prod"},
    ),
    M(
        "headers-value-case",
        when("request.headers[x-env]", ["PROD"]),
        False,
        headers={"x-env": "prod"},
    ),
    M("headers-prefix", when("request.headers[x-env]", ["pr*"]), True, headers={"x-env": "prod"}),
    M("headers-suffix", when("request.headers[x-env]", ["*od"]), True, headers={"x-env": "prod"}),
    M("headers-absent", when("request.headers[x-env]", ["prod"]), False),
    M("headers-star-present", when("request.headers[x-env]", ["*"]), True, headers={"x-env": "x"}),
    M(
        "headers-star-empty-value",
        when("request.headers[x-env]", ["*"]),
        True,
        headers={"x-env": ""},
    ),
    M("headers-star-absent", when("request.headers[x-env]", ["*"]), False),
    M(
        "headers-not-values-absent",
        when("request.headers[x-env]", notValues=["prod"]),
        True,
    ),
    M(
        "headers-not-values-hit",
        when("request.headers[x-env]", notValues=["prod"]),
        False,
        headers={"x-env": "prod"},
    ),
    M(
        "headers-values-and-not-values",
        when("request.headers[x-env]", ["p*"], notValues=["prod"]),
        True,
        headers={"x-env": "preprod"},
    ),
    M(
        "headers-values-and-not-values-excluded",
        when("request.headers[x-env]", ["p*"], notValues=["prod"]),
        False,
        headers={"x-env": "prod"},
    ),
    # when: request.auth.claims
    M("claims-string", when("request.auth.claims[azp]", ["web-client"]), True, claims=ALICE),
    M(
        "claims-list-any-element",
        when("request.auth.claims[groups]", ["admin"]),
        True,
        claims=ALICE,
    ),
    M("claims-list-no-element", when("request.auth.claims[groups]", ["ops"]), False, claims=ALICE),
    M("claims-list-prefix", when("request.auth.claims[groups]", ["ad*"]), True, claims=ALICE),
    M("claims-nested", when("request.auth.claims[org][tenant]", ["acme"]), True, claims=ALICE),
    M(
        "claims-nested-miss",
        when("request.auth.claims[org][tenant]", ["other"]),
        False,
        claims=ALICE,
    ),
    M("claims-nested-not-nested", when("request.auth.claims[org]", ["acme"]), False, claims=ALICE),
    M(
        "claims-dots-are-literal",
        when("request.auth.claims[foo.com/role]", ["editor"]),
        True,
        claims=ALICE,
    ),
    M(
        "claims-scope-space-split",
        when("request.auth.claims[scope]", ["write"]),
        True,
        claims=ALICE,
    ),
    M(
        "claims-other-claim-not-split",
        when("request.auth.claims[roles]", ["write"]),
        False,
        claims=ALICE,
    ),
    M(
        "claims-other-claim-whole",
        when("request.auth.claims[roles]", ["read write"]),
        True,
        claims=ALICE,
    ),
    M("claims-number-not-matched", when("request.auth.claims[level]", ["5"]), False, claims=ALICE),
    M(
        "claims-nested-number-not-matched",
        when("request.auth.claims[org][tier]", ["3"]),
        False,
        claims=ALICE,
    ),
    M("claims-absent-claim", when("request.auth.claims[missing]", ["x"]), False, claims=ALICE),
    M("claims-star-absent", when("request.auth.claims[missing]", ["*"]), False, claims=ALICE),
    M("claims-no-token", when("request.auth.claims[groups]", ["admin"]), False),
    M(
        "claims-not-values-hit",
        when("request.auth.claims[groups]", notValues=["admin"]),
        False,
        claims=ALICE,
    ),
    M(
        "claims-not-values-miss",
        when("request.auth.claims[groups]", notValues=["ops"]),
        True,
        claims=ALICE,
    ),
    M("claims-not-values-no-token", when("request.auth.claims[groups]", notValues=["admin"]), True),
    M(
        "claims-not-values-absent-claim",
        when("request.auth.claims[missing]", notValues=["x"]),
        True,
        claims=ALICE,
    ),
    # when: request.auth.*
    M("audiences", when("request.auth.audiences", ["api"]), True, claims=ALICE),
    M(
        "audiences-string-aud",
        when("request.auth.audiences", ["api"]),
        True,
        claims=token_for(aud="api"),
    ),
    M("audiences-miss", when("request.auth.audiences", ["mobile"]), False, claims=ALICE),
    M("audiences-no-token", when("request.auth.audiences", ["api"]), False),
    M("audiences-not-values-no-token", when("request.auth.audiences", notValues=["api"]), True),
    M("presenter", when("request.auth.presenter", ["web-client"]), True, claims=ALICE),
    M(
        "presenter-star-no-azp",
        when("request.auth.presenter", ["*"]),
        False,
        claims=token_for(azp=None),
    ),
    M(
        "presenter-not-values-no-azp",
        when("request.auth.presenter", notValues=["x"]),
        True,
        claims=token_for(azp=None),
    ),
    M("auth-principal", when("request.auth.principal", [f"{ISS}/alice"]), True, claims=ALICE),
    M("auth-principal-iss-star", when("request.auth.principal", [f"{ISS}/*"]), True, claims=ALICE),
    M("auth-principal-miss", when("request.auth.principal", [f"{ISS}/bob"]), False, claims=ALICE),
    M("auth-principal-no-token", when("request.auth.principal", ["*"]), False),
    M("auth-principal-not-values-no-token", when("request.auth.principal", notValues=["*"]), True),
    # when: connection / source / destination
    M("source-ip", when("source.ip", ["10.1.0.0/16"]), True),
    M("source-ip-miss", when("source.ip", ["10.2.0.0/16"]), False),
    M("source-ip-not-values", when("source.ip", notValues=["10.1.2.3"]), False),
    M(
        "remote-ip",
        when("remote.ip", ["203.0.113.7"]),
        True,
        headers={"x-forwarded-for": "203.0.113.7, 10.1.2.3"},
        hops=1,
    ),
    M("destination-ip", when("destination.ip", ["10.9.9.0/24"]), True),
    M("destination-port", when("destination.port", ["8080"]), True),
    M("destination-port-miss", when("destination.port", ["80"]), False),
    M("destination-port-not-values", when("destination.port", notValues=["80"]), True),
    M("sni", when("connection.sni", ["*.example.com"]), True, req={"sni": "api.example.com"}),
    M("sni-miss", when("connection.sni", ["*.example.com"]), False, req={"sni": "example.org"}),
    M("sni-absent", when("connection.sni", ["*"]), False),
    M("sni-not-values-absent", when("connection.sni", notValues=["api.example.com"]), True),
    M("source-namespace", when("source.namespace", ["ns2"]), True),
    M("source-namespace-miss", when("source.namespace", ["ns1"]), False),
    M("source-namespace-no-peer", when("source.namespace", ["ns2"]), False, peer=NO_PEER),
    M(
        "source-namespace-not-values-no-peer",
        when("source.namespace", notValues=["ns2"]),
        True,
        peer=NO_PEER,
    ),
    M("source-principal", when("source.principal", [PEER_PRINCIPAL]), True),
    M("source-principal-prefix", when("source.principal", ["cluster.local/*"]), True),
    M("source-principal-no-peer", when("source.principal", ["*"]), False, peer=NO_PEER),
    M("source-service-account", when("source.serviceAccount", ["ns2/client"]), True),
    M("source-service-account-miss", when("source.serviceAccount", ["ns2/other"]), False),
    # review findings: Istio reads namespaces/accounts with regexes over the whole principal
    M(
        "source-service-account-bare-name-is-policy-namespace",
        when("source.serviceAccount", ["client"]),
        True,
        peer="spiffe://cluster.local/ns/ns1/sa/client",
    ),
    M(
        "source-service-account-bare-name-other-namespace",
        when("source.serviceAccount", ["client"]),
        False,
    ),
    M(
        "namespaces-any-occurrence",
        src(namespaces=["evil"]),
        True,
        peer="spiffe://td/ns/good/sa/x/ns/evil/y",
    ),
    M(
        "service-accounts-any-sa-segment",
        src(serviceAccounts=["ns2/admin"]),
        True,
        peer="spiffe://td/ns/ns2/sa/x/sa/admin",
    ),
    M(
        "source-namespace-glob",
        when("source.namespace", ["team-*-prod"]),
        True,
        peer="spiffe://td/ns/team-a-prod/sa/x",
    ),
    M(
        "source-namespace-glob-stays-in-segment",
        when("source.namespace", ["team-*"]),
        False,
        peer="spiffe://td/nsx/team-a/prod/sa/x",
    ),
    M(
        "remote-ip-xff-shorter-than-trusted-hops-uses-peer",
        src(remoteIpBlocks=["192.0.2.0/24"]),
        False,
        headers={"x-forwarded-for": "192.0.2.1"},
        hops=2,
    ),
    M(
        "remote-ip-huge-xff-entry-is-no-address",
        src(remoteIpBlocks=["0.0.0.0/0"]),
        False,
        headers={"x-forwarded-for": "1" * 50_000 + ", 10.0.0.1"},
        hops=1,
    ),
]


def _check_match(tmp_path: Path, case: M, action: str) -> Decision:
    docs = [authn(), authz(action=action, rules=[case.rule])]
    settings = Settings(
        workload_namespace="ns1", workload_labels="app=a", xff_trusted_hops=case.hops
    )
    inp = request(peer=case.peer, claims=case.claims, headers=case.headers, **case.req)
    return run(tmp_path, docs, inp, settings)


@pytest.mark.parametrize("case", MATCHES, ids=[c.id for c in MATCHES])
def test_allow_rule(tmp_path: Path, case: M) -> None:
    d = _check_match(tmp_path, case, "ALLOW")
    if case.matches:
        assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/p", "rules[0]")
    else:
        assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")


@pytest.mark.parametrize("case", MATCHES, ids=[c.id for c in MATCHES])
def test_deny_rule(tmp_path: Path, case: M) -> None:
    # Absent attributes behave the same under DENY: positive forms miss, not-forms hit.
    d = _check_match(tmp_path, case, "DENY")
    if case.matches:
        assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/p", "rules[0]")
    else:
        assert_decision(d, Outcome.ALLOW, "no_allow_policy")


def test_deny_namespaces_with_longer_spiffe_path(tmp_path: Path) -> None:
    d = run(
        tmp_path,
        [authz(action="DENY", rules=[src(namespaces=["ns2"])])],
        request(peer="spiffe://cluster.local/ns/ns2/sa/client/v2"),
    )
    assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/p", "rules[0]")


# --- policy set structure -----------------------------------------------------------------


def test_no_policies_allows(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    d = Authorizer(PolicySet.load(tmp_path / "policies"), SETTINGS).check(request())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.audit == ()
    assert d.dry_run_allowed is None


SPEC_EMPTY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: ns1}
spec: {}
"""
NO_SPEC = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: ns1}
"""
RULES_EMPTY_LIST = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: ns1}
spec: {action: ALLOW, rules: []}
"""
ALLOW_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: ns1}
spec:
  rules:
  - {}
"""
DENY_NO_RULES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: ns1}
spec:
  action: DENY
"""
DENY_EMPTY_RULE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: ns1}
spec:
  action: DENY
  rules: [{}]
"""


@pytest.mark.parametrize(
    ("text", "outcome", "reason", "policy"),
    [
        (SPEC_EMPTY, Outcome.PERMISSION_DENIED, "no_allow_policy_matched", ""),
        (NO_SPEC, Outcome.PERMISSION_DENIED, "no_allow_policy_matched", ""),
        (RULES_EMPTY_LIST, Outcome.PERMISSION_DENIED, "no_allow_policy_matched", ""),
        (ALLOW_ALL, Outcome.ALLOW, "allowed_by_policy", "ns1/allow-all"),
        (DENY_NO_RULES, Outcome.ALLOW, "no_allow_policy", ""),
        (DENY_EMPTY_RULE, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/deny-all"),
    ],
    ids=[
        "spec-empty-allow-nothing",
        "no-spec-allow-nothing",
        "rules-empty-list-allow-nothing",
        "empty-rule-allow-all",
        "deny-without-rules-matches-nothing",
        "deny-empty-rule-denies-all",
    ],
)
def test_defaults(tmp_path: Path, text: str, outcome: Outcome, reason: str, policy: str) -> None:
    d = run(tmp_path, [text], request(peer=NO_PEER))
    assert_decision(d, outcome, reason, policy, "rules[0]" if policy else "")


def test_deny_beats_allow(tmp_path: Path) -> None:
    docs = [
        authz("allow-all", rules=[{}]),
        authz("deny-admin", action="DENY", rules=[op(paths=["/admin", "/admin/*"])]),
    ]
    d = run(tmp_path, docs, request(path="/admin/users"))
    assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/deny-admin", "rules[0]")
    assert d.upstream_headers == ()
    d = run(tmp_path, docs, request(path="/public"))
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/allow-all", "rules[0]")


def test_action_defaults_to_allow(tmp_path: Path) -> None:
    d = run(tmp_path, [authz(action=None, rules=[op(methods=["POST"])])], request())
    assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")


def test_rules_ored_reports_matching_rule(tmp_path: Path) -> None:
    rules = [op(methods=["POST"]), op(methods=["GET"]), op(paths=["/api/*"])]
    d = run(tmp_path, [authz(rules=rules)], request())
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/p", "rules[1]")


def test_any_allow_policy_allows(tmp_path: Path) -> None:
    docs = [authz("a", rules=[op(methods=["POST"])]), authz("b", rules=[op(methods=["GET"])])]
    d = run(tmp_path, docs, request())
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/b", "rules[0]")


@pytest.mark.parametrize(
    ("docs", "outcome", "reason", "policy", "audit"),
    [
        (
            [authz("audit-all", action="AUDIT", rules=[{}])],
            Outcome.ALLOW,
            "no_allow_policy",
            "",
            ("ns1/audit-all",),
        ),
        (
            [authz("audit-post", action="AUDIT", rules=[op(methods=["POST"])])],
            Outcome.ALLOW,
            "no_allow_policy",
            "",
            (),
        ),
        (
            [
                authz("audit-all", action="AUDIT", rules=[{}]),
                authz("allow-post", rules=[op(methods=["POST"])]),
            ],
            Outcome.PERMISSION_DENIED,
            "no_allow_policy_matched",
            "",
            ("ns1/audit-all",),
        ),
        (
            [
                authz("audit-all", action="AUDIT", rules=[{}]),
                authz("deny-all", action="DENY", rules=[{}]),
            ],
            Outcome.PERMISSION_DENIED,
            "denied_by_policy",
            "ns1/deny-all",
            ("ns1/audit-all",),
        ),
        (
            [
                authz("audit-a", action="AUDIT", rules=[{}]),
                authz("audit-b", action="AUDIT", rules=[op(methods=["GET"])]),
                authz("allow-all", rules=[{}]),
            ],
            Outcome.ALLOW,
            "allowed_by_policy",
            "ns1/allow-all",
            ("ns1/audit-a", "ns1/audit-b"),
        ),
    ],
    ids=["audit-only", "audit-no-match", "audit-with-allow-miss", "audit-with-deny", "two-audits"],
)
def test_audit_changes_nothing(
    tmp_path: Path,
    docs: list[dict[str, Any]],
    outcome: Outcome,
    reason: str,
    policy: str,
    audit: tuple[str, ...],
) -> None:
    d = run(tmp_path, docs, request())
    assert_decision(d, outcome, reason, policy, "rules[0]" if policy else "")
    assert d.audit == audit


# --- scope --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "applies", "key"),
    [
        (authz("deny", action="DENY", rules=[{}], selector={"app": "a"}), True, "ns1/deny"),
        (authz("deny", action="DENY", rules=[{}], selector={"app": "b"}), False, ""),
        (
            authz("deny", action="DENY", rules=[{}], selector={"app": "a", "version": "v1"}),
            False,
            "",
        ),
        (authz("deny", action="DENY", rules=[{}], namespace="ns2"), False, ""),
        (
            authz("deny", action="DENY", rules=[{}], namespace="istio-system"),
            True,
            "istio-system/deny",
        ),
        (
            authz(
                "deny", action="DENY", rules=[{}], namespace="istio-system", selector={"app": "a"}
            ),
            True,
            "istio-system/deny",
        ),
        (
            authz(
                "deny", action="DENY", rules=[{}], namespace="istio-system", selector={"app": "b"}
            ),
            False,
            "",
        ),
        (authz("deny", action="DENY", rules=[{}], namespace=None), True, "deny"),
        (
            authz("deny", action="DENY", rules=[{}], namespace="ns2", selector={"app": "a"}),
            False,
            "",
        ),
    ],
    ids=[
        "selector-match",
        "selector-other-app",
        "selector-needs-all-labels",
        "other-namespace",
        "root-namespace",
        "root-namespace-selector-match",
        "root-namespace-selector-other",
        "no-namespace",
        "other-namespace-same-labels",
    ],
)
def test_scope(tmp_path: Path, doc: dict[str, Any], applies: bool, key: str) -> None:
    d = run(tmp_path, [doc], request())
    if applies:
        assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", key, "rules[0]")
    else:
        assert_decision(d, Outcome.ALLOW, "no_allow_policy")


def test_allow_policy_for_other_workload_does_not_deny(tmp_path: Path) -> None:
    doc = authz("b-only", rules=[], selector={"app": "b"})
    assert_decision(run(tmp_path, [doc], request()), Outcome.ALLOW, "no_allow_policy")


def test_workload_unknown_without_namespace(tmp_path: Path) -> None:
    d = run(tmp_path, [authz(rules=[{}])], request(), Settings())
    assert_decision(d, Outcome.PERMISSION_DENIED, "workload_unknown")
    assert d.client_headers == ()


def test_workload_unknown_without_labels_for_selector(tmp_path: Path) -> None:
    doc = authz(rules=[{}], selector={"app": "a"})
    d = run(tmp_path, [doc], request(), Settings(workload_namespace="ns1"))
    assert_decision(d, Outcome.PERMISSION_DENIED, "workload_unknown")


def test_unscoped_policies_need_no_workload(tmp_path: Path) -> None:
    doc = authz("allow-get", namespace=None, rules=[op(methods=["GET"])])
    d = run(tmp_path, [doc], request(), Settings())
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "allow-get", "rules[0]")


def test_namespace_from_destination_principal(tmp_path: Path) -> None:
    inp = request(destination_principal="spiffe://cluster.local/ns/ns1/sa/server")
    d = run(tmp_path, [authz(rules=[op(methods=["POST"])])], inp, Settings())
    assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")
    inp = request(destination_principal="spiffe://cluster.local/ns/ns9/sa/server")
    d = run(tmp_path, [authz(rules=[op(methods=["POST"])])], inp, Settings())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")


def test_context_extensions_override_settings(tmp_path: Path) -> None:
    docs = [
        authz("ns1-deny", action="DENY", rules=[{}], namespace="ns1", selector={"app": "a"}),
        authz(
            "ns2-b-allow-post", namespace="ns2", selector={"app": "b"}, rules=[op(methods=["POST"])]
        ),
    ]
    inp = request(context_extensions={"namespace": "ns2", "labels": "app=b,version=v1"})
    d = run(tmp_path, docs, inp)
    assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")
    inp = request(context_extensions={"namespace": "ns2", "labels": "app=c"})
    assert_decision(run(tmp_path, docs, inp), Outcome.ALLOW, "no_allow_policy")
    # Only the namespace given: the labels still come from Settings.
    inp = request(context_extensions={"namespace": "ns1"})
    d = run(tmp_path, docs, inp)
    assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/ns1-deny", "rules[0]")


# --- dry run ------------------------------------------------------------------------------


def test_dry_run_deny_is_not_enforced(tmp_path: Path) -> None:
    doc = authz(
        "dry-deny",
        action="DENY",
        rules=[op(methods=["GET"])],
        annotations={"istio.io/dry-run": "true"},
    )
    d = run(tmp_path, [doc], request())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.dry_run_allowed is False
    assert d.dry_run_policy == "ns1/dry-deny"


def test_dry_run_deny_not_matching(tmp_path: Path) -> None:
    doc = authz(
        "dry-deny",
        action="DENY",
        rules=[op(methods=["POST"])],
        annotations={"istio.io/dry-run": "true"},
    )
    d = run(tmp_path, [doc], request())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.dry_run_allowed is True
    assert d.dry_run_policy == ""


def test_dry_run_allow_nothing(tmp_path: Path) -> None:
    doc = authz("dry-allow", rules=[], annotations={"istio.io/dry-run": "True"})
    d = run(tmp_path, [doc], request())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.dry_run_allowed is False
    assert d.dry_run_policy == ""


def test_dry_run_is_evaluated_together_with_enforced_policies(tmp_path: Path) -> None:
    # extauthz's shadow verdict is "the decision if dry-run policies were enforced", so an
    # enforced ALLOW still counts in it (Istio's dry-run engines hold only dry-run policies).
    docs = [
        authz("allow-get", rules=[op(methods=["GET"])]),
        authz(
            "dry-allow-post", rules=[op(methods=["POST"])], annotations={"istio.io/dry-run": "true"}
        ),
    ]
    d = run(tmp_path, docs, request())
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/allow-get", "rules[0]")
    assert d.dry_run_allowed is True
    assert d.dry_run_policy == "ns1/allow-get"


def test_dry_run_false_is_enforced(tmp_path: Path) -> None:
    doc = authz("deny", action="DENY", rules=[{}], annotations={"istio.io/dry-run": "false"})
    d = run(tmp_path, [doc], request())
    assert_decision(d, Outcome.PERMISSION_DENIED, "denied_by_policy", "ns1/deny", "rules[0]")
    assert d.dry_run_allowed is None


# --- identity failures --------------------------------------------------------------------


def _www(reason: str, error: str = "invalid_token") -> tuple[str, str]:
    return (
        "www-authenticate",
        f'Bearer realm="extauthz", error="{error}", error_description="{reason}"',
    )


@pytest.mark.parametrize(
    ("build", "reason", "error"),
    [
        (
            lambda: request(peer="spiffe://cluster.local/ns/ns2/sa/"),
            "spiffe_id_invalid",
            "invalid_token",
        ),
        (
            lambda: request(peer=NO_PEER, peer_certificate="garbage"),
            "peer_certificate_invalid",
            "invalid_token",
        ),
        (
            lambda: request(headers={"authorization": f"Bearer {sign(ALICE, ttl=-3600)}"}),
            "jwt_expired",
            "invalid_token",
        ),
        (
            lambda: request(
                headers={"authorization": f"Bearer {sign(token_for(iss='https://evil'))}"}
            ),
            "jwt_issuer_unknown",
            "invalid_token",
        ),
        (
            lambda: request(headers={"authorization": "Bearer a.b"}),
            "jwt_malformed",
            "invalid_token",
        ),
        (
            lambda: request(claims=ALICE, query=f"access_token={sign(token_for(sub='bob'))}"),
            "jwt_multiple",
            "invalid_request",
        ),
    ],
    ids=[
        "bad-spiffe-id",
        "bad-certificate",
        "expired-token",
        "unknown-issuer",
        "malformed-token",
        "two-tokens",
    ],
)
def test_identity_failure_is_401(tmp_path: Path, build: Any, reason: str, error: str) -> None:
    # Even an allow-all policy does not let a broken identity through.
    d = run(tmp_path, [authn(), authz("allow-all", rules=[{}])], build())
    assert_decision(d, Outcome.UNAUTHENTICATED, reason)
    assert d.client_headers == (_www(reason, error),)
    assert d.upstream_headers == ()


def test_missing_token_is_anonymous_not_401(tmp_path: Path) -> None:
    d = run(tmp_path, [authn()], request())
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert (d.issuer, d.subject) == ("", "")


def test_token_ignored_without_request_authentication(tmp_path: Path) -> None:
    # A token nobody configured is not verified (no jwt_authn filter), so it is not a 401 ...
    inp = request(headers={"authorization": "Bearer garbage"})
    d = run(tmp_path, [authz(rules=[src(requestPrincipals=["*"])])], inp)
    # ... but it is no identity either.
    assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")


def test_request_authentication_of_other_namespace_does_not_apply(tmp_path: Path) -> None:
    d = run(tmp_path, [authn(namespace="ns2")], request(claims=ALICE))
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.issuer == ""


def test_cors_preflight_skips_token_verification(tmp_path: Path) -> None:
    inp = request(
        method="OPTIONS",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "authorization": "Bearer not-a-jwt",
        },
    )
    d = run(tmp_path, [authn()], inp)
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")


# --- headers on allow ---------------------------------------------------------------------


CLAIM_HEADERS = [
    {"header": "x-user", "claim": "sub"},
    {"header": "x-tenant", "claim": "org.tenant"},
    {"header": "x-level", "claim": "level"},
    {"header": "x-admin", "claim": "is_admin"},
    {"header": "x-groups", "claim": "groups"},
    {"header": "x-evil", "claim": "evil"},
    {"header": "x-missing", "claim": "missing"},
]


def test_claim_that_cannot_be_encoded_is_not_copied(tmp_path: Path) -> None:
    claims = token_for(sub="\ud800")  # a lone surrogate survives JSON but not UTF-8
    docs = [authn(outputClaimToHeaders=[{"header": "x-user", "claim": "sub"}]), authz(rules=[{}])]
    d = run(tmp_path, docs, request(claims=claims))
    assert d.outcome is Outcome.ALLOW
    assert "x-user" not in dict(d.upstream_headers)
    assert "x-user" in d.remove_headers
    to_check_response(d).SerializeToString()  # the edge can encode it


def test_allow_headers_with_spiffe_peer_and_token(tmp_path: Path) -> None:
    claims = token_for(is_admin=True, evil="alice\r\nx-admin: true")
    docs = [authn(outputClaimToHeaders=CLAIM_HEADERS), authz(rules=[{}])]
    d = run(tmp_path, docs, request(claims=claims))
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/p", "rules[0]")
    # identity headers come last, so nothing written before them can shadow them
    assert d.upstream_headers == (
        ("x-user", "alice"),
        ("x-tenant", "acme"),
        ("x-level", "5"),
        ("x-admin", "true"),
        (DECISION_HEADER, d.decision_id),
        (SPIFFE_HEADER, PEER),
    )
    assert all("\r" not in v and "\n" not in v for _, v in d.upstream_headers)
    # the token is not forwarded; claim headers that were not set cannot be spoofed
    assert d.remove_headers == (
        "authorization",
        "x-evil",
        XFCC,
        "x-groups",
        "x-missing",
    )
    assert (d.spiffe_id, d.principal) == (PEER, PEER_PRINCIPAL)
    assert (d.issuer, d.subject) == (ISS, "alice")
    assert len(d.decision_id) == 32


def test_allow_headers_without_peer(tmp_path: Path) -> None:
    d = run(tmp_path, [authz(rules=[{}])], request(peer=NO_PEER))
    assert_decision(d, Outcome.ALLOW, "allowed_by_policy", "ns1/p", "rules[0]")
    assert d.upstream_headers == ((DECISION_HEADER, d.decision_id),)
    assert d.remove_headers == (SPIFFE_HEADER, XFCC)
    assert (d.spiffe_id, d.principal) == ("", "")


def test_allow_headers_non_spiffe_peer(tmp_path: Path) -> None:
    d = run(tmp_path, [authz(rules=[{}])], request(peer="legacy.corp"))
    assert d.upstream_headers == ((DECISION_HEADER, d.decision_id),)
    assert d.remove_headers == (SPIFFE_HEADER, XFCC)
    assert (d.spiffe_id, d.principal) == ("", "legacy.corp")


def test_spiffe_header_name_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        workload_namespace="ns1", workload_labels="app=a", spiffe_id_header="x-peer"
    )
    d = run(tmp_path, [authz(rules=[{}])], request(), settings)
    assert d.upstream_headers == ((DECISION_HEADER, d.decision_id), ("x-peer", PEER))
    assert d.remove_headers == (XFCC,)


def test_forward_original_token_keeps_authorization(tmp_path: Path) -> None:
    d = run(tmp_path, [authn(forwardOriginalToken=True)], request(claims=ALICE))
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert "authorization" not in d.remove_headers
    assert d.remove_headers == (XFCC,)


def test_custom_header_token_removed(tmp_path: Path) -> None:
    rule: dict[str, Any] = {"fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}]}
    inp = request(headers={"x-jwt": f"Token {sign(ALICE)}"})
    d = run(tmp_path, [authn(**rule)], inp)
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.subject == "alice"
    assert d.remove_headers == ("x-jwt", XFCC)


def test_param_token_cannot_be_removed(tmp_path: Path) -> None:
    d = run(tmp_path, [authn()], request(query=f"access_token={sign(ALICE)}"))
    assert d.subject == "alice"
    assert d.remove_headers == (XFCC,)


def test_output_payload_to_header(tmp_path: Path) -> None:
    token = sign(ALICE)
    inp = request(headers={"authorization": f"Bearer {token}"})
    d = run(tmp_path, [authn(outputPayloadToHeader="X-Jwt-Payload")], inp)
    assert ("x-jwt-payload", token.split(".")[1]) in d.upstream_headers
    assert d.remove_headers == ("authorization", XFCC)


def test_managed_headers_removed_when_no_token(tmp_path: Path) -> None:
    docs = [
        authn(
            outputClaimToHeaders=[{"header": "x-user", "claim": "sub"}],
            outputPayloadToHeader="x-payload",
        ),
    ]
    d = run(tmp_path, docs, request(headers={"x-user": "root", "x-payload": "e30"}))
    assert_decision(d, Outcome.ALLOW, "no_allow_policy")
    assert d.upstream_headers == ((DECISION_HEADER, d.decision_id), (SPIFFE_HEADER, PEER))
    assert d.remove_headers == (XFCC, "x-payload", "x-user")


def test_deny_has_no_upstream_headers(tmp_path: Path) -> None:
    docs = [authn(outputClaimToHeaders=CLAIM_HEADERS), authz(rules=[op(methods=["POST"])])]
    d = run(tmp_path, docs, request(claims=ALICE))
    assert_decision(d, Outcome.PERMISSION_DENIED, "no_allow_policy_matched")
    assert d.upstream_headers == ()
    assert d.remove_headers == ()
    assert d.client_headers == ()
    # identity is still recorded for the audit trail
    assert (d.spiffe_id, d.issuer, d.subject) == (PEER, ISS, "alice")


# --- several providers on one workload -------------------------------------------------------

_B_KEY = ec.generate_private_key(ec.SECP256R1())
_B_ISS = "https://partner.test"


def _b_token(**claims: Any) -> str:
    body = {"iss": _B_ISS, "sub": "bob", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, _B_KEY, algorithm="ES256", headers={"kid": "b1"})


def _partner_authn() -> dict[str, Any]:
    jwk = json.loads(ECAlgorithm.to_jwk(_B_KEY.public_key()))
    jwk.update(kid="b1", alg="ES256")
    doc = authn("partner")
    doc["spec"]["jwtRules"] = [
        {
            "issuer": _B_ISS,
            "jwks": json.dumps({"keys": [jwk]}),
            "fromHeaders": [{"name": "x-partner-token", "prefix": "Tok "}],
            "fromCookies": ["partner_session"],
        }
    ]
    return doc


@pytest.mark.parametrize(
    ("headers", "outcome", "principal"),
    [
        ({"authorization": "Bearer " + sign(ALICE)}, Outcome.ALLOW, f"{ISS}/alice"),
        ({"x-partner-token": "Tok " + _b_token()}, Outcome.ALLOW, f"{_B_ISS}/bob"),
        ({"cookie": "a=1; partner_session=" + _b_token()}, Outcome.ALLOW, f"{_B_ISS}/bob"),
        # Each issuer only where its rule looks: a partner token as a Bearer is refused.
        ({"authorization": "Bearer " + _b_token()}, Outcome.UNAUTHENTICATED, ""),
        ({"x-partner-token": "Tok " + sign(ALICE)}, Outcome.UNAUTHENTICATED, ""),
        # Signed with the other provider's key: never verified by trying every key.
        (
            {
                "x-partner-token": "Tok "
                + jwt.encode({"iss": _B_ISS, "sub": "x"}, _KEY, "ES256", {"kid": "b1"})
            },
            Outcome.UNAUTHENTICATED,
            "",
        ),
    ],
    ids=[
        "idp-bearer",
        "partner-header",
        "partner-cookie",
        "partner-as-bearer",
        "idp-in-partner-header",
        "cross-signed",
    ],
)
def test_several_request_authentications_on_one_workload(
    tmp_path: Path, headers: dict[str, str], outcome: Outcome, principal: str
) -> None:
    policy = authz(rules=[src(requestPrincipals=[f"{ISS}/*", f"{_B_ISS}/*"])])
    d = run(tmp_path, [authn(), _partner_authn(), policy], request(headers=headers))
    assert d.outcome is outcome, d.message
    if principal:
        assert f"{d.issuer}/{d.subject}" == principal
