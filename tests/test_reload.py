"""Hot reload: change detection, last-good-set on errors, health signal, SIGHUP, and a reload
under load where every answer must match a policy set that was in force while it was asked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.devtools.envoy import free_port
from extauthz.policy.engine import PolicySet
from extauthz.reload import PolicyReloader, ReloadStatus
from extauthz.server import POLICY_HEALTH_SERVICE, Server
from extauthz.telemetry import Telemetry

SETTINGS = Settings(workload_namespace="ns1")


def allow_only(path: str, name: str = "p") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: ns1}}
spec:
  rules:
    - to: [{{operation: {{paths: ["{path}"]}}}}]
"""


DENY_Z = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-z, namespace: ns1}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/z"]}}]}]
"""

BROKEN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns1}
spec:
  rules:
    - to: [{operation: {pathz: ["/c"]}}]
"""


def write(path: Path, text: str) -> None:
    """Replace a file atomically, as a config management tool (or a ConfigMap) would."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_request(path: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "svc", path
    return req


def allowed(authorizer: Authorizer, path: str) -> bool:
    from extauthz.request import CheckInput

    return authorizer.check(CheckInput(method="GET", host="svc", path=path)).allowed


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    write(d / "p.yaml", allow_only("/a"))
    return d


def reloader_for(directory: Path) -> tuple[Authorizer, PolicyReloader]:
    authorizer = Authorizer(PolicySet.load(directory), SETTINGS)
    return authorizer, PolicyReloader(authorizer, directory, root_namespace="istio-system")


async def test_a_changed_file_is_swapped_in(policy_dir: Path) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    first = authorizer.policies.revision
    assert (await reloader.reload()).reloads == 0  # nothing changed: no reload at all
    write(policy_dir / "p.yaml", allow_only("/b"))
    status = await reloader.reload()
    assert status.ok
    assert status.reloads == 1
    assert status.revision != first
    assert authorizer.policies.revision == status.revision
    assert allowed(authorizer, "/b")
    assert not allowed(authorizer, "/a")


async def test_a_reloaded_set_is_warm_for_the_workloads_already_served(policy_dir: Path) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    assert allowed(authorizer, "/a")
    served = authorizer.policies.workload_keys()
    assert served == [("ns1", None, frozenset())]
    write(policy_dir / "p.yaml", allow_only("/b"))
    await reloader.reload()
    # selected and indexed in the reload thread, before any request reached the new set
    assert authorizer.policies.workload_keys() == served


async def test_a_broken_set_keeps_the_last_good_one_and_names_the_line(policy_dir: Path) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    good = authorizer.policies.revision
    write(policy_dir / "p.yaml", BROKEN)
    status = await reloader.reload()
    assert not status.ok
    assert status.failures == 1
    assert status.revision == good
    assert any("p.yaml:7:" in e and "pathz" in e for e in status.errors), status.errors
    assert authorizer.policies.revision == good
    assert allowed(authorizer, "/a")
    # Unchanged broken files are not reloaded (and re-logged) on every poll.
    assert (await reloader.reload()).failures == 1
    write(policy_dir / "p.yaml", allow_only("/c"))
    status = await reloader.reload()
    assert status.ok
    assert status.errors == ()
    assert allowed(authorizer, "/c")


@pytest.mark.parametrize(
    "damage",
    [
        "delete_directory",
        "empty_directory",
        "add_unreadable_file",
        "add_second_definition",
        "truncate",
    ],
)
async def test_damage_never_replaces_the_good_set(policy_dir: Path, damage: str) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    if damage == "delete_directory":
        (policy_dir / "p.yaml").unlink()
        policy_dir.rmdir()
    elif damage == "empty_directory":  # e.g. `rm *.yaml && cp new/*.yaml .` caught midway
        (policy_dir / "p.yaml").unlink()
    elif damage == "add_unreadable_file":
        (policy_dir / "q.yaml").write_bytes(b"\xff\xfe not utf-8")
    elif damage == "add_second_definition":
        write(policy_dir / "q.yaml", allow_only("/z"))  # same name p in ns1: refused
    else:
        (policy_dir / "p.yaml").write_text("apiVersion: security.istio.io/v1\nkind: Autho")
    status = await reloader.reload()
    assert not status.ok
    assert status.errors
    assert allowed(authorizer, "/a")
    assert not allowed(authorizer, "/z")


@pytest.mark.parametrize(
    "content",
    ["", "# only a comment\n", "---\n---\n"],
    ids=["truncated", "comment-only", "empty-documents"],
)
async def test_a_file_that_lost_its_policies_is_refused(policy_dir: Path, content: str) -> None:
    """A file caught mid-write must not silently drop its policies (a DENY, say)."""
    write(policy_dir / "deny.yaml", DENY_Z)
    authorizer, reloader = reloader_for(policy_dir)
    assert not allowed(authorizer, "/z")
    (policy_dir / "deny.yaml").write_text(content)
    status = await reloader.reload()
    assert not status.ok
    assert any("deny.yaml" in e and "no longer holds any policy" in e for e in status.errors)
    assert not allowed(authorizer, "/z")
    (policy_dir / "p.yaml").write_text(content)  # now no policy at all
    status = await reloader.reload()
    assert not status.ok
    assert "holds no policies at all" in status.errors[0]
    assert allowed(authorizer, "/a")
    (policy_dir / "deny.yaml").unlink()  # deleting a file is the explicit way
    write(policy_dir / "p.yaml", allow_only("/z"))
    status = await reloader.reload()
    assert status.ok
    assert allowed(authorizer, "/z")


@pytest.mark.parametrize(
    "content", [None, "", "# only a comment\n"], ids=["no-file", "empty", "comment"]
)
def test_serve_refuses_to_start_on_a_directory_without_policies(
    tmp_path: Path, content: str | None
) -> None:
    """What a reload refuses, a start refuses too: an empty mount would allow everything."""
    directory = tmp_path / "policies"
    directory.mkdir()
    if content is not None:
        (directory / "p.yaml").write_text(content)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--policies",
            str(directory),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
    )
    assert result.returncode == 1, result.stderr
    assert f"--policies {directory}: no AuthorizationPolicy or RequestAuthentication" in (
        result.stderr
    )


async def test_files_changing_during_a_load_are_read_again(policy_dir: Path) -> None:
    """A set mixing two versions (a ConfigMap swap between two reads) is never installed."""
    authorizer, reloader = reloader_for(policy_dir)
    calls = []

    def load_while_someone_writes(directory: Path, **kwargs: Any) -> PolicySet:
        calls.append(directory)
        loaded = PolicySet.load(directory, **kwargs)
        if len(calls) == 1:
            write(policy_dir / "p.yaml", allow_only("/c"))  # lands after the read
        return loaded

    reloader.load = load_while_someone_writes  # type: ignore[method-assign]
    write(policy_dir / "p.yaml", allow_only("/b"))
    status = await reloader.reload()
    assert status.ok
    assert len(calls) == 2
    assert allowed(authorizer, "/c")
    assert not allowed(authorizer, "/b")


async def test_files_that_never_settle_are_retried_at_the_next_poll(policy_dir: Path) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    n = iter(range(100))

    def always_changing(directory: Path, **kwargs: Any) -> PolicySet:
        loaded = PolicySet.load(directory, **kwargs)
        write(policy_dir / "p.yaml", allow_only(f"/v{next(n)}"))
        return loaded

    reloader.load = always_changing  # type: ignore[method-assign]
    write(policy_dir / "p.yaml", allow_only("/b"))
    status = await reloader.reload()
    assert not status.ok
    assert "kept changing" in status.errors[0]
    assert allowed(authorizer, "/a")
    reloader.load = PolicySet.load  # type: ignore[method-assign]
    assert (await reloader.reload()).ok  # retried although nothing changed since


async def test_a_changed_jwks_file_triggers_a_reload(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    def jwks() -> str:
        key = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
        return '{"keys": [' + key + "]}"

    d = tmp_path / "p"
    d.mkdir()
    (tmp_path / "keys.json").write_text(jwks())
    write(
        d / "ra.yaml",
        """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ra, namespace: ns1}
spec:
  jwtRules: [{issuer: "https://idp", jwksUri: ../keys.json}]
""",
    )
    authorizer, reloader = reloader_for(d)
    assert authorizer.policies.source.dependencies == (str(d / "../keys.json"),)
    before = authorizer.policies.revision
    (tmp_path / "keys.json").write_text(jwks())
    status = await reloader.reload()
    assert status.ok
    assert status.reloads == 1
    assert status.revision != before


async def test_health_reports_a_failed_reload(policy_dir: Path) -> None:
    authorizer, reloader = reloader_for(policy_dir)
    reloader.interval = 0.05
    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, meter_provider=MeterProvider(metric_readers=[reader]))
    server = Server(authorizer, telemetry, listen="127.0.0.1:0", grace=1.0, reload=reloader)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                req = health_pb2.HealthCheckRequest(service=service)
                return int((await health.Check(req, timeout=5)).status)

            serving = health_pb2.HealthCheckResponse.SERVING
            assert await status(POLICY_HEALTH_SERVICE) == serving
            write(policy_dir / "p.yaml", BROKEN)
            await _until(lambda: not reloader.status.ok)
            assert await status(POLICY_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status("") == serving  # Check keeps serving the last good set
            write(policy_dir / "p.yaml", allow_only("/b"))
            await _until(lambda: reloader.status.ok)
            assert await status(POLICY_HEALTH_SERVICE) == serving
    finally:
        await server.stop()
    reloads = points(reader, "extauthz.policy.reloads")
    assert reloads == {frozenset({("result", "error")}): 1, frozenset({("result", "ok")}): 1}


async def _until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    path: str
    allowed: bool


async def test_reload_under_load_answers_every_request_by_a_set_in_force(
    policy_dir: Path,
) -> None:
    """Good, broken, good, ... while clients keep checking: no RPC error, no wrong answer.

    Set X allows only path /X. Each answer must equal what some set in force during the
    request's [sent, received] window says; a broken set is never in force.
    """
    authorizer, reloader = reloader_for(policy_dir)
    reloader.interval = 0.01
    paths = ["/a", "/b", "/c", "/d"]
    swaps: list[tuple[float, str]] = [(0.0, "/a")]  # (time, the one allowed path)

    async def record(status: ReloadStatus) -> None:
        # Runs right after the swap, before any Check can be served by the new set.
        now = time.monotonic()
        (path,) = [p for p in paths if allowed(authorizer, p)]
        if path != swaps[-1][1]:
            swaps.append((now, path))

    server = Server(
        authorizer, Telemetry.from_env(), listen="127.0.0.1:0", grace=1.0, reload=reloader
    )
    await server.start()
    reloader.listeners.insert(0, record)
    answers: list[Answer] = []
    stop = asyncio.Event()

    async def client(stub: external_auth_pb2_grpc.AuthorizationStub, n: int) -> None:
        i = n
        while not stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            sent = time.monotonic()
            resp = await stub.Check(check_request(path), timeout=5)
            answers.append(Answer(sent, time.monotonic(), path, resp.status.code == 0))

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            clients = [asyncio.create_task(client(stub, n)) for n in range(8)]
            sequence = ["/b", None, "/c", None, "/d", "/a", None, "/b"]
            for step in sequence:
                await asyncio.sleep(0.15)
                if step is None:
                    write(policy_dir / "p.yaml", BROKEN)
                    await _until(lambda: not reloader.status.ok)
                else:
                    write(policy_dir / "p.yaml", allow_only(step))
                    await _until(lambda s=step: swaps[-1][1] == s)  # type: ignore[misc]
            await asyncio.sleep(0.15)
            stop.set()
            await asyncio.gather(*clients)  # any RPC error fails the test here
    finally:
        await server.stop()
    assert [p for _, p in swaps] == ["/a", "/b", "/c", "/d", "/a", "/b"]
    assert reloader.status.failures == 3
    wrong = [a for a in answers if a.allowed not in _possible(a, swaps)]
    assert len(answers) > 500, len(answers)
    assert wrong == [], wrong[:5]


def _possible(a: Answer, swaps: list[tuple[float, str]]) -> set[bool]:
    """The answers of every set in force at some moment of [sent, received]."""
    out = set()
    for i, (start, path) in enumerate(swaps):
        end = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        if start <= a.received and end >= a.sent:
            out.add(a.path == path)
    return out


def test_sighup_reloads_a_running_server(policy_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--policies",
            str(policy_dir),
            "--namespace",
            "ns1",
            "--reload-interval",
            "0",  # polling off: only the signal can reload
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)

            def code(path: str) -> int:
                return int(stub.Check(check_request(path), timeout=5).status.code)

            assert code("/a") == 0
            assert code("/b") != 0
            write(policy_dir / "p.yaml", allow_only("/b"))
            time.sleep(0.3)
            assert code("/a") == 0  # no polling: still the old set
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while code("/b") != 0:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.05)
            assert code("/a") != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "policies reloaded" in err
