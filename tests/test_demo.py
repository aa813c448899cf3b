"""``extauthz demo --once``: the newcomer's scenario must pass through real Envoys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extauthz.devtools.demo import SCENARIO


def test_demo_once_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extauthz", "demo", "--once", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(SCENARIO)}/{len(SCENARIO)} steps answered as expected" in result.stdout
    assert "BAD" not in result.stdout
    assert "denied 403 no_allow_policy_matched" in result.stdout
    assert "denied 401 jwt_expired" in result.stdout
