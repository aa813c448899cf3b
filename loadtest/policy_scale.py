"""Per-decision policy time against 10, 1,000 and 10,000 rules: linear scan vs the index.

The policy sets are multi-tenant, as a large mesh's would be: per tenant an ALLOW policy with
host + method + path-prefix + principal rules (one a path template, one with a JWT-claim
condition) and a DENY on its internal paths for other namespaces, plus a few global rules of
which two the index cannot file (a ``namespaces`` source, a header condition) and so checks
on every request. Three requests per size: one allowed by the first tenant (early), one by
the last tenant (late), one that no rule allows (none).

Times ``WorkloadPolicies.evaluate`` (policy matching alone, the part that grows with the set)
for the linear scan ("before") and for the indexed engine as the server builds it ("after";
below ``index.LINEAR_BELOW`` rules that is the scan), and ``Authorizer.check`` on a
``CheckInput`` (peer identity, workload lookup, Decision) for the indexed engine.

    python -m loadtest.policy_scale [--sizes 10,1000,10000] [--rounds 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.policy.engine import PolicySet, WorkloadPolicies, _Enforcement
from extauthz.policy.model import Attributes
from extauthz.request import CheckInput

NAMESPACE = "shop"
LABELS = "app=gateway"
TRUST_DOMAIN = "cluster.local"
RULES_PER_TENANT = 6
GLOBAL_RULES = 4


def _policy(name: str, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"action": action, "rules": rules},
    }


def _tenant(t: int) -> Iterator[dict[str, Any]]:
    """Five ALLOW rules and one DENY rule for tenant ``t``."""
    host, ns, base = f"t{t}.example.com", f"{TRUST_DOMAIN}/ns/tenant-{t}/sa", f"/tenant-{t}"
    yield _policy(
        f"tenant-{t}-deny-internal",
        "DENY",
        [
            {
                "from": [{"source": {"notPrincipals": [f"{ns}/*"]}}],
                "to": [{"operation": {"paths": [f"{base}/internal/*"]}}],
            }
        ],
    )
    yield _policy(
        f"tenant-{t}",
        "ALLOW",
        [
            {
                "from": [{"source": {"principals": [f"{ns}/frontend"]}}],
                "to": [
                    {
                        "operation": {
                            "hosts": [host, f"{host}:*"],
                            "methods": ["GET", "HEAD"],
                            "paths": [f"{base}/*"],
                        }
                    }
                ],
            },
            {
                "from": [{"source": {"principals": [f"{ns}/*"]}}],
                "to": [
                    {
                        "operation": {
                            "methods": ["POST", "PUT"],
                            "paths": [f"{base}/orders/*", f"{base}/cart"],
                        }
                    }
                ],
            },
            {
                "to": [{"operation": {"paths": [f"{base}/admin/*"]}}],
                "when": [{"key": "request.auth.claims[groups]", "values": [f"admin-{t}"]}],
            },
            {
                "to": [
                    {"operation": {"hosts": [host], "paths": [f"{base}/public/{{*}}/info"]}},
                    {"operation": {"hosts": [f"static.{host}"], "methods": ["GET"]}},
                ],
            },
            {
                "from": [{"source": {"principals": [f"{TRUST_DOMAIN}/ns/partners/sa/p{t}"]}}],
                "to": [{"operation": {"methods": ["GET"], "paths": [f"{base}/catalog/*"]}}],
            },
        ],
    )


def _global() -> Iterator[dict[str, Any]]:
    yield _policy(
        "deny-debug", "DENY", [{"to": [{"operation": {"paths": ["*/debug", "*/debug/"]}}]}]
    )
    yield _policy(
        "platform",
        "ALLOW",
        [
            {"to": [{"operation": {"methods": ["GET"], "paths": ["/healthz", "/ready"]}}]},
            # Not indexable: a namespaces source and a header condition.
            {"from": [{"source": {"namespaces": ["monitoring"]}}]},
        ],
    )
    yield _policy(
        "audit-flagged",
        "AUDIT",
        [{"when": [{"key": "request.headers[x-audit]", "values": ["1"]}]}],
    )


def tenants_for(rules: int) -> int:
    if rules < GLOBAL_RULES + RULES_PER_TENANT or (rules - GLOBAL_RULES) % RULES_PER_TENANT:
        raise ValueError(f"sizes are {GLOBAL_RULES} + a multiple of {RULES_PER_TENANT} rules")
    return (rules - GLOBAL_RULES) // RULES_PER_TENANT


def write_policies(directory: Path, rules: int) -> int:
    """Write a policy set of exactly ``rules`` rules into ``directory``; returns the tenants."""
    tenants = tenants_for(rules)
    directory.mkdir(parents=True, exist_ok=True)
    docs = [*_global()]
    for t in range(tenants):
        docs.extend(_tenant(t))
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return tenants


def request(tenant: int, *, method: str = "GET", path: str = "/items/42") -> CheckInput:
    """A request from tenant ``tenant``'s frontend to its host; ``path`` below its base."""
    return CheckInput(
        method=method,
        host=f"t{tenant}.example.com",
        path=f"/tenant-{tenant}{path}",
        source_ip="10.1.2.3",
        destination_ip="10.1.2.4",
        destination_port=8443,
        source_principal=f"spiffe://{TRUST_DOMAIN}/ns/tenant-{tenant}/sa/frontend",
        headers={"user-agent": "bench", "accept": "application/json"},
        context_extensions={"namespace": NAMESPACE, "labels": LABELS},
    )


def cases(tenants: int) -> dict[str, tuple[CheckInput, bool]]:
    """name -> (request, whether it is allowed)."""
    return {
        "early": (request(0), True),
        "late": (request(tenants - 1), True),
        "none": (request(tenants + 7), False),
    }


def attributes(inp: CheckInput) -> Attributes:
    return Attributes(
        inp,
        principal=inp.source_principal.removeprefix("spiffe://"),
        token=None,
        remote_ip=inp.source_ip,
    )


def _measure(fn: Callable[[], object], n: int, rounds: int) -> dict[str, float]:
    """µs per call: the best round (the least disturbed by other processes) and the median."""
    per_call: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter_ns() - start) / n / 1000)
    return {"best": min(per_call), "median": statistics.median(per_call)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1000


def run_size(rules: int, n: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tenants = write_policies(directory, rules)
        policies, load_ms = _timed(lambda: PolicySet.load(directory))
    settings = Settings(workload_namespace=NAMESPACE, workload_labels=LABELS)
    workload, select_ms = _timed(lambda: policies.for_workload(NAMESPACE, LABELS))
    assert isinstance(workload, WorkloadPolicies)
    authz = [p for p in policies.authz if not p.dry_run]
    linear, linear_ms = _timed(lambda: _Enforcement.of(authz, indexed=False))
    indexed, index_ms = _timed(lambda: _Enforcement.of(authz, indexed=True))
    authorizer = Authorizer(policies, settings)
    index = indexed.index
    out: dict[str, Any] = {
        "rules": rules,
        "policies": len(policies.authz),
        "load_ms": load_ms,
        "select_ms": select_ms,
        "scan_build_ms": linear_ms,
        "index_build_ms": index_ms,
        "engine": "index" if workload.enforced.index is not None else "scan",
        "filed": index.stats.filed if index else {},
        "unfiled": index.stats.unfiled if index else 0,
        "cases": {},
    }
    for name, (inp, allowed) in cases(tenants).items():
        attrs = attributes(inp)
        want = linear.evaluate(attrs)
        for e in (indexed, workload.enforced):
            if e.evaluate(attrs) != want or want.allowed is not allowed:
                raise SystemExit(f"{rules} rules, {name}: the engines disagree or are wrong")
        if authorizer.check(inp).allowed is not allowed:
            raise SystemExit(f"{rules} rules, {name}: Authorizer.check answered otherwise")
        # Scanning 10,000 rules is slow: fewer calls keep the run short.
        scan_n = max(10, n * 10 // max(rules, 10)) if rules > 100 else n

        def scan(inp: CheckInput = inp) -> object:
            return linear.evaluate(attributes(inp))

        def engine(inp: CheckInput = inp) -> object:
            return workload.evaluate(attributes(inp))

        def check(inp: CheckInput = inp) -> object:
            return authorizer.check(inp)

        out["cases"][name] = {
            "before_us": _measure(scan, scan_n, rounds),
            "after_us": _measure(engine, n, rounds),
            "check_us": _measure(check, n, rounds),
            "candidates": len(index.candidates(attrs)) if index else rules,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10,1000,10000", help="rule counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [run_size(size, args.n, args.rounds) for size in sizes]

    print("load: PolicySet.load; select: first for_workload (builds the engine the server uses)")
    print(
        f"{'rules':>6} {'policies':>8} {'load ms':>9} {'select ms':>9} {'index ms':>9} "
        f"{'engine':>6} {'unfiled':>7}  filed"
    )
    for r in results:
        print(
            f"{r['rules']:>6} {r['policies']:>8} {r['load_ms']:>9.1f} {r['select_ms']:>9.1f} "
            f"{r['index_build_ms']:>9.1f} {r['engine']:>6} {r['unfiled']:>7}  {r['filed']}"
        )
    print()
    print("µs per decision; before = linear scan, after = as the server runs it (indexed),")
    print("check = Authorizer.check, indexed; ratio = to the same case at the first size")
    print(
        f"{'rules':>6} {'case':<6} {'before':>9} {'after':>8} {'ratio':>6} "
        f"{'check':>8} {'ratio':>6} {'candidates':>10}"
    )
    base = results[0]["cases"]
    worst = 0.0
    for r in results:
        for name, c in r["cases"].items():
            before, after, check = (c[k]["best"] for k in ("before_us", "after_us", "check_us"))
            ratio = after / base[name]["after_us"]["best"]
            worst = max(worst, ratio)
            print(
                f"{r['rules']:>6} {name:<6} {before:>9.1f} {after:>8.1f} {ratio:>6.2f} "
                f"{check:>8.1f} {check / base[name]['check_us']['best']:>6.2f} "
                f"{c['candidates']:>10}"
            )
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"(best of {args.rounds} rounds x {args.n} calls; {machine})")
    target = "met" if worst <= 3 else "NOT met"
    print(f"largest after-ratio to {results[0]['rules']} rules: {worst:.2f} (target 3x: {target})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
