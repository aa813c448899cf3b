"""``extauthz serve --workers N``: addressing, the supervisor, and a real Envoy balancing checks
across the workers (envoy/workers.yaml)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from extauthz.config import Settings
from extauthz.decisionlog.settings import DecisionLogSettings
from extauthz.devtools.envoy import EnvoyProcess, free_port, free_ports, render_workers, validate
from extauthz.devtools.mesh import wait_serving
from extauthz.devtools.upstream import EchoServer
from extauthz.errors import ConfigError
from extauthz.workers import check_plan, for_worker, numbered

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "envoy" / "workers.yaml"

GET_ONLY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only, namespace: istio-system}}
spec:
  action: ALLOW
  rules: [{{to: [{{operation: {{methods: [{methods}]}}}}]}}]
"""


def test_worker_addresses_are_numbered_ports_and_sockets() -> None:
    assert [numbered("127.0.0.1:9191", i, "--listen") for i in range(3)] == [
        "127.0.0.1:9191",
        "127.0.0.1:9192",
        "127.0.0.1:9193",
    ]
    assert numbered("[::1]:9191", 1, "--listen") == "[::1]:9192"
    assert numbered("unix:/run/extauthz.sock", 1, "--listen") == "unix:/run/extauthz-1.sock"
    with pytest.raises(ConfigError, match=r"--listen 127.0.0.1:0: --workers needs a fixed port"):
        numbered("127.0.0.1:0", 1, "--listen")
    with pytest.raises(ConfigError, match=r"--metrics-listen .*worker 1 would need port 65536"):
        numbered("127.0.0.1:65535", 1, "--metrics-listen")


def test_each_worker_gets_its_listeners_and_decision_log_and_only_one_serves_jwks() -> None:
    settings = Settings(
        listen="127.0.0.1:9191",
        metrics_listen="127.0.0.1:9300",
        admin_listen="unix:/run/admin.sock",
        jwks_listen="127.0.0.1:9400",
        decision_log=DecisionLogSettings(path="/var/log/decisions.jsonl"),
    )
    first, second = check_plan(settings, 2)
    assert (first.listen, second.listen) == ("127.0.0.1:9191", "127.0.0.1:9192")
    assert (first.metrics_listen, second.metrics_listen) == ("127.0.0.1:9300", "127.0.0.1:9301")
    assert second.admin_listen == "unix:/run/admin-1.sock"
    assert (first.jwks_listen, second.jwks_listen) == ("127.0.0.1:9400", None)
    assert first.decision_log is not None
    assert second.decision_log is not None
    assert first.decision_log.path == "/var/log/decisions-0.jsonl"
    assert second.decision_log.path == "/var/log/decisions-1.jsonl"


def test_plans_that_would_collide_or_share_stdout_are_refused() -> None:
    overlapping = Settings(listen="127.0.0.1:9191", metrics_listen="0.0.0.0:9192")
    with pytest.raises(
        ConfigError,
        match=r"--listen of worker 1 is 127.0.0.1:9192, which --metrics-listen of worker 0 already",
    ):
        check_plan(overlapping, 2)
    stdout_log = Settings(decision_log=DecisionLogSettings(path="-"))
    with pytest.raises(ConfigError, match=r"--decision-log -: with --workers"):
        for_worker(stdout_log, 0, 2)


def test_cli_refuses_zero_workers_and_a_worker_that_cannot_bind() -> None:
    bad = _extauthz("serve", "--workers", "0")
    assert bad.returncode == 2
    assert "--workers: expected a number of workers >= 1, got '0'" in bad.stderr
    port = free_ports(2)
    with socket.socket() as taken:  # worker 1's port is in use: the supervisor must fail
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        result = _extauthz("serve", "--workers", "2", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port + 1}: cannot bind" in result.stderr
    assert "worker 1 on" in result.stderr
    assert "before serving: stopping" in result.stderr


def _start_unix_workers(tmp_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extauthz",
                "serve",
                "--workers",
                "2",
                "--listen",
                f"unix:{tmp_path / 'x.sock'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
        )


def test_workers_on_numbered_unix_sockets_serve_and_stop_with_exit_0(tmp_path: Path) -> None:
    log_path = tmp_path / "extauthz.log"
    proc = _start_unix_workers(tmp_path, log_path)
    try:
        for i in (0, 1):
            wait_serving(f"unix:{tmp_path / f'x-{i}.sock'}", proc, log_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        _stop(proc)
    assert not (tmp_path / "x.sock").exists()  # only the numbered ones were ever bound


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_workers_start_is_a_clean_exit(tmp_path: Path, sig: int) -> None:
    """The signal reaches workers that have not yet installed their handlers (blocked until
    then): they stop as they would once serving, and the supervisor exits 0."""
    log_path = tmp_path / "extauthz.log"
    proc = _start_unix_workers(tmp_path, log_path)
    try:
        _wait(lambda: "worker 1 (pid" in log_path.read_text(), "worker 1 spawned")
        assert "workers serving" not in log_path.read_text()  # still starting
        proc.send_signal(sig)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        _stop(proc)
    text = log_path.read_text()
    assert "exited with status" not in text, text
    assert "workers serving" not in text


def test_a_reload_while_a_worker_restarts_does_not_kill_it(tmp_path: Path) -> None:
    log_path = tmp_path / "extauthz.log"
    proc = _start_unix_workers(tmp_path, log_path)
    try:
        for i in (0, 1):
            wait_serving(f"unix:{tmp_path / f'x-{i}.sock'}", proc, log_path)
        _wait(lambda: "workers serving" in log_path.read_text(), "serving")
        (first,) = re.findall(r"worker 1 \(pid (\d+)\) starting", log_path.read_text())
        os.kill(int(first), signal.SIGKILL)
        _wait(
            lambda: len(re.findall(r"worker 1 \(pid \d+\) starting", log_path.read_text())) == 2,
            "worker 1 respawned",
        )
        proc.send_signal(signal.SIGHUP)  # most likely before the new worker serves
        wait_serving(f"unix:{tmp_path / 'x-1.sock'}", proc, log_path)
        time.sleep(0.5)  # time for a wrongly killed worker to be reported
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        _stop(proc)
    exits = re.findall(r"worker \d \(pid \d+\) exited with status (-?\d+)", log_path.read_text())
    assert exits == [str(-signal.SIGKILL)], log_path.read_text()


def test_an_env_prometheus_port_is_checked_and_numbered() -> None:
    settings = Settings(listen="127.0.0.1:9463")
    with pytest.raises(ConfigError, match=r"OTEL_EXPORTER_PROMETHEUS_PORT='abc': expected a port"):
        check_plan(settings, 2, {"OTEL_EXPORTER_PROMETHEUS_PORT": "abc"})
    with pytest.raises(ConfigError, match=r"127.0.0.1:9464, which OTEL_EXPORTER_PROMETHEUS_PORT"):
        check_plan(settings, 2, {"OTEL_METRICS_EXPORTER": "prometheus"})  # 9464 + i
    assert len(check_plan(settings, 2, {"OTEL_EXPORTER_PROMETHEUS_PORT": "9500"})) == 2


def test_the_shipped_workers_config_validates(tmp_path: Path) -> None:
    validate(TEMPLATE)


@dataclass
class Workers:
    """A supervisor with two workers behind a real Envoy (envoy/workers.yaml)."""

    proc: subprocess.Popen[bytes]
    port: int
    envoy: EnvoyProcess
    listen_port: int
    decision_logs: list[Path]
    policy: Path
    log: Path

    def call(self, method: str = "GET") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.listen_port, timeout=5)
        try:
            conn.request(method, "/hello")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def decisions(self) -> list[int]:
        """Decisions recorded per worker (each writes its own decision log)."""
        return [len(p.read_text().splitlines()) if p.exists() else 0 for p in self.decision_logs]

    def pids(self) -> dict[int, int]:
        """Worker index -> pid, from the supervisor's children's command lines."""
        found = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        for pid in children.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"--worker-index" in argv:
                found[int(argv[argv.index(b"--worker-index") + 1])] = int(pid)
        return found

    def healthy(self) -> list[bool]:
        text = self.envoy.admin_get("/clusters")
        return [
            f"extauthz::127.0.0.1:{self.port + i}::health_flags::healthy" in text for i in (0, 1)
        ]

    def diagnosis(self) -> str:
        stats = self.envoy.admin_get("/stats?filter=cluster.extauthz.upstream_")
        return f"{self.log.read_text()[-3000:]}\n{self.envoy.log_tail()}\n{stats}"


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "only.yaml"
    policy.write_text(GET_ONLY.format(methods="GET"))
    port = free_ports(2)
    log_path = tmp_path / "extauthz.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extauthz",
                "serve",
                "--workers",
                "2",
                "--listen",
                f"127.0.0.1:{port}",
                "--policies",
                str(policies),
                "--reload-interval",
                "0",  # SIGHUP only: the test decides when the workers reload
                "--decision-log",
                str(tmp_path / "decisions.jsonl"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
        )
    upstream = EchoServer("upstream").start()
    listen, admin = free_port(), free_port()
    config = render_workers(
        TEMPLATE,
        listen_port=listen,
        admin_port=admin,
        extauthz_addresses=[f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"],
        upstream_port=upstream.port,
    )
    envoy = EnvoyProcess(config, workdir=tmp_path, admin_port=admin)
    try:
        for i in (0, 1):
            wait_serving(f"127.0.0.1:{port + i}", proc, log_path)
        envoy.start()
        yield Workers(
            proc,
            port,
            envoy,
            listen,
            [tmp_path / f"decisions-{i}.jsonl" for i in (0, 1)],
            policy,
            log_path,
        )
    finally:
        envoy.stop()
        upstream.stop()
        if proc.poll() is None:
            proc.kill()  # the workers die with it (PR_SET_PDEATHSIG)
            proc.wait()


def test_envoy_balances_checks_across_workers_that_restart_reload_and_stop(
    workers: Workers,
) -> None:
    w = workers
    _wait(lambda: all(w.healthy()), "both workers healthy in Envoy")
    n = 60
    assert [w.call() for _ in range(n)] == [200] * n, w.diagnosis()
    assert w.call("POST") == 403
    _wait(lambda: sum(w.decisions()) == n + 1, "every decision logged")
    per_worker = w.decisions()
    print(f"\ndecisions per worker: {per_worker}")
    assert min(per_worker) >= n // 4, per_worker  # least request over two endpoints

    # A worker that dies is restarted on its address, and Envoy sends it checks again.
    pids = w.pids()
    os.kill(pids[1], signal.SIGKILL)
    _wait(lambda: w.pids().get(1, pids[1]) != pids[1], "worker 1 restarted")
    wait_serving(f"127.0.0.1:{w.port + 1}", w.proc, w.log)
    _wait(lambda: all(w.healthy()), "the restarted worker healthy again")
    before = w.decisions()
    for _ in range(n):
        assert w.call() == 200, w.diagnosis()
    _wait(lambda: sum(w.decisions()) == sum(before) + n, "every decision logged")
    assert w.decisions()[1] - before[1] >= n // 4, (before, w.decisions())
    assert w.pids()[0] == pids[0]  # the other worker was left alone

    # SIGHUP reaches every worker: both now allow POST.
    w.policy.write_text(GET_ONLY.format(methods="GET, POST"))
    w.proc.send_signal(signal.SIGHUP)
    _wait(lambda: all(w.call("POST") == 200 for _ in range(10)), "both workers reloaded")

    # SIGTERM stops every worker, and the supervisor exits 0.
    workers_now = w.pids()
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0, w.diagnosis()
    for pid in workers_now.values():  # waited for (reaped) by the supervisor
        assert not Path(f"/proc/{pid}").exists()


def _extauthz(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    return subprocess.run(
        [sys.executable, "-m", "extauthz", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
