"""``serve --event-loop``: uvloop by default when installed, asyncio on request; both serve
Checks and stop cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz.cli import event_loop_factory
from extauthz.devtools.mesh import wait_serving

ROOT = Path(__file__).resolve().parents[1]
ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: istio-system}
spec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}
"""


def test_auto_picks_uvloop_when_installed() -> None:
    import uvloop

    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None


@pytest.mark.parametrize(("choice", "loop"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_serve_answers_on_the_chosen_loop(tmp_path: Path, choice: str, loop: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(ALLOW_GET)
    sock = f"unix:{tmp_path / 's.sock'}"
    log_path = tmp_path / "extauthz.log"
    argv = [sys.executable, "-m", "extauthz", "serve", "--listen", sock]
    argv += ["--policies", str(policies), "--event-loop", choice]
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(sock, proc, log_path)
        with grpc.insecure_channel(sock) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            codes = []
            for method in ("GET", "POST"):
                req = external_auth_pb2.CheckRequest()
                req.attributes.request.http.method = method
                req.attributes.request.http.path = "/"
                codes.append(stub.Check(req, timeout=5).status.code)
        assert codes == [0, 7]  # OK, PERMISSION_DENIED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"event loop: {loop}" in log_path.read_text()
