"""The benchmarks must keep running (their numbers are reported, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
