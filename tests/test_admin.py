"""The admin gRPC service on its own listener: Explain (recorded decision id, described
request, serialized CheckRequest), PolicyStatus, the recent-decisions buffer, and that the
checked-in generated code matches protos/."""

from __future__ import annotations

import contextlib
import filecmp
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import struct_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from extauthz.admin.recent import RecentDecisions
from extauthz.admin.service import ADMIN_SERVICE, AdminServicer
from extauthz.admin.v1 import admin_pb2, admin_pb2_grpc
from extauthz.authorizer import Authorizer
from extauthz.cli import _settings, parser
from extauthz.config import Settings
from extauthz.errors import ConfigError
from extauthz.policy.engine import PolicySet
from extauthz.probe import parse_probe
from extauthz.reload import PolicyReloader
from extauthz.request import CheckInput
from extauthz.response import DECISION_ID_HEADER
from extauthz.server import Server
from extauthz.telemetry import Telemetry

ROOT = Path(__file__).parent.parent
PROTO = "extauthz/admin/v1/admin.proto"
GENERATED = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")
ISSUER = "https://idp.test"
SETTINGS = Settings(workload_namespace="ns1")


def policies_text(jwks: str, public: str = "/public/*") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: ns1}}
spec:
  jwtRules:
    - issuer: {ISSUER}
      audiences: [svc]
      jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-forbidden, namespace: ns1}}
spec:
  action: DENY
  rules:
    - to: [{{operation: {{paths: [/forbidden]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: ns1}}
spec:
  rules:
    - to: [{{operation: {{paths: ["{public}"]}}}}]
    - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
      to: [{{operation: {{paths: [/admin/*]}}}}]
      when:
        - key: request.auth.claims[groups]
          values: [admin]
"""


@dataclass
class Idp:
    key: ec.EllipticCurvePrivateKey
    jwks: str

    def token(self, ttl: int = 600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "svc", "sub": "alice", "exp": now + ttl, **claims}
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": "k"})


@pytest.fixture(scope="module")
def idp() -> Idp:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k", alg="ES256")
    return Idp(key, json.dumps({"keys": [jwk]}))


@pytest.fixture
def policy_dir(tmp_path: Path, idp: Idp) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "p.yaml").write_text(policies_text(idp.jwks))
    return d


@dataclass
class Running:
    server: Server
    reloader: PolicyReloader
    check: external_auth_pb2_grpc.AuthorizationStub
    admin: admin_pb2_grpc.AdminStub
    check_channel: grpc.aio.Channel


async def _start(policy_dir: Path, **kwargs: Any) -> tuple[Server, PolicyReloader]:
    authorizer = Authorizer(PolicySet.load(policy_dir), SETTINGS)
    reloader = PolicyReloader(authorizer, policy_dir, root_namespace="istio-system", interval=0)
    server = Server(
        authorizer, Telemetry(None), listen="127.0.0.1:0", grace=1.0, reload=reloader, **kwargs
    )
    await server.start()
    return server, reloader


@contextlib.asynccontextmanager
async def serving(policy_dir: Path, **kwargs: Any) -> AsyncIterator[Running]:
    """A Server with the admin listener on, and stubs for both listeners."""
    server, reloader = await _start(policy_dir, admin_listen="127.0.0.1:0", **kwargs)
    assert server.admin_port
    assert server.admin_port != server.port
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as check_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.admin_port}") as admin_channel,
        ):
            yield Running(
                server,
                reloader,
                external_auth_pb2_grpc.AuthorizationStub(check_channel),
                admin_pb2_grpc.AdminStub(admin_channel),  # type: ignore[no-untyped-call]
                check_channel,
            )
    finally:
        await server.stop()


@pytest.fixture
async def running(policy_dir: Path) -> AsyncIterator[Running]:
    async with serving(policy_dir) as r:
        yield r


def check_request(path: str, token: str = "") -> Any:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "svc", path
    http.headers[":path"] = path
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return req


async def check(r: Running, path: str, token: str = "") -> tuple[bool, str]:
    """Allowed?, and the decision id Envoy was given."""
    resp = await r.check.Check(check_request(path, token), timeout=5)
    allowed = resp.status.code == 0
    headers = resp.ok_response.headers if allowed else resp.denied_response.headers
    (decision_id,) = [h.header.value for h in headers if h.header.key == DECISION_ID_HEADER]
    return allowed, decision_id


async def explain_id(r: Running, decision_id: str) -> admin_pb2.ExplainResponse:
    request = admin_pb2.ExplainRequest(decision_id=decision_id)
    response: admin_pb2.ExplainResponse = await r.admin.Explain(request, timeout=5)
    return response


def offline_text(policy_dir: Path, description: dict[str, Any]) -> str:
    """What ``extauthz check`` prints for the same request."""
    probe = parse_probe(description)
    authorizer = Authorizer(PolicySet.load(policy_dir), SETTINGS)
    return "\n".join(authorizer.explain(probe.input, claims=probe.claims).lines())


def policy(resp: admin_pb2.ExplainResponse, key: str) -> admin_pb2.PolicyResult:
    found: list[admin_pb2.PolicyResult] = [p for p in resp.policies if p.key == key]
    assert len(found) == 1, [p.key for p in resp.policies]
    return found[0]


async def test_explain_a_recorded_decision(running: Running, idp: Idp, policy_dir: Path) -> None:
    token = idp.token(groups=["dev"])
    allowed, decision_id = await check(running, "/admin/x", token)
    assert not allowed
    resp = await explain_id(running, decision_id)
    assert resp.replayed
    d = resp.decision
    assert d.id == decision_id
    assert resp.recorded.id == decision_id
    assert d.outcome == admin_pb2.OUTCOME_PERMISSION_DENIED
    assert d.reason == resp.recorded.reason
    assert d.reason.startswith("no_allow_policy")
    assert d.issuer == ISSUER
    assert d.subject == "alice"
    assert d.policy_revision == running.server.authorizer.policies.revision
    assert resp.workload.namespace == "ns1"
    assert not resp.workload.HasField("labels")
    assert resp.request_principal == f"{ISSUER}/alice"
    assert [p.key for p in resp.policies] == ["ns1/deny-forbidden", "ns1/allow"]  # DENY first
    allow = policy(resp, "ns1/allow")
    assert allow.action == "ALLOW"
    assert not allow.matched
    assert allow.matched_rule == ""
    public, admins = allow.rules
    assert (public.name, public.matched) == ("rules[0]", False)
    assert admins.name == "rules[1]"
    assert not admins.matched
    (failure,) = admins.failures
    assert failure.field == "request.auth.claims[groups]"
    assert list(failure.values) == ["admin"]
    assert failure.actual == "[dev]"
    assert not failure.passed
    assert failure.line > 0
    assert "FAILED" in failure.description
    assert resp.text == offline_text(policy_dir, {"path": "/admin/x", "token": token})


async def test_explain_names_the_deciding_policy_and_rule(running: Running) -> None:
    allowed, decision_id = await check(running, "/forbidden")
    assert not allowed
    resp = await explain_id(running, decision_id)
    assert (resp.decision.policy, resp.decision.rule) == ("ns1/deny-forbidden", "rules[0]")
    assert resp.decision.reason == "denied_by_policy"
    deny = policy(resp, "ns1/deny-forbidden")
    assert deny.matched
    assert deny.matched_rule == "rules[0]"
    assert deny.rules[0].matched
    assert resp.request_principal == ""
    assert not resp.decision.HasField("dry_run_allowed")
    assert resp.text.startswith("decision: PERMISSION_DENIED reason=denied_by_policy")


async def test_replay_uses_the_policy_snapshot_it_was_made_with(
    running: Running, policy_dir: Path, idp: Idp
) -> None:
    allowed, decision_id = await check(running, "/public/x")
    assert allowed
    old = running.server.authorizer.policies.revision
    (policy_dir / "p.yaml").write_text(policies_text(idp.jwks, public="/elsewhere/*"))
    status = await running.reloader.reload()
    assert status.ok
    assert status.revision != old
    assert not (await check(running, "/public/x"))[0]  # the new set denies it now
    resp = await explain_id(running, decision_id)
    assert resp.decision.outcome == admin_pb2.OUTCOME_ALLOW
    assert resp.decision.policy_revision == old == resp.recorded.policy_revision
    assert (resp.decision.policy, resp.decision.rule) == ("ns1/allow", "rules[0]")

    status_resp = await running.admin.PolicyStatus(admin_pb2.PolicyStatusRequest(), timeout=5)
    assert status_resp.revision == status.revision != old
    assert status_resp.ok
    assert status_resp.watching
    assert list(status_resp.errors) == []
    assert status_resp.reloads == 1
    assert status_resp.failures == 0
    assert [Path(f).name for f in status_resp.files] == ["p.yaml"]
    assert abs(status_resp.loaded_at.ToNanoseconds() / 1e9 - time.time()) < 60
    assert status_resp.recent_decisions == 2
    assert status_resp.recent_capacity == 1024


async def test_policy_status_reports_a_failed_reload(running: Running, policy_dir: Path) -> None:
    good = running.server.authorizer.policies.revision
    (policy_dir / "p.yaml").write_text("apiVersion: security.istio.io/v1\nkind: Nonsense\n")
    await running.reloader.reload()
    resp = await running.admin.PolicyStatus(admin_pb2.PolicyStatusRequest(), timeout=5)
    assert not resp.ok
    assert resp.failures == 1
    assert resp.revision == good
    assert resp.errors
    assert all("p.yaml" in e for e in resp.errors)


async def test_replay_of_a_token_that_has_expired_since(
    running: Running, idp: Idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = idp.token(ttl=600, groups=["admin"])
    allowed, decision_id = await check(running, "/admin/x", token)
    assert allowed

    class Later(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Later:
            return super().now(tz) + timedelta(hours=2)

    monkeypatch.setattr(jwt.api_jwt, "datetime", Later)
    # The verified-token cache runs on the real clock: forget the token, as 2 hours would.
    policies = running.server.authorizer.policies
    for key in policies.workload_keys():
        policies.for_workload(*key).verifier.cache.clear()
    assert not (await check(running, "/admin/x", token))[0]  # the token has expired now
    resp = await explain_id(running, decision_id)
    assert resp.replayed
    assert resp.decision.outcome == admin_pb2.OUTCOME_ALLOW
    assert (resp.decision.policy, resp.decision.rule) == ("ns1/allow", "rules[1]")
    assert resp.decision.issuer == ISSUER
    assert resp.request_principal == f"{ISSUER}/alice"
    assert resp.decision.id == decision_id


async def test_explain_a_request_description(running: Running, policy_dir: Path) -> None:
    claims = struct_pb2.Struct()
    claims.update({"iss": ISSUER, "aud": "svc", "sub": "bob", "groups": ["admin"], "n": 3})
    desc = admin_pb2.RequestDescription(
        method="GET", host="svc", path="/admin/x", headers={"X-Trace": "1"}, claims=claims
    )
    resp = await running.admin.Explain(admin_pb2.ExplainRequest(request=desc), timeout=5)
    assert not resp.replayed
    assert not resp.HasField("recorded")
    assert resp.decision.outcome == admin_pb2.OUTCOME_ALLOW
    assert resp.decision.rule == "rules[1]"
    assert resp.request_principal == f"{ISSUER}/bob"
    assert resp.text == offline_text(
        policy_dir,
        {
            "method": "GET",
            "host": "svc",
            "path": "/admin/x",
            "headers": {"X-Trace": "1"},
            "claims": {"iss": ISSUER, "aud": "svc", "sub": "bob", "groups": ["admin"], "n": 3},
        },
    )
    # namespace/labels name another workload: no policy of ns1 applies there.
    other = admin_pb2.RequestDescription(path="/public/x", namespace="ns2", labels="app=x")
    resp = await running.admin.Explain(admin_pb2.ExplainRequest(request=other), timeout=5)
    assert resp.workload.namespace == "ns2"
    assert resp.workload.labels == "app=x"
    assert not resp.policies
    assert resp.decision.outcome == admin_pb2.OUTCOME_ALLOW


async def test_explain_a_serialized_check_request(running: Running, idp: Idp) -> None:
    token = idp.token(groups=["admin"])
    data = check_request("/admin/y", token).SerializeToString()
    resp = await running.admin.Explain(admin_pb2.ExplainRequest(check_request=data), timeout=5)
    assert not resp.replayed
    assert resp.decision.outcome == admin_pb2.OUTCOME_ALLOW
    assert resp.decision.rule == "rules[1]"
    assert resp.request_principal == f"{ISSUER}/alice"


async def test_explain_is_not_a_check(running: Running) -> None:
    """Explaining a request is not deciding one: nothing is recorded for it."""
    before = running.server.recent
    assert before is not None
    assert len(before) == 0
    desc = admin_pb2.RequestDescription(path="/public/x")
    await running.admin.Explain(admin_pb2.ExplainRequest(request=desc), timeout=5)
    assert len(before) == 0


async def test_an_unknown_decision_id_is_not_found(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await explain_id(running, "0" * 32)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not among the recent decisions" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            admin_pb2.ExplainRequest(
                request=admin_pb2.RequestDescription(
                    token="a.b.c", claims=struct_pb2.Struct(fields={})
                )
            ),
            "give token or claims, not both",
        ),
        (
            admin_pb2.ExplainRequest(request=admin_pb2.RequestDescription(destination_port=70000)),
            "request.destination_port: must be a port number",
        ),
        (admin_pb2.ExplainRequest(check_request=b"\xff\xff\xff"), "not a serialized"),
        (
            admin_pb2.ExplainRequest(check_request=b"\x0a\x00"),  # attributes without http
            "no attributes.request.http",
        ),
        (admin_pb2.ExplainRequest(), "set decision_id, request or check_request"),
    ],
)
async def test_a_bad_request_is_invalid_argument(
    running: Running, request_: admin_pb2.ExplainRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.admin.Explain(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


async def test_an_unreadable_check_request_is_recorded_as_decided(running: Running) -> None:
    resp = await running.check.Check(external_auth_pb2.CheckRequest(), timeout=5)
    (decision_id,) = [
        h.header.value for h in resp.denied_response.headers if h.header.key == DECISION_ID_HEADER
    ]
    explained = await explain_id(running, decision_id)
    assert explained.replayed
    assert explained.decision == explained.recorded
    assert "policies: not evaluated" in explained.text


async def test_the_buffer_keeps_only_the_newest(policy_dir: Path) -> None:
    async with serving(policy_dir, recent_decisions=3) as r:
        ids = [(await check(r, f"/public/{i}"))[1] for i in range(5)]
        for old in ids[:2]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await explain_id(r, old)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for i, kept in zip(range(2, 5), ids[2:], strict=True):
            resp = await explain_id(r, kept)
            assert resp.text.startswith("decision: ALLOW")
            assert f"'/public/{i}'" in resp.text
        status = await r.admin.PolicyStatus(admin_pb2.PolicyStatusRequest(), timeout=5)
        assert (status.recent_decisions, status.recent_capacity) == (3, 3)


async def test_recording_can_be_disabled(policy_dir: Path) -> None:
    async with serving(policy_dir, recent_decisions=0) as r:
        assert r.server.recent is None
        _, decision_id = await check(r, "/public/x")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await explain_id(r, decision_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "recording is disabled" in (err.value.details() or "")


async def test_without_the_admin_listener_nothing_is_recorded(policy_dir: Path) -> None:
    server, _ = await _start(policy_dir)
    try:
        assert server.recent is None
        assert server.admin_port == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            resp = await stub.Check(check_request("/public/x"), timeout=5)
            assert resp.status.code == 0
        assert server.recent is None
    finally:
        await server.stop()


async def test_the_admin_service_is_never_on_the_check_port(running: Running) -> None:
    on_check_port = admin_pb2_grpc.AdminStub(running.check_channel)  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await on_check_port.PolicyStatus(admin_pb2.PolicyStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_on_the_admin_listener(running: Running) -> None:
    target = f"127.0.0.1:{running.server.admin_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {s.name for s in answer.list_services_response.service}
            break
    assert ADMIN_SERVICE == "extauthz.admin.v1.Admin"
    assert {ADMIN_SERVICE, "grpc.health.v1.Health"} <= names
    assert "envoy.service.auth.v3.Authorization" not in names


@pytest.mark.parametrize(
    ("admin_listen", "message"),
    [("127.0.0.1:9191", "must differ from --listen"), ("nowhere", "expected HOST:PORT")],
)
def test_the_admin_listener_must_be_its_own(admin_listen: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Server(
            Authorizer(PolicySet.empty()),
            Telemetry(None),
            listen="127.0.0.1:9191",
            admin_listen=admin_listen,
        )


async def test_an_admin_port_in_use_fails_the_start_cleanly(running: Running) -> None:
    server = Server(
        Authorizer(PolicySet.empty()),
        Telemetry(None),
        listen="127.0.0.1:0",
        admin_listen=f"127.0.0.1:{running.server.port}",
    )
    with pytest.raises(ConfigError, match=r"--admin-listen .*cannot bind"):
        await server.start()
    await server.stop()  # nothing left running
    assert (await check(running, "/public/x"))[0]


def test_recent_decisions_unit() -> None:
    from extauthz.decision import Decision, Outcome

    policies = PolicySet.empty()
    buffer = RecentDecisions(2)
    for i in range(3):
        buffer.record(Decision(Outcome.ALLOW, "r", "m", f"id{i}"), CheckInput(), policies)
    assert len(buffer) == 2
    assert "id0" not in buffer
    assert buffer.get("id2") is not None
    disabled = RecentDecisions(0)
    disabled.record(Decision(Outcome.ALLOW, "r", "m", "x"), None, policies)
    assert len(disabled) == 0
    with pytest.raises(ValueError, match=">= 0"):
        RecentDecisions(-1)


def test_cli_options() -> None:
    args = parser().parse_args(
        ["serve", "--admin-listen", "127.0.0.1:9192", "--recent-decisions", "10"]
    )
    settings = _settings(args)
    assert (settings.admin_listen, settings.recent_decisions) == ("127.0.0.1:9192", 10)
    assert _settings(parser().parse_args(["serve"])).admin_listen is None
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--recent-decisions", "-1"])


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
            f"--grpc_python_out={tmp_path}",
            PROTO,
        ],
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    out = tmp_path / "extauthz/admin/v1"
    for name in GENERATED:
        assert filecmp.cmp(out / name, ROOT / "extauthz/admin/v1" / name, shallow=False), (
            f"extauthz/admin/v1/{name} is stale or hand-edited: run `make protos`"
        )


class _FakeContext:
    """The servicer needs a context only to abort with an error status."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"{code}: {details}")


async def test_explain_a_described_request_for_a_target_refs_workload(tmp_path: Path) -> None:
    """service/gateway reach targetRefs policies, and explanations never fill the live memo."""
    (tmp_path / "t.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: svc, namespace: ns1}\n"
        "spec:\n  targetRefs: [{kind: Service, name: orders}]\n"
        "  rules: [{to: [{operation: {methods: [GET]}}]}]\n"
    )
    policies = PolicySet.load(tmp_path)
    servicer = AdminServicer(Authorizer(policies), recent=None, reloader=None)
    desc = admin_pb2.RequestDescription(method="POST", namespace="ns1", service="orders")
    req = admin_pb2.ExplainRequest(request=desc)
    resp = await servicer.Explain(req, _FakeContext())  # type: ignore[arg-type]
    assert resp.decision.reason == "no_allow_policy_matched"
    assert resp.workload.service == "orders"
    assert "service=orders" in resp.text
    assert policies.workload_keys() == []


@pytest.mark.parametrize("listen", ["0.0.0.0:9192", "10.0.0.5:9192", "[::]:9192"])
def test_the_admin_listener_must_be_loopback(listen: str) -> None:
    with pytest.raises(ConfigError, match="only a loopback address"):
        Server(
            Authorizer(PolicySet.empty()),
            Telemetry(None),
            listen="127.0.0.1:9191",
            admin_listen=listen,
        )


def test_recent_decisions_keep_no_request_body() -> None:
    """A recorded input outlives its Check: it keeps what Explain reads, not a body."""
    from extauthz.request import from_check_request

    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "POST", "/upload?x=1", "Shop"
    http.headers["x-tenant"] = "t1"
    http.body = "b" * 100_000
    http.raw_body = b"r" * 100_000
    inp = from_check_request(req)
    policies = PolicySet.empty()
    recent = RecentDecisions(4)
    decision = Authorizer(policies).check(inp)
    recent.record(decision, inp, policies)
    kept = recent.get(decision.decision_id)
    assert kept is not None
    assert kept.input is not None
    assert kept.input is not inp
    assert kept.input._attrs.request.http.body == ""
    assert kept.input._attrs.request.http.raw_body == b""
    assert (kept.input.method, kept.input.host, kept.input.path, kept.input.query) == (
        "POST",
        "shop",
        "/upload",
        "x=1",
    )
    assert kept.input.headers.get("x-tenant") == "t1"
    assert http.body == "b" * 100_000  # the Check's own request is untouched
    # Without a body there is nothing to drop: the input is kept as it is.
    http.ClearField("body")
    http.ClearField("raw_body")
    bodiless = from_check_request(req)
    assert bodiless.detached() is bodiless
