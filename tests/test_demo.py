"""``extauthz demo``: the newcomer's scenario through real Envoys, the README's own curl
commands against a running demo, and Ctrl-C stopping every process the demo started."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extauthz.devtools import devcli
from extauthz.devtools.collector import Collector
from extauthz.devtools.demo import SCENARIO, DecisionLogReader, Player, SpanFile, evidence
from extauthz.devtools.mesh import Mesh

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_PORTS = range(devcli.DEMO_BASE_PORT, devcli.DEMO_BASE_PORT + 4)


def free_base_port() -> int:
    """Four consecutive free ports on 127.0.0.1 (other tests run beside this one)."""
    for _ in range(200):
        base = random.randrange(20000, 32000)  # below the kernel's ephemeral ports
        try:
            for port in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no 4 consecutive free ports")


def demo_argv(workdir: Path, base: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "extauthz", "demo", "--workdir", str(workdir)]
    return [*argv, "--base-port", str(base), *extra]


def test_demo_once_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        demo_argv(tmp_path, free_base_port(), "--once"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"{len(SCENARIO)}/{len(SCENARIO)} steps answered as expected" in out
    assert "BAD" not in out
    assert "denied 401 jwt_expired" in out
    assert "allowed; dry-run: would be deny by shop/freeze-orders" in out
    assert re.search(r"hot reload: \+ shop/suspend-alice.yaml .* denied 403 denied_by_policy", out)
    assert re.search(r"hot reload: original policies back .* allowed \(after", out)
    # The live policy directory is back as it was, with the dry-run policy beside the copy.
    policies = tmp_path / "policies"
    assert not (policies / "shop" / "suspend-alice.yaml").exists()
    assert (policies / "shop" / "freeze-orders.yaml").exists()
    # Every decision id the demo printed is in the files a user is told to open.
    printed = re.findall(r"decision ([0-9a-f]{32})  trace ([0-9a-f]{32})", out)
    assert len(printed) == len(SCENARIO)
    records = {
        r["decision_id"]: r
        for r in map(json.loads, (tmp_path / "decisions.jsonl").read_text().splitlines())
    }
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    traced = {
        s["attributes"]["extauthz.decision_id"]: s["trace_id"]
        for s in spans
        if s["service"] == "extauthz"
    }
    for decision_id, trace_id in printed:
        assert records[decision_id]["trace_id"] == trace_id
        assert traced[decision_id] == trace_id
    assert {s["service"] for s in spans} >= {"extauthz", "orders"}  # Envoy's too
    dry = [
        r for r in records.values() if r.get("dry_run", {}).get("policy") == "shop/freeze-orders"
    ]
    assert dry
    assert all(r["outcome"] == "OUTCOME_ALLOW" for r in dry)


def test_a_misbehaving_mesh_is_reported(tmp_path: Path) -> None:
    """The checks can fail: with an allow-everything policy every step is allowed, and a
    sink no one exports to has no span for any decision."""
    empty = tmp_path / "allow-all"
    empty.mkdir()
    (empty / "allow-all.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: allow-all, namespace: istio-system}\n"
        "spec: {action: ALLOW, rules: [{}]}\n"
    )
    lines: list[str] = []
    with Mesh(
        tmp_path / "mesh", policies=empty, workloads=("frontend", "orders", "payments")
    ) as mesh:
        log = DecisionLogReader(tmp_path / "none.jsonl")
        player = Player(mesh, log, out=lines.append, evidence_timeout=0.2, reload_timeout=2)
        failures = player.play()
        with Collector() as collector:
            spans = SpanFile(collector, tmp_path / "spans.jsonl")
            spans.start()
            try:
                missing = evidence(player, log, spans, tmp_path, timeout=0.2)
            finally:
                spans.stop()
    assert failures >= 6  # every deny step, the dry-run step (no log) and the first reload
    assert sum(line.startswith(" BAD") for line in lines) == failures
    assert missing == len(player.decisions)
    assert any("BAD: no record or span for" in line for line in lines)


@dataclass
class RunningDemo:
    proc: subprocess.Popen[str]
    workdir: Path
    base: int
    output: list[str]


def _reader(proc: subprocess.Popen[str], lines: queue.Queue[str], keep: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        keep.append(line)
        lines.put(line)


def start_demo(workdir: Path, until: str) -> RunningDemo:
    """Start ``extauthz demo`` (not --once) and wait for a line containing ``until``."""
    base = free_base_port()
    proc = subprocess.Popen(
        demo_argv(workdir, base),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    threading.Thread(target=_reader, args=(proc, lines, output), daemon=True).start()
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {until!r} line:\n" + "".join(output)) from None
            if until in line:
                return RunningDemo(proc, workdir, base, output)
            assert proc.poll() is None, "".join(output)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def running_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    demo = start_demo(tmp_path_factory.mktemp("demo"), "Press Ctrl-C")
    try:
        yield demo
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()


@dataclass(frozen=True)
class Example:
    script: str
    expected: tuple[str, ...]


def readme_examples() -> list[Example]:
    """The ```sh block of README's "The demo" that holds ``# →`` lines: each run of lines
    up to a ``# →`` line is one example, the fragments after the arrow its output."""
    section = README.read_text().split("## The demo", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    (block,) = [b for b in blocks if "# →" in b]
    examples, script = [], []
    for line in block.splitlines():
        if line.startswith("# →"):
            fragments = tuple(f.strip() for f in line[len("# →") :].split(", "))
            examples.append(Example("\n".join(script), fragments))
            script = []
        elif line.strip() and not line.startswith("#"):
            script.append(line)
    assert not script, f"README commands with no '# →' line: {script}"
    return examples


def adapt(script: str, demo: RunningDemo) -> str:
    """Only the workdir and the ports differ from the README's."""
    script = script.replace(".demo/", f"{demo.workdir}/")
    for default, port in zip(DEMO_PORTS, range(demo.base, demo.base + 4), strict=True):
        script = script.replace(f":{default}/", f":{port}/")
    return script


def test_readme_lists_examples() -> None:
    examples = readme_examples()
    assert len(examples) >= 6
    assert all(e.expected for e in examples)


def test_readme_curl_examples_work_against_the_running_demo(
    running_demo: RunningDemo, tmp_path: Path
) -> None:
    # `make test` installs curl (Debian) when it is missing: never skipped.
    assert shutil.which("curl"), "curl is not installed: run `make test`, which installs it"
    # `extauthz` as the README's reader has it after activating the venv: this checkout's.
    shim = tmp_path / "bin" / "extauthz"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m extauthz "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim.parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    for example in readme_examples():
        script = adapt(example.script, running_demo)
        assert str(devcli.DEMO_BASE_PORT) not in script
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, (script, result.stdout, result.stderr)
        for fragment in example.expected:
            assert fragment in result.stdout, (script, fragment, result.stdout)


def _descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, set()).add(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_all_stopped(started: set[int], demo: RunningDemo) -> None:
    deadline = time.monotonic() + 10
    while (left := {p for p in started if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running after the demo stopped: {left}"
    for port in range(demo.base, demo.base + 4):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
            s.bind(("127.0.0.1", port))  # nothing listens any more
            s.listen()


def test_ctrl_c_stops_everything(running_demo: RunningDemo) -> None:
    proc = running_demo.proc
    started = _descendants(proc.pid)
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in started}
    assert any("envoy" in n for n in names), names  # three sidecars
    assert len(started) >= 4, names  # and extauthz
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, "".join(running_demo.output)
    assert_all_stopped(started, running_demo)


def test_sigterm_mid_scenario_stops_everything(tmp_path: Path) -> None:
    demo = start_demo(tmp_path, "Scenario")  # the mesh is up, the steps are being played
    started = _descendants(demo.proc.pid)
    assert len(started) >= 4
    demo.proc.terminate()
    assert demo.proc.wait(timeout=30) == 130, "".join(demo.output)
    assert "Stopped." in "".join(demo.output)
    assert_all_stopped(started, demo)
