"""The rule index only prunes: with it, every decision is the one a linear scan makes.

Each policy set is written as YAML and loaded with ``PolicySet.load``; every request of a grid
(peers, hosts in different case and with ports, methods, paths) is then decided three ways:
by the indexed engine, by the engine forced to scan, and by a reference that walks the
policies with nothing but ``AuthorizationPolicy.first_match``. Decision, reason, policy, rule
and AUDIT list must agree, and no rule that matches may be missing from the candidates.
"""

from __future__ import annotations

import importlib.util
import itertools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.policy.engine import PolicySet, Verdict, _Enforcement
from extauthz.policy.model import Action, Attributes, AuthorizationPolicy
from extauthz.request import CheckInput

ROOT = Path(__file__).resolve().parents[1]


def _benchmark() -> ModuleType:
    """loadtest/policy_scale.py, whether or not the repository root is on sys.path."""
    spec = importlib.util.spec_from_file_location("policy_scale", ROOT / "loadtest/policy_scale.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


policy_scale = _benchmark()
CLIENT = "cluster.local/ns/ns2/sa/client"
ADMIN = "cluster.local/ns/ns2/sa/admin"
OTHER = "cluster.local/ns/ns3/sa/client"

Doc = dict[str, Any]


def policy(
    name: str,
    action: str,
    rules: Sequence[Mapping[str, Any]] | None,
    *,
    namespace: str = "ns1",
    selector: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    api: str = "security.istio.io/v1",
    **extra: Any,
) -> Doc:
    meta: Doc = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: Doc = {"action": action, **extra}
    if rules is not None:
        spec["rules"] = list(rules)
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    return {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def src(*entries: Mapping[str, list[str]]) -> Doc:
    return {"from": [{"source": dict(e)} for e in entries]}


def to(*entries: Mapping[str, list[str]]) -> Doc:
    return {"to": [{"operation": dict(e)} for e in entries]}


def when(key: str, **values: list[str]) -> Doc:
    return {"when": [{"key": key, **values}]}


def rule(*parts: Doc) -> Doc:
    out: Doc = {}
    for part in parts:
        for key, value in part.items():
            out[key] = [*out.get(key, []), *value] if key in ("from", "to", "when") else value
    return out


def load(directory: Path, docs: Sequence[Doc]) -> PolicySet:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return PolicySet.load(directory)


def applying(ps: PolicySet) -> list[AuthorizationPolicy]:
    """The policies of workload ns1 / app=a, dry-run ones included."""
    workload = ps.for_workload("ns1", "app=a")
    engine = workload.shadow or workload.enforced
    return [*engine.deny, *engine.allow, *engine.audit]


def attrs(
    principal: str | None,
    host: str,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
) -> Attributes:
    inp = CheckInput(
        method=method,
        host=host,
        path=path,
        headers=dict(headers or {}),
        source_ip="10.1.2.3",
        destination_ip="10.9.9.9",
        destination_port=8080,
    )
    return Attributes(inp, principal=principal, token=None, remote_ip="10.1.2.3")


Outcome = tuple[bool, str, str, str, tuple[str, ...]]


def reference(policies: Sequence[AuthorizationPolicy], a: Attributes) -> Outcome:
    """Istio's order, by walking every rule of every policy."""

    def of(action: Action) -> list[AuthorizationPolicy]:
        return [p for p in policies if p.action is action]

    audit = tuple(p.key for p in of(Action.AUDIT) if p.first_match(a) is not None)
    for p in of(Action.DENY):
        hit = p.first_match(a)
        if hit is not None:
            return False, "denied_by_policy", p.key, hit.name, audit
    if not of(Action.ALLOW):
        return True, "no_allow_policy", "", "", audit
    for p in of(Action.ALLOW):
        hit = p.first_match(a)
        if hit is not None:
            return True, "allowed_by_policy", p.key, hit.name, audit
    return False, "no_allow_policy_matched", "", "", audit


def outcome(v: Verdict) -> Outcome:
    return v.allowed, v.reason, v.policy, v.rule, v.audit


PRINCIPALS = [None, CLIENT, ADMIN, OTHER, "legacy.corp", ""]
HOSTS = ["example.com", "EXAMPLE.com", "example.com:8080", "Example.COM:443", "api.example.com"]
HOSTS += ["API.Example.Com:8443", "other.org", ""]
METHODS = ["GET", "get", "POST", "DELETE"]
PATHS = ["/", "", "/api", "/api/", "/api/v1/items", "/api/v2/items/7", "/admin", "/admin/users"]
PATHS += ["/static/app.js", "/public/x/info", "/public/x/y/info", "/debug", "/x/debug", "/healthz"]


def grid() -> list[Attributes]:
    out = []
    for i, (principal, host, method, path) in enumerate(
        itertools.product(PRINCIPALS, HOSTS, METHODS, PATHS)
    ):
        headers = {"x-flag": "on"} if i % 3 == 0 else {}
        out.append(attrs(principal, host, method, path, headers))
    return out


GRID = grid()

# id -> policy documents; every set mixes rules the index files with rules it cannot.
SETS: dict[str, list[Doc]] = {
    "principals": [
        policy(
            "allow",
            "ALLOW",
            [
                src({"principals": [OTHER]}),
                src({"principals": ["cluster.local/ns/ns2/*"]}),
                src({"principals": ["*/sa/admin"]}),
                src({"principals": ["legacy.corp", "*"]}),
                src({"principals": [""]}),
            ],
        ),
        policy("deny", "DENY", [src({"principals": [ADMIN]}), src({"principals": ["legacy*"]})]),
    ],
    "hosts-case-and-ports": [
        policy(
            "allow",
            "ALLOW",
            [
                to({"hosts": ["Example.COM"]}),
                to({"hosts": ["EXAMPLE.com:*"], "methods": ["POST"]}),
                to({"hosts": ["api.EXAMPLE.com:8443"]}),
                to({"hosts": ["*.org"]}),
                to({"hosts": ["*"], "paths": ["/healthz"]}),
                to({"hosts": ["Api.*"], "methods": ["DELETE"]}),
            ],
        ),
        policy("deny", "DENY", [to({"hosts": ["EXAMPLE.COM:8080"], "paths": ["/admin*"]})]),
    ],
    "methods": [
        policy(
            "allow",
            "ALLOW",
            [
                to({"methods": ["get"]}),
                to({"methods": ["PO*"], "paths": ["/api/*"]}),
                to({"methods": ["*"], "paths": ["/healthz"]}),
                to({"methods": ["GET"], "paths": ["/static/*"]}),
                to({"notMethods": ["GET", "POST"]}),
            ],
        ),
        policy("deny", "DENY", [to({"methods": ["DELETE"], "paths": ["/admin*"]})]),
    ],
    "paths": [
        policy(
            "deny",
            "DENY",
            [to({"paths": ["*/debug"]}), to({"paths": ["/admin/*"], "notMethods": ["GET"]})],
        ),
        policy(
            "allow",
            "ALLOW",
            [
                to({"paths": ["/api"]}),
                to({"paths": ["/api/v1/*"], "methods": ["GET"]}),
                to({"paths": ["/api/*"], "methods": ["POST"]}),
                to({"paths": ["*.js"]}),
                to({"paths": ["/public/{*}/info"]}),
                to({"paths": ["/api/{**}"], "methods": ["DELETE"]}),
                to({"paths": ["/{**}"], "methods": ["get"]}),
                to({"paths": [""]}),
                to({"paths": ["*"], "methods": ["DELETE"]}),
                to({"notPaths": ["/api*", "/admin*", "/"]}),
            ],
        ),
    ],
    "entries-where-one-lacks-the-dimension": [
        policy(
            "allow",
            "ALLOW",
            [
                # Two operations, only one with paths: not filed under paths (under methods? no).
                to({"paths": ["/api/v1/*"]}, {"methods": ["DELETE"]}),
                # Two sources, only one with principals: not filed under principals.
                src({"principals": [CLIENT]}, {"namespaces": ["ns3"]}),
                # Both operations have paths: filed under the union.
                to({"paths": ["/admin"]}, {"paths": ["/static/*"], "methods": ["GET"]}),
                # Both sources have principals, one a prefix.
                src({"principals": [ADMIN]}, {"principals": ["legacy*"]}),
                # One operation's paths are negated.
                to({"paths": ["/x/*"]}, {"notPaths": ["/api/*"]}),
            ],
        ),
    ],
    "not-forms": [
        policy(
            "deny",
            "DENY",
            [
                src({"notPrincipals": [CLIENT, ADMIN]}),
                to({"notHosts": ["example.com", "example.com:*"]}),
            ],
        ),
        policy(
            "allow",
            "ALLOW",
            [
                rule(src({"principals": [CLIENT]}), to({"notPaths": ["/admin*"]})),
                to({"notMethods": ["GET"], "paths": ["/api/*"]}),
                src({"principals": [ADMIN], "notPrincipals": [ADMIN]}),
            ],
        ),
    ],
    "when-conditions": [
        policy(
            "allow",
            "ALLOW",
            [
                rule(to({"paths": ["/api/*"]}), when("source.principal", values=[CLIENT])),
                when("source.principal", values=["cluster.local/ns/ns2/*"], notValues=[CLIENT]),
                when("source.principal", notValues=[ADMIN]),
                rule(when("request.headers[x-flag]", values=["on"]), to({"methods": ["GET"]})),
                when("source.principal", values=["*"]),
            ],
        ),
        policy("deny", "DENY", [when("request.headers[x-flag]", values=["on"])]),
    ],
    "first-match-order": [
        policy(
            "first",
            "ALLOW",
            [
                to({"paths": ["/api/v1/*"]}),
                {},  # matches everything: filed nowhere
                src({"principals": [CLIENT]}),
            ],
        ),
        policy(
            "second",
            "ALLOW",
            [to({"hosts": ["example.com"]}), src({"principals": [CLIENT]})],
        ),
        policy("third", "ALLOW", [src({"principals": [CLIENT]}), to({"methods": ["GET"]})]),
    ],
    "deny-and-allow-overlap": [
        policy("d1", "DENY", [to({"paths": ["/admin/*"]}), src({"principals": [OTHER]})]),
        policy(
            "d2",
            "DENY",
            [rule(src({"principals": ["cluster.local/ns/ns2/*"]}), to({"methods": ["DELETE"]}))],
        ),
        policy("a1", "ALLOW", [src({"principals": [CLIENT, ADMIN]})]),
        policy("a2", "ALLOW", [to({"paths": ["/api/*", "/admin/*"]})]),
        policy("a3", "ALLOW", [to({"hosts": ["other.org"]}), {}]),
    ],
    "audit": [
        policy("audit-1", "AUDIT", [to({"paths": ["/api/*"]}), src({"principals": [CLIENT]})]),
        policy("audit-2", "AUDIT", [when("request.headers[x-flag]", values=["on"])]),
        policy("audit-3", "AUDIT", [to({"hosts": ["example.com"]}), to({"methods": ["GET"]})]),
        policy("audit-4", "AUDIT", [to({"paths": ["/nothing"]})]),
        policy("allow", "ALLOW", [to({"methods": ["GET"]}), src({"principals": [ADMIN]})]),
        policy("deny", "DENY", [to({"paths": ["/admin/*"]})]),
    ],
    "allow-policy-without-rules": [
        policy("nothing", "ALLOW", None),
        policy("deny", "DENY", [to({"paths": ["/admin*"]}), src({"principals": [OTHER]})]),
        policy("some", "ALLOW", [to({"paths": ["/api/*"]}), to({"hosts": ["other.org"]})]),
    ],
    "deny-only": [
        policy("deny", "DENY", [to({"paths": ["/admin*"]}), src({"principals": ["legacy.corp"]})]),
        policy("deny-2", "DENY", [to({"methods": ["DELETE"]}), to({"hosts": ["*.org"]})]),
    ],
    "other-workloads-and-namespaces": [
        policy("b-only", "DENY", [{}], selector={"app": "b"}),
        policy("ns2", "DENY", [{}], namespace="ns2"),
        policy("a-only", "ALLOW", [to({"paths": ["/api/*"]}), {}], selector={"app": "a"}),
        policy("root", "DENY", [to({"paths": ["/debug"]})], namespace="istio-system"),
    ],
    "every-dimension-in-one-rule": [
        policy(
            "allow",
            "ALLOW",
            [
                rule(
                    src({"principals": [CLIENT]}),
                    to({"hosts": ["example.com"], "methods": ["GET"], "paths": ["/api/*"]}),
                ),
                rule(
                    src({"principals": ["cluster.local/*"]}),
                    to({"hosts": ["api.example.com:*"], "methods": ["POST"], "paths": ["/api"]}),
                ),
                rule(src({"principals": [ADMIN]}), to({"methods": ["DELETE"]})),
            ]
            + [to({"methods": ["GET"], "paths": [f"/t{i}/*"]}) for i in range(20)],
        ),
    ],
    "extensions": [
        policy(
            "quota",
            "DENY",
            [to({"paths": ["/admin/*"]}), src({"principals": [OTHER]})],
            api="extauthz.io/v1alpha1",
            denyResponse={"status": 429, "body": "slow down"},
        ),
        policy(
            "login",
            "ALLOW",
            [
                {**to({"paths": ["/api/*"]}), "headers": {"x-tier": "api"}},
                {**src({"principals": [CLIENT]}), "headers": {"x-tier": "client"}},
            ],
            api="extauthz.io/v1alpha1",
            denyResponse={"status": 302, "headers": {"location": "https://login.test/"}},
        ),
    ],
}


@pytest.mark.parametrize("name", SETS)
def test_the_index_decides_every_request_as_a_linear_scan(tmp_path: Path, name: str) -> None:
    ps = load(tmp_path, SETS[name])
    policies = applying(ps)
    workload = ps.for_workload("ns1", "app=a")
    indexed = _Enforcement.of(policies, indexed=True)
    scan = _Enforcement.of(policies, indexed=False)
    assert indexed.index is not None
    assert scan.index is None
    index = indexed.index
    for a in GRID:
        want = reference(policies, a)
        got = indexed.evaluate(a)
        assert outcome(got) == want, (a.principal, a.inp)
        assert got == scan.evaluate(a)  # headers and deny_response too
        assert outcome(workload.evaluate(a)) == want
        candidates = set(index.candidates(a))
        for seq, (_, r) in enumerate(index.entries):
            if seq not in candidates:
                assert not r.matches(a), (seq, a.principal, a.inp)


def test_the_sets_exercise_both_filed_and_unfiled_rules(tmp_path: Path) -> None:
    filed: dict[str, int] = {}
    unfiled = 0
    for i, docs in enumerate(SETS.values()):
        index = _Enforcement.of(applying(load(tmp_path / str(i), docs)), indexed=True).index
        assert index is not None
        for dim, n in index.stats.filed.items():
            filed[dim] = filed.get(dim, 0) + n
        unfiled += index.stats.unfiled
    assert all(n > 0 for n in filed.values()), filed
    assert unfiled > 0


def test_dry_run_shadow_verdicts_are_unchanged(tmp_path: Path) -> None:
    dry = {"istio.io/dry-run": "true"}
    docs = [
        policy("dry-deny", "DENY", [to({"paths": ["/api/*"]}), {}], annotations=dry),
        policy("allow", "ALLOW", [src({"principals": [CLIENT]}), to({"methods": ["GET"]})]),
        policy("dry-allow", "ALLOW", [to({"hosts": ["other.org"]})], annotations=dry),
    ]
    ps = load(tmp_path, docs)
    workload = ps.for_workload("ns1", "app=a")
    assert workload.shadow is not None
    assert workload.shadow.index is not None
    everything = applying(ps)
    enforced = [p for p in everything if not p.dry_run]
    for a in GRID:
        verdict = workload.evaluate(a)
        assert outcome(verdict) == reference(enforced, a)
        assert verdict.dry_run is not None
        assert outcome(verdict.dry_run) == reference(everything, a)


def test_a_single_rule_is_scanned_and_a_set_of_unfiled_rules_is_not_indexed(
    tmp_path: Path,
) -> None:
    one = _Enforcement.of(applying(load(tmp_path / "one", [policy("p", "ALLOW", [{}])])))
    assert one.index is None
    unfiled = [policy("p", "ALLOW", [src({"notPrincipals": [CLIENT]}), to({"paths": ["*"]})])]
    assert _Enforcement.of(applying(load(tmp_path / "unfiled", unfiled))).index is None
    filed = [policy("p", "ALLOW", [src({"principals": [CLIENT]}), to({"paths": ["*"]})])]
    assert _Enforcement.of(applying(load(tmp_path / "filed", filed))).index is not None


def test_a_rule_is_filed_where_its_keys_are_rarest(tmp_path: Path) -> None:
    # Every rule says GET; each has its own path: filed under paths, not methods.
    docs = [
        policy("p", "ALLOW", [to({"methods": ["GET"], "paths": [f"/t{i}/*"]}) for i in range(50)])
    ]
    index = _Enforcement.of(applying(load(tmp_path, docs)), indexed=True).index
    assert index is not None
    assert index.stats.filed["path"] == 50
    assert list(index.candidates(attrs(CLIENT, "h", "GET", "/t7/x"))) == [7]
    assert list(index.candidates(attrs(CLIENT, "h", "GET", "/t77/x"))) == []


def test_candidates_fold_hosts_but_not_methods(tmp_path: Path) -> None:
    docs = [
        policy(
            "p",
            "ALLOW",
            [
                to({"methods": ["get"]}),
                to({"methods": ["GET"]}),
                to({"hosts": ["Example.COM"]}),
                to({"hosts": ["example.com:*"]}),
                to({"hosts": ["*.Example.com"]}),
            ],
        )
    ]
    index = _Enforcement.of(applying(load(tmp_path, docs)), indexed=True).index
    assert index is not None
    assert list(index.candidates(attrs(None, "x", "GET", "/"))) == [1]
    assert list(index.candidates(attrs(None, "x", "get", "/"))) == [0]
    assert list(index.candidates(attrs(None, "EXAMPLE.com", "PUT", "/"))) == [2]
    assert list(index.candidates(attrs(None, "EXAMPLE.com:80", "PUT", "/"))) == [3]
    assert list(index.candidates(attrs(None, "API.EXAMPLE.COM", "PUT", "/"))) == [4]
    assert list(index.candidates(attrs(None, "example.org", "PUT", "/"))) == []


def test_deeply_nested_prefixes_and_suffixes(tmp_path: Path) -> None:
    deep = 1100  # deeper than Python's recursion limit (1000)
    docs = [
        policy(
            "p",
            "ALLOW",
            [
                to({"paths": [f"/{'a' * i}*" for i in range(1, deep)]}),
                to({"paths": [f"*{'b' * i}.js" for i in range(1, deep)]}),
            ],
        )
    ]
    index = _Enforcement.of(applying(load(tmp_path, docs)), indexed=True).index
    assert index is not None
    assert list(index.candidates(attrs(None, "h", "GET", "/" + "a" * 2000))) == [0]
    assert list(index.candidates(attrs(None, "h", "GET", "/aab" + "b" * 2000 + ".js"))) == [0, 1]
    assert list(index.candidates(attrs(None, "h", "GET", "/b.js"))) == [1]
    assert list(index.candidates(attrs(None, "h", "GET", "/c"))) == []


def test_ten_thousand_rules_leave_a_handful_of_candidates(tmp_path: Path) -> None:
    tenants = policy_scale.write_policies(tmp_path, 10_000)
    ps = PolicySet.load(tmp_path)
    workload = ps.for_workload(policy_scale.NAMESPACE, policy_scale.LABELS)
    index = workload.enforced.index
    assert index is not None
    assert index.stats.rules == 10_000
    assert index.stats.unfiled <= 2  # the namespaces source and the header condition
    scan = _Enforcement.of([p for p in ps.authz if not p.dry_run], indexed=False)
    for name, (inp, allowed) in policy_scale.cases(tenants).items():
        a = policy_scale.attributes(inp)
        assert len(index.candidates(a)) <= 8, name
        verdict = workload.evaluate(a)
        assert verdict.allowed is allowed
        assert verdict == scan.evaluate(a)
    # A request for tenant 1234's admin path with the wrong principal: still only a few.
    a = policy_scale.attributes(policy_scale.request(1234, method="DELETE", path="/admin/x"))
    assert len(index.candidates(a)) <= 8


# --- property: random policy sets from a small vocabulary ---------------------------------

_VALUES = {
    "principals": [CLIENT, ADMIN, "cluster.local/ns/ns2/*", "*/admin", "legacy.corp", "*"],
    "hosts": ["example.com", "EXAMPLE.com:*", "Api.example.com", "*.org", "*", "api.*"],
    "methods": ["GET", "POST", "get", "DEL*", "*"],
    "paths": ["/api", "/api/*", "/api/v1/*", "*.js", "/public/{*}/info", "/{**}", "*", ""],
}
_FIELD_NAMES = [*_VALUES, *(f"not{f[0].upper()}{f[1:]}" for f in _VALUES)]


def _values(field: str) -> st.SearchStrategy[list[str]]:
    base = field[3].lower() + field[4:] if field.startswith("not") else field
    return st.lists(st.sampled_from(_VALUES[base]), min_size=1, max_size=3, unique=True)


_ENTRY = st.dictionaries(st.sampled_from(_FIELD_NAMES), st.none(), min_size=1, max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: _values(k) for k in d})
)


def _split(entry: dict[str, list[str]]) -> Doc:
    """Source fields into one ``from`` entry, operation fields into one ``to`` entry."""
    source = {k: v for k, v in entry.items() if "rincipals" in k}
    operation = {k: v for k, v in entry.items() if "rincipals" not in k}
    out: Doc = {}
    if source:
        out["from"] = [{"source": source}]
    if operation:
        out["to"] = [{"operation": operation}]
    return out


_RULE = st.lists(_ENTRY, min_size=0, max_size=2).map(
    lambda entries: rule(*map(_split, entries)) if entries else {}
)
_POLICY = st.tuples(st.sampled_from(["ALLOW", "DENY", "AUDIT"]), st.lists(_RULE, max_size=4))
_REQUEST = st.tuples(
    st.sampled_from(PRINCIPALS),
    st.sampled_from(HOSTS),
    st.sampled_from(METHODS),
    st.sampled_from(PATHS),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_POLICY, min_size=1, max_size=5), st.lists(_REQUEST, min_size=1, max_size=30))
def test_random_policy_sets_decide_as_a_linear_scan(
    policies: list[tuple[str, list[Doc]]], requests: list[tuple[Any, ...]]
) -> None:
    docs = [policy(f"p{i}", action, rules) for i, (action, rules) in enumerate(policies)]
    with tempfile.TemporaryDirectory() as tmp:
        ps = load(Path(tmp), docs)
    active = applying(ps)
    indexed = _Enforcement.of(active, indexed=True)
    scan = _Enforcement.of(active, indexed=False)
    for principal, host, method, path in requests:
        a = attrs(principal, host, method, path)
        assert outcome(indexed.evaluate(a)) == reference(active, a)
        assert indexed.evaluate(a) == scan.evaluate(a)
