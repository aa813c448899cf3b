"""The gRPC transport in-process: Check, health, reflection, Unix sockets, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.decision import Decision
from extauthz.policy.engine import PolicySet, WorkloadPolicies
from extauthz.request import CheckInput
from extauthz.server import AUTHORIZATION_SERVICE, Server
from extauthz.telemetry import SPAN_NAME, Telemetry

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class BrokenAuthorizer(Authorizer):
    """Breaks the Authorizer's never-raise contract: the servicer's own net must hold."""

    def check(self, inp: CheckInput) -> Decision:
        raise RuntimeError("boom")

    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        raise RuntimeError("boom")


class ExplodingPolicies(PolicySet):
    """A policy set whose lookup fails: stands in for any bug on the decision path."""

    def for_workload(self, namespace: str | None, labels: str | None) -> WorkloadPolicies:
        raise RuntimeError("boom")


def check_request(principal: str = "spiffe://td/ns/a/sa/b", path: str = "/x") -> object:
    req = external_auth_pb2.CheckRequest()
    req.attributes.source.principal = principal
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "svc", path
    return req


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    return InMemorySpanExporter()


async def _started(authorizer: Authorizer, telemetry: Telemetry, listen: str) -> Server:
    server = Server(authorizer, telemetry, listen=listen, grace=1.0)
    await server.start()
    return server


@pytest.fixture
async def served(spans: InMemorySpanExporter) -> AsyncIterator[tuple[Server, str]]:
    telemetry = Telemetry.from_env(extra=[SimpleSpanProcessor(spans)])
    server = await _started(Authorizer(PolicySet.empty()), telemetry, "127.0.0.1:0")
    yield server, f"127.0.0.1:{server.port}"
    await server.stop()


async def _check(target: str, request: object, metadata: Mapping[str, str] | None = None) -> object:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return await stub.Check(request, metadata=tuple((metadata or {}).items()), timeout=5)


async def test_check_allows_and_records_a_span(
    served: tuple[Server, str], spans: InMemorySpanExporter
) -> None:
    _, target = served
    resp = await _check(
        target,
        check_request(path="/x?secret=1"),
        {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"},
    )
    assert resp.status.code == 0  # type: ignore[attr-defined]
    assert resp.HasField("ok_response")  # type: ignore[attr-defined]
    (span,) = spans.get_finished_spans()
    assert span.name == SPAN_NAME
    assert format(span.context.trace_id, "032x") == TRACE_ID  # joined Envoy's trace
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT_SPAN
    attrs = dict(span.attributes or {})
    assert attrs["extauthz.decision"] == "allow"
    assert attrs["extauthz.reason"] == "no_allow_policy"
    assert attrs["extauthz.source.principal"] == "td/ns/a/sa/b"
    assert attrs["url.path"] == "/x"  # never the query
    assert not any("secret" in str(v) for v in attrs.values())


async def test_invalid_request_is_answered_with_a_deny(served: tuple[Server, str]) -> None:
    _, target = served
    resp = await _check(target, external_auth_pb2.CheckRequest())
    assert resp.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]  # type: ignore[attr-defined]
    assert resp.denied_response.status.code == 403  # type: ignore[attr-defined]


async def _answer_once(authorizer: Authorizer, telemetry: Telemetry) -> Any:
    """Start a server with ``authorizer``, send one Check, stop it."""
    server = await _started(authorizer, telemetry, "127.0.0.1:0")
    try:
        return await _check(f"127.0.0.1:{server.port}", check_request())
    finally:
        await server.stop()


async def test_internal_error_is_a_503_deny_not_an_rpc_error(spans: InMemorySpanExporter) -> None:
    telemetry = Telemetry.from_env(extra=[SimpleSpanProcessor(spans)])
    policies = ExplodingPolicies((), (), PolicySet.empty().source)
    resp = await _answer_once(Authorizer(policies), telemetry)
    assert resp.status.code == grpc.StatusCode.UNAVAILABLE.value[0]  # type: ignore[attr-defined]
    assert resp.denied_response.status.code == 503  # type: ignore[attr-defined]
    assert b"boom" not in resp.denied_response.body.encode()  # type: ignore[attr-defined]
    (span,) = spans.get_finished_spans()
    assert span.status.status_code.name == "ERROR"


async def test_health_and_reflection(served: tuple[Server, str]) -> None:
    _server, target = served
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", AUTHORIZATION_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {s.name for s in answer.list_services_response.service}
            break
    assert {AUTHORIZATION_SERVICE, "grpc.health.v1.Health"} <= names


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "extauthz.sock"
    server = await _started(Authorizer(PolicySet.empty()), Telemetry(None), f"unix:{sock}")
    try:
        resp = await _check(f"unix:{sock}", check_request())
        assert resp.status.code == 0  # type: ignore[attr-defined]
    finally:
        await server.stop()


async def test_servicer_last_resort_when_the_authorizer_raises() -> None:
    resp = await _answer_once(BrokenAuthorizer(PolicySet.empty()), Telemetry(None))
    assert resp.status.code == grpc.StatusCode.UNAVAILABLE.value[0]  # type: ignore[attr-defined]
    assert resp.denied_response.status.code == 503  # type: ignore[attr-defined]


async def test_stop_closes_the_port() -> None:
    server = await _started(Authorizer(PolicySet.empty()), Telemetry(None), "127.0.0.1:0")
    target = f"127.0.0.1:{server.port}"
    await server.stop()
    with pytest.raises(grpc.aio.AioRpcError):
        await _check(target, check_request())


class WaitingAuthorizer(Authorizer):
    """Decides only when released, so a Check can be observed in flight."""

    def __init__(self) -> None:
        super().__init__(PolicySet.empty())
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        self.entered.set()
        await self.release.wait()
        return self.check(inp)


async def test_checks_in_flight_are_counted_and_released() -> None:
    authorizer = WaitingAuthorizer()
    telemetry = Telemetry(None)
    server = await _started(authorizer, telemetry, "127.0.0.1:0")
    try:
        pending = asyncio.ensure_future(_check(f"127.0.0.1:{server.port}", check_request()))
        await asyncio.wait_for(authorizer.entered.wait(), 5)
        assert telemetry.in_flight == 1
        authorizer.release.set()
        await pending
        assert telemetry.in_flight == 0
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("authorizer", "request_", "counted"),
    [
        (lambda: Authorizer(PolicySet.empty()), check_request, ("allow", "no_allow_policy")),
        (
            lambda: Authorizer(PolicySet.empty()),
            external_auth_pb2.CheckRequest,
            ("permission_denied", "request_invalid"),
        ),
        (lambda: BrokenAuthorizer(PolicySet.empty()), check_request, ("error", "internal_error")),
    ],
    ids=["allow", "invalid-request", "last-resort"],
)
async def test_every_answer_is_counted(
    authorizer: Any, request_: Any, counted: tuple[str, str]
) -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, MeterProvider(metric_readers=[reader]))
    server = await _started(authorizer(), telemetry, "127.0.0.1:0")
    try:
        await _check(f"127.0.0.1:{server.port}", request_())
    finally:
        await server.stop()
    result, reason = counted
    assert points(reader, "extauthz.decisions") == {
        frozenset({("result", result), ("reason", reason)}): 1
    }
