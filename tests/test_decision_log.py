"""The decision log: a session through the real gRPC server (one record per Check, none lost
at graceful stop, even with checks in flight, no credential in the file), masking, rotation,
deterministic sampling, the queue when the sink is slow, the JSON mapping, the flags, and the
generated code's drift."""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.protobuf import json_format, timestamp_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from extauthz.authorizer import Authorizer
from extauthz.cli import _settings, parser
from extauthz.config import Settings
from extauthz.decision import Decision, DenyResponse, Outcome
from extauthz.decisionlog.log import DecisionLog, sampled
from extauthz.decisionlog.record import (
    MASK,
    MAX_VALUE_CHARS,
    Entry,
    Masker,
    rfc3339,
    to_dict,
    to_json,
    to_record,
    trace_ids,
)
from extauthz.decisionlog.settings import DecisionLogSettings
from extauthz.decisionlog.sink import FileSink, open_sink
from extauthz.decisionlog.v1 import decision_log_pb2 as pb
from extauthz.errors import ConfigError, DecisionLogError
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import DECISION_ID_HEADER
from extauthz.server import Server
from extauthz.telemetry import Telemetry

ROOT = Path(__file__).parent.parent
ISSUER = "https://idp.test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
COOKIE_VALUE = "session=cookie-value-s3cr3t"
API_KEY = "api-key-value-s3cr3t"
EMAIL = "alice.private@example.com"
XFCC = "By=spiffe://td/ns/shop/sa/orders;Hash=feedface1234;URI=spiffe://td/ns/shop/sa/frontend"


# --- the scripted session through the real server -----------------------------------------


@dataclass
class Idp:
    key: ec.EllipticCurvePrivateKey
    jwks: str

    def token(self, ttl: int = 600, key: ec.EllipticCurvePrivateKey | None = None) -> str:
        now = int(time.time())
        payload = {
            "iss": ISSUER,
            "sub": "alice",
            "aud": "orders",
            "exp": now + ttl,
            "groups": ["dev"],
            "email": EMAIL,
            "profile": {"email": EMAIL, "team": "shop"},
        }
        return jwt.encode(payload, key or self.key, algorithm="ES256", headers={"kid": "k"})


@pytest.fixture(scope="module")
def idp() -> Idp:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k", alg="ES256")
    return Idp(key, json.dumps({"keys": [jwk]}))


def policies(jwks: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: shop}}
spec:
  jwtRules:
    - issuer: {ISSUER}
      audiences: [orders]
      jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-forbidden, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/forbidden]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-deny
  namespace: shop
  annotations: {{istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/public/dry]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: audit-orders, namespace: shop}}
spec:
  action: AUDIT
  rules: [{{to: [{{operation: {{paths: ["/orders/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: shop}}
spec:
  rules:
    - to: [{{operation: {{paths: ["/public/*"]}}}}]
    - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
      to: [{{operation: {{paths: ["/orders/*"]}}}}]
---
apiVersion: extauthz.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: mint, namespace: shop}}
spec:
  rules:
    - to: [{{operation: {{paths: ["/mint/*"]}}}}]
      token: {{}}
"""


def check_request(path: str, headers: Mapping[str, str] | None = None) -> Any:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.principal = "spiffe://td/ns/shop/sa/frontend"
    a.source.address.socket_address.address = "10.0.0.7"
    a.source.address.socket_address.port_value = 40001
    a.destination.address.socket_address.address = "10.0.0.8"
    a.destination.address.socket_address.port_value = 8443
    http = a.request.http
    http.method, http.host, http.path, http.id = "GET", "orders.shop", path, "req-1"
    http.headers.update({":path": path, "user-agent": "curl/8.5", **(headers or {})})
    return req


@dataclass(frozen=True)
class Case:
    name: str
    request: Any
    status: int  # what the client gets
    reason: str
    metadata: tuple[tuple[str, str], ...] = ()


def session_cases(idp: Idp) -> list[Case]:
    token = idp.token()
    other = ec.generate_private_key(ec.SECP256R1())
    query_jwt = idp.token(ttl=30)
    credentials = {
        "authorization": f"Bearer {token}",
        "cookie": COOKIE_VALUE,
        "x-api-key": API_KEY,
        "x-forwarded-client-cert": XFCC,
        # A header nobody told the log about, carrying a token after some text.
        "x-debug-context": f"forwarded={token}",
    }
    return [
        Case("allow", check_request(f"/public/a?page=2&sig={query_jwt}"), 200, "allowed_by_policy"),
        Case(
            "allow with token",
            check_request("/orders/1?expand=items", credentials),
            200,
            "allowed_by_policy",
            (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),),
        ),
        Case("dry-run", check_request("/public/dry"), 200, "allowed_by_policy"),
        Case("deny", check_request("/forbidden"), 403, "denied_by_policy"),
        Case("no allow", check_request("/private"), 403, "no_allow_policy_matched"),
        Case(
            "expired",
            check_request("/orders/1", {"authorization": f"Bearer {idp.token(ttl=-600)}"}),
            401,
            "jwt_expired",
        ),
        Case(
            "forged",
            check_request("/orders/1", {"authorization": f"Bearer {idp.token(key=other)}"}),
            401,
            "jwt_signature_invalid",
        ),
        Case("error", check_request("/mint/x"), 503, "token_signing_unconfigured"),
        Case("unreadable", external_auth_pb2.CheckRequest(), 403, "request_invalid"),
    ]


def secrets_of(cases: list[Case]) -> set[str]:
    """Every credential the session sent: none may reach the log."""
    found = {COOKIE_VALUE, "cookie-value-s3cr3t", API_KEY, EMAIL, "feedface1234", "Bearer"}
    for case in cases:
        if not case.request.attributes.request.HasField("http"):
            continue
        http = case.request.attributes.request.http
        for value in (http.path, *http.headers.values()):
            for word in value.replace("=", " ").replace("&", " ").split():
                if word.startswith("eyJ"):
                    found.update({word, *word.split(".")})
    return found


@dataclass
class Session:
    server: Server
    log: DecisionLog
    path: Path
    spans: InMemorySpanExporter


@pytest.fixture
async def session(
    tmp_path: Path, idp: Idp, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Session]:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policies(idp.jwks))
    authorizer = Authorizer(
        PolicySet.load(tmp_path / "policies"), Settings(workload_namespace="shop")
    )
    spans = InMemorySpanExporter()
    telemetry = Telemetry.from_env(extra=[SimpleSpanProcessor(spans)])
    path = tmp_path / "decisions.log"
    log = DecisionLog.open(
        DecisionLogSettings(str(path), mask=frozenset({"email", "x-api-key"})),
        workload=authorizer.workload,
    )
    server = Server(authorizer, telemetry, listen="127.0.0.1:0", grace=5.0, decision_log=log)
    await server.start()
    try:
        yield Session(server, log, path, spans)
    finally:
        await server.stop()


async def send(stub: Any, case: Case) -> tuple[str, int]:
    """The decision id Envoy was given and the HTTP status the client gets."""
    resp = await stub.Check(case.request, metadata=case.metadata, timeout=10)
    allowed = resp.status.code == 0
    headers = resp.ok_response.headers if allowed else resp.denied_response.headers
    (decision_id,) = [h.header.value for h in headers if h.header.key == DECISION_ID_HEADER]
    return decision_id, 200 if allowed else resp.denied_response.status.code


ROUNDS = 8


async def test_a_session_leaves_one_record_per_check_and_no_credential(
    session: Session, idp: Idp
) -> None:
    cases = session_cases(idp)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{session.server.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        sent = [c for _ in range(ROUNDS) for c in cases]
        answers = await asyncio.gather(*(send(stub, c) for c in sent))
    for case, (_, status) in zip(sent, answers, strict=True):
        assert status == case.status, case.name
    await session.server.stop()  # graceful: drain the checks, then write the log out

    text = session.path.read_text()
    lines = text.splitlines()
    assert len(lines) == len(sent) == len(cases) * ROUNDS
    records = [json_format.Parse(line, pb.DecisionRecord()) for line in lines]
    by_id = {r.decision_id: r for r in records}
    assert sorted(by_id) == sorted(decision_id for decision_id, _ in answers)  # ids unique too
    for case, (decision_id, status) in zip(sent, answers, strict=True):
        rec = by_id[decision_id]
        assert (rec.http_status, rec.reason) == (status, case.reason), case.name
    assert session.log.counts()["written", "deny"] == (len(cases) - 3) * ROUNDS

    for secret in secrets_of(cases):
        assert secret not in text, secret
    assert "eyJ" not in text  # no token, nor any part of one

    orders = by_id[answers[1][0]]
    assert json_format.MessageToDict(orders.request, preserving_proto_field_name=True) == {
        "method": "GET",
        "host": "orders.shop",
        "path": "/orders/1",
        "query": f"expand={MASK}",
        "headers": {
            "authorization": MASK,
            "cookie": MASK,
            "user-agent": "curl/8.5",
            "x-api-key": MASK,
            "x-debug-context": MASK,
            "x-forwarded-client-cert": MASK,
        },
        "request_id": "req-1",
        "source": {"address": "10.0.0.7", "port": 40001},
        "destination": {"address": "10.0.0.8", "port": 8443},
    }
    assert (orders.caller.spiffe_id, orders.caller.source) == (
        "spiffe://td/ns/shop/sa/frontend",
        "source.principal",
    )
    assert (orders.jwt.issuer, orders.jwt.subject, list(orders.jwt.audiences)) == (
        ISSUER,
        "alice",
        ["orders"],
    )
    claims = json_format.MessageToDict(orders.jwt.claims)
    assert claims["groups"] == ["dev"]
    assert claims["email"] == MASK
    assert claims["profile"] == {"email": MASK, "team": "shop"}
    assert (orders.policy, orders.rule, list(orders.audit_policies)) == (
        "shop/allow",
        "rules[1]",
        ["shop/audit-orders"],
    )
    assert orders.workload.namespace == "shop"
    assert orders.outcome == pb.OUTCOME_ALLOW
    assert orders.sample_rate == 1.0
    assert abs(orders.time.ToNanoseconds() - time.time_ns()) < 60e9
    # The decision span: Envoy's trace, and the id of the span extauthz exported.
    (span,) = [
        s
        for s in session.spans.get_finished_spans()
        if (s.attributes or {}).get("extauthz.decision_id") == orders.decision_id
    ]
    assert orders.trace_id == TRACE_ID
    assert orders.span_id == f"{span.context.span_id:016x}"

    dry = by_id[answers[2][0]]
    assert (dry.dry_run.outcome, dry.dry_run.policy) == (
        pb.OUTCOME_PERMISSION_DENIED,
        "shop/dry-deny",
    )
    error = by_id[answers[7][0]]
    assert error.outcome == pb.OUTCOME_ERROR
    unreadable = by_id[answers[8][0]]
    assert not unreadable.HasField("request")
    assert not unreadable.HasField("workload")


class HeldAuthorizer(Authorizer):
    """Decides as the real one, once released: checks stay in flight until the test says."""

    def __init__(self, policies: PolicySet, settings: Settings) -> None:
        super().__init__(policies, settings)
        self.held = 0
        self.release = asyncio.Event()

    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        self.held += 1
        await self.release.wait()
        return await super().check_async(inp, wait=wait)


async def test_checks_in_flight_at_graceful_stop_are_answered_and_logged_once(
    tmp_path: Path, idp: Idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(policies(idp.jwks))
    authorizer = HeldAuthorizer(
        PolicySet.load(tmp_path / "policies"), Settings(workload_namespace="shop")
    )
    path = tmp_path / "decisions.log"
    log = DecisionLog.open(DecisionLogSettings(str(path)), workload=authorizer.workload)
    server = Server(authorizer, Telemetry(None), listen="127.0.0.1:0", grace=10.0, decision_log=log)
    await server.start()
    # Every case but the unreadable one reaches the authorizer, and is held there.
    cases = [c for c in session_cases(idp) if c.request.attributes.request.HasField("http")] * 4
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            calls = [asyncio.ensure_future(send(stub, c)) for c in cases]
            async with asyncio.timeout(10):
                while authorizer.held < len(cases):
                    await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(server.stop())  # SIGTERM's path, drain 0
            await asyncio.sleep(0.3)
            assert not stopping.done()  # waiting for the checks in flight
            authorizer.release.set()
            answers = await asyncio.gather(*calls)  # each a CheckResponse: no RPC error
            await stopping
    finally:
        authorizer.release.set()
        await server.stop()
    for case, (_, status) in zip(cases, answers, strict=True):
        assert status == case.status, case.name
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["decision_id"] for r in records) == sorted(d for d, _ in answers)
    by_id = {r["decision_id"]: r for r in records}
    for case, (decision_id, status) in zip(cases, answers, strict=True):
        assert (by_id[decision_id]["http_status"], by_id[decision_id]["reason"]) == (
            status,
            case.reason,
        )


# --- the Check path never fails because of the log ----------------------------------------


class BrokenAuthorizer(Authorizer):
    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        raise RuntimeError("boom")


class MemorySink:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        self.closed = True


async def test_even_the_answer_of_last_resort_is_recorded() -> None:
    sink = MemorySink()
    log = DecisionLog(sink)
    server = Server(
        BrokenAuthorizer(PolicySet.empty()),
        Telemetry(None),
        listen="127.0.0.1:0",
        decision_log=log,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            metadata = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
            resp = await stub.Check(check_request("/x"), metadata=metadata, timeout=5)
        assert resp.denied_response.status.code == 503
    finally:
        await server.stop()
    (line,) = sink.lines
    record = json.loads(line)
    assert (record["reason"], record["outcome"], record["http_status"]) == (
        "internal_error",
        "OUTCOME_ERROR",
        503,
    )
    assert record["trace_id"] == TRACE_ID  # from Envoy's traceparent: no span without tracing
    assert "span_id" not in record
    assert sink.closed


class ExplodingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def write(self, lines: list[str]) -> None:
        if self.fail:
            self.fail = False
            raise OSError(28, "No space left on device")
        super().write(lines)


def test_a_failing_sink_loses_its_batch_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = ExplodingSink()
    log = DecisionLog(sink)
    log.record(decision(Outcome.PERMISSION_DENIED, "a"), None, time.time_ns())
    log.start()
    assert log.flush(5)
    log.record(decision(Outcome.PERMISSION_DENIED, "b"), None, time.time_ns())
    assert log.close()
    assert [json.loads(line)["decision_id"] for line in sink.lines] == ["b"]
    counts = log.counts()
    assert (counts["failed", "deny"], counts["written", "deny"]) == (1, 1)
    assert "1 records (1 denies) not written: [Errno 28] No space left on device" in caplog.text


def test_record_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken_workload(inp: CheckInput) -> Any:
        raise RuntimeError("workload lookup failed")

    sink = MemorySink()
    log = DecisionLog(sink, workload=broken_workload)
    log.record(decision(Outcome.ALLOW, "a"), CheckInput(), time.time_ns())
    log.record(None, None, 0)  # type: ignore[arg-type]  # a caller's bug, logged not raised
    assert log.close()
    assert sink.lines == []
    assert log.counts()["failed", "allow"] == 1
    assert "cannot format decision a" in caplog.text
    assert "cannot queue decision" in caplog.text


# --- records: the JSON mapping, masking, trace ids ------------------------------------------


def decision(outcome: Outcome, decision_id: str, **kwargs: Any) -> Decision:
    return Decision(outcome, "r", "m", decision_id, **kwargs)


FULL = Decision(
    Outcome.ALLOW,
    "allowed_by_policy",
    "allowed",
    "d1",
    policy="shop/allow",
    rule="rules[0]",
    audit=("shop/audit",),
    dry_run_allowed=False,
    dry_run_policy="shop/dry",
    spiffe_id="spiffe://td/ns/shop/sa/frontend",
    principal="td/ns/shop/sa/frontend",
    issuer=ISSUER,
    subject="alice",
    policy_revision="rev1",
    token_audience="orders",
    identity_source="xfcc",
    audiences=("orders", "shop"),
    claims=MappingProxyType(
        {"iss": ISSUER, "sub": "alice", "aud": ["orders", "shop"], "exp": 1700000000, "n": 1.5}
    ),
)
INPUT = CheckInput(
    method="POST",
    host="orders.shop",
    path="/orders",
    query="a=1&b",
    scheme="https",
    protocol="HTTP/2",
    headers=MappingProxyType({":path": "/orders?a=1&b", "x-b": "2", "x-a": "1"}),
    request_id="rid",
    source_ip="10.0.0.1",
    source_port=1,
    destination_ip="/run/envoy.sock",
    sni="orders.shop",
    context_extensions=MappingProxyType({"namespace": "shop", "labels": "", "service": "o"}),
)
DENIED = Decision(
    Outcome.PERMISSION_DENIED,
    "no_allow_policy_matched",
    "no ALLOW policy matched",
    "d2",
    deny_response=DenyResponse(418, (), "no", "text/plain"),
)


def workload_of(inp: CheckInput) -> tuple[str | None, str | None, frozenset[tuple[str, str]]]:
    return Authorizer(PolicySet.empty()).workload(inp)


@pytest.mark.parametrize(
    ("decision_", "inp", "workload"),
    [
        (FULL, INPUT, True),
        (FULL, INPUT, False),
        (DENIED, None, True),
        (decision(Outcome.UNAUTHENTICATED, "d3"), CheckInput(), True),
        (decision(Outcome.ERROR, ""), None, False),
    ],
)
def test_lines_are_protobufs_json_mapping_of_decision_record(
    decision_: Decision, inp: CheckInput | None, workload: bool
) -> None:
    """to_dict builds the JSON by hand (for speed): it must be json_format's, key for key."""
    masker = Masker()
    entry = Entry(decision_, inp, 1_700_000_000_123_000_000, 1_700_000_000_123_456_789, None, "", 1)
    line = to_json(to_dict(entry, masker, workload_of if workload else None), masker)
    message = json_format.Parse(line, pb.DecisionRecord())
    canonical = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert json.dumps(json.loads(line), sort_keys=True) == json.dumps(canonical, sort_keys=True)
    assert list(json.loads(line)) == list(canonical)  # fields in number order


def test_a_full_record() -> None:
    entry = Entry(FULL, INPUT, 1_700_000_000_123_000_000, 1_700_000_000_123_456_789, None, "", 0.5)
    record = to_dict(entry, Masker(), workload_of)
    assert record["latency_us"] == 456
    assert record["time"] == "2023-11-14T22:13:20.123Z"
    assert record["outcome"] == "OUTCOME_ALLOW"
    assert record["dry_run"] == {"outcome": "OUTCOME_PERMISSION_DENIED", "policy": "shop/dry"}
    assert record["caller"]["source"] == "xfcc"
    assert record["jwt"] == {
        "issuer": ISSUER,
        "subject": "alice",
        "audiences": ["orders", "shop"],
        "claims": {"exp": 1700000000.0, "n": 1.5},  # iss, sub, aud have their own fields
    }
    assert record["request"]["headers"] == {"x-a": "1", "x-b": "2"}  # sorted, no pseudo
    assert record["request"]["query"] == "a=***&b"
    assert record["request"]["destination"] == {"address": "/run/envoy.sock"}
    assert record["workload"] == {"namespace": "shop", "labels": "", "service": "o"}
    assert record["minted_token_audience"] == "orders"
    assert record["sample_rate"] == 0.5
    assert to_dict(entry._replace(input=None), Masker()).get("request") is None
    assert to_record(entry, Masker()).http_status == 200
    denied = to_dict(entry._replace(decision=DENIED), Masker())
    assert denied["http_status"] == 418  # the policy's denyResponse status


JWT_LIKE = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"


@pytest.mark.parametrize(
    ("name", "value", "written"),
    [
        ("authorization", "Bearer abc", MASK),
        ("Proxy-Authorization", "Basic abc", MASK),
        ("cookie", "a=b", MASK),
        ("set-cookie", "a=b", MASK),
        ("x-forwarded-client-cert", XFCC, MASK),
        ("x-api-key", "k", MASK),  # configured
        ("X-Api-Key", "k", MASK),  # names are case-insensitive
        ("x-token", JWT_LIKE, MASK),  # not configured, but a JWT
        ("x-note", f"see {JWT_LIKE}, thanks", MASK),
        ("x-unsigned", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.", MASK),
        ("x-padded", "eyJhbGc+/=.eyJzdWI=.c2ln==", MASK),
        ("x-plain", "eyJ but no dots", "eyJ but no dots"),
        ("user-agent", "curl/8", "curl/8"),
        ("x-long", "a" * 600, "a" * (MAX_VALUE_CHARS - 3) + "..."),
    ],
)
def test_header_masking(name: str, value: str, written: str) -> None:
    assert Masker(["x-api-key"]).headers({name: value}) == {name: written}


@pytest.mark.parametrize(
    ("claims", "written"),
    [
        ({"email": "a@b"}, {"email": MASK}),
        ({"EMAIL": "a@b"}, {"EMAIL": MASK}),
        ({"nested": {"email": "a@b", "x": 1}}, {"nested": {"email": MASK, "x": 1}}),
        ({"list": [{"email": "a@b"}, "c"]}, {"list": [{"email": MASK}, "c"]}),
        ({"email": {"whole": "object"}}, {"email": MASK}),
        ({"inner_token": JWT_LIKE}, {"inner_token": MASK}),
        (
            {"groups": ["dev", "ops"], "n": 3, "ok": True},
            {"groups": ["dev", "ops"], "n": 3, "ok": True},
        ),
    ],
)
def test_claim_masking(claims: dict[str, Any], written: dict[str, Any]) -> None:
    assert Masker(["email"]).claims(claims) == written


@pytest.mark.parametrize(
    ("query", "written"),
    [
        ("", ""),
        ("a=1", "a=***"),
        ("access_token=secret&page=2&flag", "access_token=***&page=***&flag"),
        ("a==b", "a=***"),
    ],
)
def test_query_values_are_never_written(query: str, written: str) -> None:
    assert Masker().query(query) == written


def test_masked_subject_issuer_and_audience_claims() -> None:
    masker = Masker(["sub", "aud", "iss"])
    record = to_dict(Entry(FULL, None, 0, 0, None, "", 1.0), masker)
    assert record["jwt"]["issuer"] == record["jwt"]["subject"] == MASK
    assert record["jwt"]["audiences"] == [MASK, MASK]


def test_the_last_net_catches_a_jwt_anywhere_in_the_line() -> None:
    inp = CheckInput(path=f"/callback/{JWT_LIKE}/x", host=JWT_LIKE)
    masker = Masker()
    line = to_json(to_dict(Entry(FULL, inp, 0, 0, None, "", 1.0), masker), masker)
    assert "eyJ" not in line
    assert json.loads(line)["request"]["path"] == MASK  # masked whole, before the net
    # The standard base64 alphabet counts too ('/' included): masking too much is the safe side.
    assert masker.line(f'{{"a":"x/{JWT_LIKE}/y","b":1}}') == '{"a":"x/***","b":1}'


def span(sampled_: bool) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled_ else TraceFlags.DEFAULT)
    return SpanContext(int(TRACE_ID, 16), 0xABC, is_remote=False, trace_flags=flags)


@pytest.mark.parametrize(
    ("span_", "traceparent", "ids"),
    [
        (span(True), "", (TRACE_ID, "0000000000000abc")),
        (span(False), "", (TRACE_ID, "")),  # the sampler dropped the span: no span id
        (None, f"00-{TRACE_ID}-00f067aa0ba902b7-01", (TRACE_ID, "")),
        # W3C allows lower-case hex only; the tracer ignores it too, so the log does
        (None, f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", ("", "")),
        (None, "00-00000000000000000000000000000000-00f067aa0ba902b7-01", ("", "")),
        (None, "00-not-hex", ("", "")),
        (None, f"00-{'z' * 32}-00f067aa0ba902b7-01", ("", "")),
        (None, "", ("", "")),
    ],
)
def test_trace_ids(span_: SpanContext | None, traceparent: str, ids: tuple[str, str]) -> None:
    assert trace_ids(span_, traceparent) == ids


@pytest.mark.parametrize(
    "ns", [0, 1, 1_000, 1_000_000, 1_700_000_000_000_000_000, 1_700_000_000_123_456_789]
)
def test_time_is_protobufs_timestamp_json(ns: int) -> None:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    assert rfc3339(ns) == ts.ToJsonString()


# --- sampling ---------------------------------------------------------------------------


IDS = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(2000)]


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_allow_sampling_is_deterministic_and_near_the_rate(rate: float) -> None:
    sink = MemorySink()
    log = DecisionLog(sink, allow_sample_rate=rate, queue_size=10_000)
    for i in IDS:
        log.record(decision(Outcome.ALLOW, i), None, 0)
        log.record(decision(Outcome.PERMISSION_DENIED, f"deny-{i}"), None, 0)
        log.record(decision(Outcome.ERROR, f"error-{i}"), None, 0)
    assert log.close()
    written = [json.loads(line) for line in sink.lines]
    allows = {r["decision_id"] for r in written if r["outcome"] == "OUTCOME_ALLOW"}
    assert len(written) - len(allows) == 2 * len(IDS)  # every deny and error
    assert allows == {i for i in IDS if sampled(i, rate)}  # reproducible from the id alone
    # Binomial: 4 standard deviations (the ids are fixed, so this never flakes).
    assert abs(len(allows) - rate * len(IDS)) <= 4 * (len(IDS) * rate * (1 - rate)) ** 0.5 + 1
    assert {r["sample_rate"] for r in written if r["outcome"] == "OUTCOME_ALLOW"} <= {rate}
    assert log.counts()["sampled_out", "allow"] == len(IDS) - len(allows)


def test_a_kept_id_stays_kept_at_higher_rates() -> None:
    for i in IDS[:200]:
        kept = [sampled(i, r / 20) for r in range(21)]
        assert kept == sorted(kept)  # once in, in for every higher rate


# --- the queue when the sink is slow ------------------------------------------------------


class GatedSink(MemorySink):
    """Blocks in write until released: the writer thread stuck on a slow disk."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write(self, lines: list[str]) -> None:
        self.entered.set()
        assert self.gate.wait(10)
        super().write(lines)


def test_when_the_queue_is_full_allows_are_dropped_and_denies_keep_their_reserve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = GatedSink()
    log = DecisionLog(sink, queue_size=40)  # allows: 30 places, denies: all 40
    log.start()
    log.record(decision(Outcome.ALLOW, "first"), None, 0)
    assert sink.entered.wait(5)  # the writer holds "first" and is stuck
    # None of these calls waits for the stuck writer (it would deadlock this test).
    for i in range(100):
        log.record(decision(Outcome.ALLOW, f"allow-{i}"), None, 0)
    for i in range(15):
        log.record(decision(Outcome.UNAUTHENTICATED, f"deny-{i}"), None, 0)
    counts = log.counts()
    assert (counts["dropped", "allow"], counts["dropped", "deny"]) == (70, 5)
    assert "deny deny-10 (r) not written; 1 denies dropped so far" in caplog.text
    assert "decision log full: 1 allows dropped so far" in caplog.text
    sink.gate.set()
    assert log.close()
    ids = [json.loads(line)["decision_id"] for line in sink.lines]
    assert ids == ["first", *(f"allow-{i}" for i in range(30)), *(f"deny-{i}" for i in range(10))]


def test_a_stuck_sink_costs_shutdown_one_timeout_not_one_per_close() -> None:
    sink = GatedSink()
    log = DecisionLog(sink)
    log.start()
    log.record(decision(Outcome.PERMISSION_DENIED, "stuck"), None, 0)
    assert sink.entered.wait(5)
    assert not log.close(timeout=0.2)
    started = time.monotonic()
    assert not log.close(timeout=5)  # the caller's finally: no second wait
    assert time.monotonic() - started < 1
    sink.gate.set()


def test_an_allow_flood_cannot_push_out_a_deny() -> None:
    sink = GatedSink()
    log = DecisionLog(sink, queue_size=40)
    log.start()
    log.record(decision(Outcome.ALLOW, "first"), None, 0)
    assert sink.entered.wait(5)
    for i in range(1000):
        log.record(decision(Outcome.ALLOW, f"allow-{i}"), None, 0)
        if i % 100 == 0:
            log.record(decision(Outcome.PERMISSION_DENIED, f"deny-{i}"), None, 0)
    sink.gate.set()
    assert log.close()
    written = {json.loads(line)["decision_id"] for line in sink.lines}
    assert {f"deny-{i}" for i in range(0, 1000, 100)} <= written
    assert log.counts()["dropped", "deny"] == 0


def test_close_is_bounded_when_the_sink_hangs(caplog: pytest.LogCaptureFixture) -> None:
    sink = GatedSink()
    log = DecisionLog(sink)
    log.start()
    log.record(decision(Outcome.PERMISSION_DENIED, "stuck"), None, 0)
    assert sink.entered.wait(5)
    assert not log.close(timeout=0.2)
    assert "1 records not written at shutdown" in caplog.text
    log.record(decision(Outcome.PERMISSION_DENIED, "late"), None, 0)  # after close: counted
    assert log.counts()["dropped", "deny"] == 1
    sink.gate.set()
    assert log.flush(5)


# --- rotation ---------------------------------------------------------------------------


def lines_of(n: int, width: int) -> list[str]:
    """``n`` lines of ``width`` bytes with their newline, numbered."""
    return [f"{i:05d}".ljust(width - 1, "x") for i in range(n)]


def numbers(path: Path) -> list[int]:
    return [int(line[:5]) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    ("max_bytes", "width", "n", "backups", "files"),
    [
        # 10 lines fill 1000 bytes exactly: the 11th rotates.
        (1000, 100, 35, 2, {"": range(30, 35), ".1": range(20, 30), ".2": range(10, 20)}),
        (1000, 100, 10, 2, {"": range(10)}),
        (1000, 100, 11, 3, {"": [10], ".1": range(10)}),
        (1050, 100, 21, 5, {"": [20], ".1": range(10, 20), ".2": range(10)}),
        # A line longer than the limit gets a file of its own.
        (50, 100, 3, 5, {"": [2], ".1": [1], ".2": [0]}),
        # No backups: the file starts over.
        (1000, 100, 25, 0, {"": range(20, 25)}),
    ],
)
def test_rotation_at_the_size_boundary(
    tmp_path: Path,
    max_bytes: int,
    width: int,
    n: int,
    backups: int,
    files: dict[str, Any],
) -> None:
    path = tmp_path / "d.log"
    sink = FileSink(path, max_bytes=max_bytes, backups=backups)
    batch = lines_of(n, width)
    sink.write(batch[:7])  # several batches, rotating inside and between them
    for line in batch[7:]:
        sink.write([line])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"d.log{s}" for s in files)
    for suffix, expected in files.items():
        f = tmp_path / f"d.log{suffix}"
        assert numbers(f) == list(expected)
        assert f.stat().st_size <= max(max_bytes, width)


def test_rotation_through_the_log_keeps_every_record(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    settings = DecisionLogSettings(str(path), max_bytes=4000, backups=50)
    log = DecisionLog.open(settings)
    log.start()
    for i in range(300):
        log.record(decision(Outcome.PERMISSION_DENIED, f"{i:04d}"), CheckInput(), 0)
    assert log.close()
    # Oldest first: d.log.N, ..., d.log.1, d.log.
    files = sorted(
        tmp_path.iterdir(), key=lambda p: -int(p.name.removeprefix("d.log").lstrip(".") or 0)
    )
    assert len(files) > 10
    ids = [json.loads(line)["decision_id"] for f in files for line in f.read_text().splitlines()]
    assert ids == [f"{i:04d}" for i in range(300)]
    assert all(f.stat().st_size <= 4000 for f in files)


def test_a_file_moved_away_is_reopened(tmp_path: Path) -> None:
    """An external logrotate (without copytruncate) renames the file: write to a new one."""
    path = tmp_path / "d.log"
    sink = FileSink(path)
    sink.write(["one"])
    os.replace(path, tmp_path / "d.log.old")
    sink.write(["two"])
    path.unlink()
    sink.write(["three"])
    sink.close()
    assert (tmp_path / "d.log.old").read_text() == "one\n"
    assert path.read_text() == "three\n"
    assert path.stat().st_mode & 0o777 == 0o600  # request details: the owner's only


def test_a_truncated_file_is_written_at_its_new_end(tmp_path: Path) -> None:
    """logrotate's copytruncate: the size count follows, so rotation stays at the boundary."""
    path = tmp_path / "d.log"
    sink = FileSink(path, max_bytes=1000, backups=1)
    sink.write(lines_of(9, 100))
    os.truncate(path, 0)
    sink.write(lines_of(10, 100))
    sink.close()
    assert numbers(path) == list(range(10))
    assert not (tmp_path / "d.log.1").exists()


# --- flags and settings -----------------------------------------------------------------


def test_flags_build_the_settings() -> None:
    args = parser().parse_args(
        [
            "serve",
            "--decision-log",
            "/var/log/extauthz/decisions.log",
            "--decision-log-max-bytes",
            "1048576",
            "--decision-log-backups",
            "3",
            "--decision-log-allow-sample-rate",
            "0.1",
            "--decision-log-mask",
            "X-Api-Key",
            "--decision-log-mask",
            "email",
        ]
    )
    assert _settings(args).decision_log == DecisionLogSettings(
        "/var/log/extauthz/decisions.log",
        max_bytes=1048576,
        backups=3,
        allow_sample_rate=0.1,
        mask=frozenset({"x-api-key", "email"}),
    )
    assert _settings(parser().parse_args(["serve"])).decision_log is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--decision-log-mask", "email"], "--decision-log-mask: needs --decision-log PATH"),
        (
            ["--decision-log-max-bytes", "10", "--decision-log-backups", "1"],
            "--decision-log-max-bytes, --decision-log-backups: needs --decision-log PATH",
        ),
        (
            ["--decision-log", "-", "--decision-log-max-bytes", "10"],
            "--decision-log-max-bytes: only a file is rotated, not stdout",
        ),
        (["--decision-log", ""], "--decision-log: expected a file path or -"),
        (["--decision-log", "x", "--decision-log-mask", " "], "expected a header or claim name"),
    ],
)
def test_inconsistent_flags_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(DecisionLogError, match=message) as raised:
        _settings(parser().parse_args(["serve", *argv]))
    assert isinstance(raised.value, ConfigError)
    assert raised.value.reason == "decision_log_invalid"


@pytest.mark.parametrize(
    "argv",
    [
        ["--decision-log-allow-sample-rate", "1.5"],
        ["--decision-log-allow-sample-rate", "nan"],
        ["--decision-log-max-bytes", "-1"],
        ["--decision-log-backups", "x"],
    ],
)
def test_bad_flag_values_stop_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--decision-log", "x", *argv])


def test_an_unopenable_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(DecisionLogError, match=r"--decision-log .*/missing/d.log: cannot open"):
        open_sink(DecisionLogSettings(str(tmp_path / "missing" / "d.log")))
    with pytest.raises(DecisionLogError, match="is a directory"):
        open_sink(DecisionLogSettings(str(tmp_path)))


def test_the_cli_reports_a_bad_decision_log_path(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--decision-log",
            str(tmp_path / "missing" / "d.log"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        check=False,
    )
    assert result.returncode == 1
    assert f"error: --decision-log {tmp_path}/missing/d.log: cannot open" in result.stderr


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = DecisionLog.open(DecisionLogSettings("-"))
    log.start()
    log.record(decision(Outcome.PERMISSION_DENIED, "to-stdout"), None, 0)
    assert log.close()
    (line,) = capsys.readouterr().out.splitlines()
    assert json_format.Parse(line, pb.DecisionRecord()).decision_id == "to-stdout"


def test_records_are_counted_as_a_metric() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from otel_helpers import points

    reader = InMemoryMetricReader()
    log = DecisionLog(MemorySink(), allow_sample_rate=0.0, meter_provider=MeterProvider([reader]))
    log.record(decision(Outcome.ALLOW, "a"), None, 0)
    log.record(decision(Outcome.PERMISSION_DENIED, "b"), None, 0)
    assert log.close()
    got = points(reader, "extauthz.decision_log.records")
    assert got[frozenset({("result", "sampled_out"), ("decision", "allow")})] == 1
    assert got[frozenset({("result", "written"), ("decision", "deny")})] == 1


def test_the_server_counts_records_with_its_own_meters(tmp_path: Path) -> None:
    """serve wires the log to the telemetry's MeterProvider, never the global no-op one."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from otel_helpers import points

    from extauthz.cli import open_decision_log
    from extauthz.telemetry import Telemetry

    reader = InMemoryMetricReader()
    settings = Settings(decision_log=DecisionLogSettings(str(tmp_path / "log.jsonl")))
    log = open_decision_log(
        settings, Authorizer(PolicySet.empty()), Telemetry(None, MeterProvider([reader]))
    )
    assert log is not None
    log.record(decision(Outcome.PERMISSION_DENIED, "b"), None, 0)
    assert log.close()
    assert log.close()  # a second close (at exit) is harmless
    got = points(reader, "extauthz.decision_log.records")
    assert got[frozenset({("result", "written"), ("decision", "deny")})] == 1


# --- generated code ---------------------------------------------------------------------


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


def test_logging_is_quiet_on_the_happy_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="extauthz.decisionlog")
    log = DecisionLog(MemorySink())
    log.start()
    log.record(decision(Outcome.ALLOW, "a"), INPUT, 0)
    assert log.close()
    assert [r for r in caplog.records if r.name.startswith("extauthz")] == []
