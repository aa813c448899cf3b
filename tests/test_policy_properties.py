"""Property tests: the compiled engine agrees with :mod:`policy_reference` on random input.

Hypothesis draws policy sets (1-6 AuthorizationPolicies mixing ALLOW/DENY/AUDIT, some dry-run,
in or out of the workload's scope, plus 0-2 RequestAuthentications) and batches of requests
(method, host, path, port, optional mTLS peer, optional signed JWT, headers), all from small
vocabularies so that rules match often. Each set goes through the real loader
(``PolicySet.load`` on a temporary directory) and each request through the real
:class:`Authorizer`, JWT verification included. Outcome, reason, deciding policy, AUDIT list
and dry-run verdict must equal the reference's, and so must the match of every single rule,
field and condition (see :func:`rule_probes`).

Examples: 750 policy sets (up to 8 requests each) by default, about 25 s on 2 cores.
``HYPOTHESIS_PROFILE=long`` runs 5000; ``EXTAUTHZ_PROPERTY_EXAMPLES=<n>`` sets the number.

Disagreements found so far are kept as minimal ``@example``s on the test; values extauthz
refuses at load (a request principal with a '*' inside, such as "*/*") are out of the
vocabularies and tested in tests/test_policy_load.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, note, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm
from policy_reference import Request, Verdict, decide

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Decision, Outcome
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput

_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = int(os.environ.get("EXTAUTHZ_PROPERTY_EXAMPLES", "5000" if _LONG else "750"))

NAMESPACE = "ns1"
LABELS = {"app": "a"}
SETTINGS = Settings(workload_namespace=NAMESPACE, workload_labels="app=a")

_KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(_KEY.public_key())) | {"kid": "k1"}]})
IDP, OTHER = "https://idp.test", "https://other.test"

# --- vocabularies: small, overlapping, so that rules match (and miss) often ---------------

PRINCIPALS = (
    "cluster.local/ns/ns1/sa/a",
    "cluster.local/ns/ns2/sa/client",
    "cluster.local/*",
    "*/sa/client",
    "*",
)
# Forms extauthz accepts; a '*' inside a value is refused at load (test_policy_load.py).
REQUEST_PRINCIPALS = (
    f"{IDP}/alice",
    f"{IDP}/*",
    f"{IDP}/al*",
    "*/bob",
    "*test/bob",
    f"{OTHER}/alice",
    "*",
)
# Istio's '*' is '.*' and may span segments: "*a" also matches ".../ns/ns2/sa/...".
NAMESPACES = ("ns1", "ns2", "ns*", "*", "*a", "n*2")
SERVICE_ACCOUNTS = ("ns2/client", "ns1/a", "client", "a")  # bare: the policy's namespace
HOSTS = ("example.com", "EXAMPLE.com", "*.example.com", "example.*", "example.com:*", "*")
PORTS = ("8080", "9090")
METHODS = ("GET", "POST", "G*", "*")
PATHS = ("/a", "/a/b", "/b", "/a*", "*b", "*")

SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "principals": PRINCIPALS,
    "requestPrincipals": REQUEST_PRINCIPALS,
    "namespaces": NAMESPACES,
    "serviceAccounts": SERVICE_ACCOUNTS,
}
OPERATION_FIELDS: dict[str, tuple[str, ...]] = {
    "hosts": HOSTS,
    "ports": PORTS,
    "methods": METHODS,
    "paths": PATHS,
}
CONDITIONS: dict[str, tuple[str, ...]] = {
    "request.headers[x-env]": ("prod", "dev", "pr*", "*"),
    "request.auth.claims[groups]": ("dev", "admin", "ad*", "*"),
    "request.auth.claims[org][tenant]": ("acme", "other", "*"),
    "request.auth.claims[scope]": ("read", "write"),
    "request.auth.principal": REQUEST_PRINCIPALS,
    "request.auth.audiences": ("api", "web", "*"),
    "source.principal": PRINCIPALS,
    "source.namespace": NAMESPACES,
    "destination.port": PORTS,
}

PEERS = (
    None,
    "cluster.local/ns/ns1/sa/a",
    "cluster.local/ns/ns2/sa/client",
    "cluster.local/ns/ns2/sa/client/ns/ns1/x",  # two namespaces: Istio's regex sees both
    "other.td/ns/ns3/sa/b",
    "cluster.local/workload",  # SPIFFE, but no namespace or service account
)

# --- strategies ---------------------------------------------------------------------------


def _values(vocab: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(vocab), min_size=1, max_size=2, unique=True)


@st.composite
def _clause(
    draw: st.DrawFn, fields: Mapping[str, tuple[str, ...]], policy_ns: str | None
) -> dict[str, list[str]]:
    """One source/operation: 1-2 fields, each positive or ``notX``."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True))
    out: dict[str, list[str]] = {}
    for name in names:
        vocab = fields[name]
        if name == "serviceAccounts" and policy_ns is None:
            vocab = tuple(v for v in vocab if "/" in v)  # a bare name needs a namespace
        negate = draw(st.booleans())
        out[f"not{name[0].upper()}{name[1:]}" if negate else name] = draw(_values(vocab))
    return out


@st.composite
def _condition(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(sorted(CONDITIONS)))
    form = draw(st.sampled_from(("values", "notValues", "both")))
    cond: dict[str, Any] = {"key": key}
    if form in ("values", "both"):
        cond["values"] = draw(_values(CONDITIONS[key]))
    if form in ("notValues", "both"):
        cond["notValues"] = draw(_values(CONDITIONS[key]))
    return cond


@st.composite
def _rule(draw: st.DrawFn, policy_ns: str | None) -> dict[str, Any]:
    """A rule with any of from/to/when; ``{}`` (match everything) is a legitimate draw."""
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        sources = st.lists(_clause(SOURCE_FIELDS, policy_ns), min_size=1, max_size=2)
        rule["from"] = [{"source": s} for s in draw(sources)]
    if draw(st.booleans()):
        operations = st.lists(_clause(OPERATION_FIELDS, policy_ns), min_size=1, max_size=2)
        rule["to"] = [{"operation": o} for o in draw(operations)]
    if draw(st.booleans()):
        rule["when"] = draw(st.lists(_condition(), min_size=1, max_size=2))
    return rule


def _metadata(name: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


# ns1 is the workload's namespace, istio-system the root (applies too), ns2 does not apply.
_SCOPES = st.sampled_from(("ns1", "ns1", "istio-system", "ns2", None))
_SELECTORS = st.sampled_from((None, None, {"app": "a"}, {"app": "b"}))


@st.composite
def authorization_policy(draw: st.DrawFn, index: int) -> dict[str, Any]:
    namespace = draw(_SCOPES)
    meta = _metadata(f"p{index}", namespace)
    act = draw(st.sampled_from((None, "ALLOW", "ALLOW", "DENY", "DENY", "AUDIT")))
    # Istio's dry-run annotation is for ALLOW and DENY only.
    if act != "AUDIT" and draw(st.integers(0, 4)) == 0:
        meta["annotations"] = {"istio.io/dry-run": draw(st.sampled_from(("true", "false")))}
    spec: dict[str, Any] = {}
    selector = draw(_SELECTORS)
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if act is not None:
        spec["action"] = act
    # None: no rules at all (ALLOW allows nothing, DENY denies nothing); else 0-3 rules.
    rules = draw(st.one_of(st.none(), st.just([]), st.lists(_rule(namespace), max_size=3)))
    if rules is not None:
        spec["rules"] = rules
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": spec,
    }


@st.composite
def request_authentication(draw: st.DrawFn, index: int) -> dict[str, Any]:
    issuers = draw(st.sampled_from(([IDP], [IDP, OTHER], [IDP, OTHER], [OTHER])))
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": _metadata(f"jwt{index}", draw(_SCOPES)),
        "spec": {"jwtRules": [{"issuer": iss, "jwks": JWKS} for iss in issuers]},
    }


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    n_authz = draw(st.integers(1, 6))
    n_authn = draw(st.sampled_from((0, 1, 1, 1, 2)))
    return [draw(authorization_policy(i)) for i in range(n_authz)] + [
        draw(request_authentication(i)) for i in range(n_authn)
    ]


@st.composite
def token_claims(draw: st.DrawFn) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": draw(st.sampled_from((IDP, IDP, IDP, OTHER)))}
    optional = {  # None: the claim is left out
        "sub": st.sampled_from(("alice", "bob", "", None)),
        "aud": st.sampled_from((None, "api", ["web", "api"], ["web"])),
        "groups": st.sampled_from((None, "dev", "", ["dev"], ["dev", "admin"], [], ["", 7])),
        "org": st.sampled_from(
            (None, {"tenant": "acme"}, {"tenant": ""}, "acme", {"tenant": ["other", "acme"]})
        ),
        "scope": st.sampled_from((None, "read", "write", "read write")),
    }
    for name, strategy in optional.items():
        value = draw(strategy)
        if value is not None:
            claims[name] = value
    return claims


@st.composite
def requests(draw: st.DrawFn) -> Request:
    headers: dict[str, str] = {}
    env = draw(st.sampled_from((None, None, "", "prod", "dev", "preprod")))
    if env is not None:
        headers["x-env"] = env
    return Request(
        method=draw(st.sampled_from(("GET", "POST", "PUT"))),
        host=draw(
            st.sampled_from(
                ("example.com", "EXAMPLE.COM", "api.example.com", "example.com:8080", "example.org")
            )
        ),
        path=draw(st.sampled_from(("/", "/a", "/a/b", "/ab", "/b", "/b/c", "/c/b"))),
        port=draw(st.sampled_from((8080, 9090))),
        headers=headers,
        peer=draw(st.sampled_from(PEERS)),
        claims=draw(st.none() | token_claims()),
    )


# --- running the engine -------------------------------------------------------------------


@cache
def _sign(claims_json: str) -> str:
    body = {"exp": int(time.time()) + 86400, **json.loads(claims_json)}
    return jwt.encode(body, _KEY, algorithm="ES256", headers={"kid": "k1"})


def check_input(req: Request) -> CheckInput:
    headers = dict(req.headers)
    if req.claims is not None:
        headers["authorization"] = f"Bearer {_sign(json.dumps(req.claims, sort_keys=True))}"
    return CheckInput(
        method=req.method,
        host=req.host,
        path=req.path,
        headers=headers,
        source_ip="10.1.2.3",
        destination_ip="10.9.9.9",
        destination_port=req.port,
        source_principal=f"spiffe://{req.peer}" if req.peer else "",
    )


def load(docs: list[dict[str, Any]]) -> PolicySet:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        (path / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return PolicySet.load(path)


def engine_view(d: Decision) -> tuple[Any, ...]:
    return (d.outcome, d.reason, d.policy, d.audit, d.dry_run_allowed, d.dry_run_policy)


def reference_view(v: Verdict) -> tuple[Any, ...]:
    if v.allowed:
        outcome = Outcome.ALLOW
    elif v.reason.startswith("jwt_"):
        outcome = Outcome.UNAUTHENTICATED
    else:
        outcome = Outcome.PERMISSION_DENIED
    return (
        outcome,
        v.reason,
        v.policy or "",
        v.audit,
        v.dry_run_allowed,
        v.dry_run_policy or "",
    )


def _probe(name: str, namespace: str | None, rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": _metadata(name, namespace),
        "spec": {"action": "AUDIT", "rules": [rule]},
    }


def rule_probes(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rule, and each field and condition of it, as its own in-scope AUDIT policy.

    A decision lists every AUDIT policy that matched, so one Check of this set compares every
    single match with the reference, not only the one verdict they add up to (where a wrong
    match is usually masked by another field or policy). A policy's namespace is kept when it
    applies to the workload (it decides what a bare service account means), else ns1. The
    RequestAuthentications come along unchanged.
    """
    probes: list[dict[str, Any]] = []
    for doc in docs:
        if doc["kind"] != "AuthorizationPolicy":
            continue
        namespace = doc["metadata"].get("namespace")
        if namespace not in (None, NAMESPACE, "istio-system"):
            namespace = NAMESPACE
        name = doc["metadata"]["name"]
        for i, rule in enumerate(doc["spec"].get("rules") or []):
            probes.append(_probe(f"{name}-r{i}", namespace, rule))
            for part, inner in (("from", "source"), ("to", "operation")):
                for j, entry in enumerate(rule.get(part) or []):
                    for field, values in entry[inner].items():
                        single = {part: [{inner: {field: values}}]}
                        probes.append(_probe(f"{name}-r{i}-{part}{j}-{field}", namespace, single))
            for k, cond in enumerate(rule.get("when") or []):
                probes.append(_probe(f"{name}-r{i}-when{k}", namespace, {"when": [cond]}))
    return probes + [d for d in docs if d["kind"] == "RequestAuthentication"]


def assert_agree(docs: list[dict[str, Any]], reqs: list[Request]) -> None:
    """The decision agrees, and so does every single rule (through :func:`rule_probes`)."""
    in_hypothesis = currently_in_test_context()
    if in_hypothesis:
        note(yaml.safe_dump_all(docs, sort_keys=False))
    probes = rule_probes(docs)
    authorizer = Authorizer(load(docs), SETTINGS)
    prober = Authorizer(load(probes), SETTINGS)
    # Twice through: the second pass finds every decision the first one remembered (a
    # remembered decision must be the one the policies give).
    for req in [*reqs, *reqs]:
        expected = reference_view(decide(docs, req, namespace=NAMESPACE, labels=LABELS))
        got = engine_view(authorizer.check(check_input(req)))
        if in_hypothesis:
            event(f"reason: {got[1]}")
        assert got == expected, f"{req}\n engine:    {got}\n reference: {expected}"
        expected_rules = decide(probes, req, namespace=NAMESPACE, labels=LABELS).audit
        got_rules = prober.check(check_input(req)).audit
        if in_hypothesis:
            event(f"probes matched: {min(len(got_rules) // 4, 3) * 4}+")
        assert got_rules == expected_rules, (
            f"{req}\n engine:    {got_rules}\n reference: {expected_rules}"
        )


# --- explicit examples ---------------------------------------------------------------------


def _policy(action: str, rule: dict[str, Any]) -> list[dict[str, Any]]:
    """One policy in the workload's namespace with one rule, plus a RequestAuthentication."""
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p0", "namespace": NAMESPACE},
            "spec": {"action": action, "rules": [rule]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt0", "namespace": NAMESPACE},
            "spec": {"jwtRules": [{"issuer": IDP, "jwks": JWKS}]},
        },
    ]


def _source(**fields: list[str]) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


ALICE = {"iss": IDP, "sub": "alice"}

# The examples below are disagreements this test found, kept as minimal repros.


# --- the property -------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(docs=policy_sets(), reqs=st.lists(requests(), min_size=1, max_size=8))
# A DENY on the peer's second /ns/ segment: Istio's regex sees every occurrence.
@example(
    docs=_policy("DENY", _source(namespaces=["ns1"])),
    reqs=[Request(peer="cluster.local/ns/ns2/sa/client/ns/ns1/x")],
)
# Without a '/', Istio matches "https:*" as issuer prefix "https:" AND a non-empty subject
# (this example found extauthz letting an empty "sub" through).
@example(
    docs=_policy("ALLOW", _source(requestPrincipals=["https:*"])),
    reqs=[Request(claims={"iss": IDP, "sub": ""})],
)
# Istio turns each '*' of a namespace into '.*' inside ".*/ns/<ns>/.*", so "*a" also matches
# "ns1/sa" of every standard principal (this example found extauthz keeping '*' in a segment).
@example(
    docs=_policy("DENY", _source(namespaces=["*a"])),
    reqs=[Request(peer="cluster.local/ns/ns1/sa/client")],
)
def test_engine_agrees_with_reference(docs: list[dict[str, Any]], reqs: list[Request]) -> None:
    assert_agree(docs, reqs)
