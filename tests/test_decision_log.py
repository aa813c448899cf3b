"""The decision log: the generated code's drift."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed"
)
def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """The checked-in modules are what `make protos` makes of protos/ (no hand edits)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "extauthz/decisionlog/v1/decision_log.proto",
        ],
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    out = tmp_path / "extauthz/decisionlog/v1"
    assert sorted(p.name for p in out.iterdir()) == ["decision_log_pb2.py", "decision_log_pb2.pyi"]
    for name in ("decision_log_pb2.py", "decision_log_pb2.pyi"):
        assert filecmp.cmp(out / name, ROOT / "extauthz/decisionlog/v1" / name, shallow=False), (
            f"extauthz/decisionlog/v1/{name} is stale or hand-edited: run `make protos`"
        )
