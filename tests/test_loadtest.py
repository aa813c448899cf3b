"""The benchmarks must keep running (their numbers are reported, never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_micro_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.micro", "--rounds", "1", "--n", "20", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "allow, ES256 JWT verified" in result.stdout
    assert '"median_us"' in out.read_text()
