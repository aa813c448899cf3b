"""The benchmarks must keep running (their numbers are reported, never asserted)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, *args: str) -> str:
    """Run ``python -m loadtest.<module> ARGS`` from the repository root; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", f"loadtest.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_micro_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    stdout = run_benchmark("micro", "--rounds", "1", "--n", "20", "--json", str(out))
    assert "token cache hit" in stdout
    assert "verified, cache off" in stdout
    assert '"median_us"' in out.read_text()


def test_the_scale_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ("--sizes", "10,100", "--rounds", "1", "--n", "20", "--json", str(out))
    assert "µs per decision" in run_benchmark("policy_scale", *args)
    assert '"after_us"' in out.read_text()


def test_the_cel_measurement_runs() -> None:
    stdout = run_benchmark("cel_measure", "--rounds", "1", "--n", "20")
    assert "cel-expr-python" in stdout
    assert "refused" in stdout  # the compile-time checks the choice rests on


def test_the_mint_measurement_runs(tmp_path: Path) -> None:
    out = tmp_path / "mint.json"
    stdout = run_benchmark("mint_measure", "--rounds", "1", "--n", "8", "--json", str(out))
    assert "cache hit" in stdout
    assert "RS256" in stdout
    assert '"results_us"' in out.read_text()


def test_the_decision_log_measurement_runs(tmp_path: Path) -> None:
    out = tmp_path / "decision_log.json"
    stdout = run_benchmark("decision_log_measure", "--rounds", "1", "--n", "20", "--json", str(out))
    assert "record allow (queued)" in stdout
    assert "slow sink" in stdout
    assert '"results"' in out.read_text()


def test_the_tracing_cost_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "tracing.json"
    stdout = run_benchmark(
        "tracing_cost", "--rounds", "1", "--n", "64", "--settle", "0", "--json", str(out)
    )
    assert "100% sampling (always_on)" in stdout
    assert "collector down" in stdout
    assert '"cpu_us"' in out.read_text()


def test_the_envoy_benchmark_runs_every_kind_of_setup(tmp_path: Path) -> None:
    """One short round through real Envoys: native RBAC + jwt_authn, extauthz with two
    workers over gRPC and one over HTTP, the realistic workload's mTLS front Envoy; each
    setup's preflight (the request allowed, a request without the scope refused) runs
    first."""
    stdout = run_benchmark(
        "bench",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--setups",
        "none,native,extauthz-2,extauthz-http-1",
        "--workloads",
        "realistic",
        "--connections",
        "8",  # a smoke run on a busy machine: queues far below the 1 s ext_authz timeout
        "--out",
        str(tmp_path),
    )
    assert "| extauthz-2 |" in stdout
    assert "| extauthz-http-1 |" in stdout
    assert "| native |" in stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["cores"] == os.cpu_count()
    assert {"python", "envoy", "grpcio", "wrk"} <= result["versions"].keys()
    measured = {(r["setup"], r["connections"]) for r in result["rounds"]}
    setups = ("none", "native", "extauthz-2", "extauthz-http-1")
    assert measured == {(s, c) for s in setups for c in (8, 1)}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in result["rounds"])
    assert "added_p50_us" in result["summary"]["realistic"]["extauthz-2"]["c1"]
    assert result["summary"]["realistic"]["extauthz-2"]["c8"]["h2load_rps"] > 0
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_the_benchmark_workloads_state_the_same_rules_everywhere() -> None:
    """The realistic rules of loadtest/rules.json are the extauthz policy's and the Rego's."""
    from loadtest import bench_setup

    rules = bench_setup.rules()
    assert len(rules) == 20
    docs = list(yaml.safe_load_all((ROOT / "loadtest/policies/realistic/orders.yaml").read_text()))
    policy = next(d for d in docs if d["kind"] == "AuthorizationPolicy")
    in_yaml = [
        {
            "method": r["to"][0]["operation"]["methods"][0],
            "prefix": r["to"][0]["operation"]["paths"][0][:-1],
        }
        for r in policy["spec"]["rules"]
    ]
    assert in_yaml == rules
    rego = (ROOT / "loadtest/opa/realistic.rego").read_text()
    for rule in rules:
        assert f'{{"method": "{rule["method"]}", "prefix": "{rule["prefix"]}"}}' in rego
    # The identity half: the same issuer, audience, scope and SPIFFE prefix in every setup.
    caller_prefix = bench_setup.CALLER.rsplit("/sa/", 1)[0] + "/"
    for needle in (bench_setup.ISSUER, bench_setup.AUDIENCE, bench_setup.SCOPE, caller_prefix):
        assert f'"{needle}"' in rego, needle
    istio = yaml.safe_dump_all(docs)
    istio_prefix = caller_prefix.removeprefix("spiffe://") + "*"  # Istio drops spiffe://
    for needle in (bench_setup.ISSUER, bench_setup.AUDIENCE, bench_setup.SCOPE, istio_prefix):
        assert needle in istio, needle
    native_config = json.dumps(bench_setup.native_filters("realistic", "{}"))
    for needle in (bench_setup.ISSUER, bench_setup.AUDIENCE, bench_setup.SCOPE, caller_prefix):
        assert needle in native_config, needle
    native = bench_setup.native_filters("realistic", "{}")[1]["typed_config"]["rules"]["policies"]
    assert len(native) == 20


def test_the_locust_run_drives_grpc_and_http_users(tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    run_benchmark("locust_run", "--seconds", "4", "--users", "2", "--csv", str(prefix))
    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in ("Check", "GET via Envoy"):  # both users ran, and every request was allowed
        assert int(rows.get(name, {}).get("Request Count", 0)) > 0, rows
        assert rows[name]["Failure Count"] == "0", rows
