"""Telemetry configuration the OpenTelemetry way, real OTLP export, and a dead collector."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from extauthz.decision import Decision, Outcome
from extauthz.devtools.envoy import free_port
from extauthz.errors import ConfigError
from extauthz.request import CheckInput
from extauthz.telemetry import Telemetry

DECISION = Decision(
    Outcome.ALLOW, "no_allow_policy", "allowed", "ab" * 16, spiffe_id="spiffe://td/x"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, True),  # OTLP by default
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, True),
        ({"OTEL_SDK_DISABLED": "true"}, False),
    ],
    ids=["default", "none", "console", "two", "http", "grpc", "disabled"],
)
def test_exporters_from_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], enabled: bool
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    telemetry = Telemetry.from_env()
    assert (telemetry.provider is not None) is enabled
    assert telemetry.shutdown(timeout=5)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin", "unsupported exporter 'zipkin'"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "unsupported protocol 'http/json'"),
    ],
)
def test_bad_exporter_config_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=fragment):
        Telemetry.from_env()


def test_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    default = Telemetry.from_env()
    assert default.provider is not None
    assert default.provider.resource.attributes["service.name"] == "extauthz"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-eu")
    named = Telemetry.from_env()
    assert named.provider is not None
    assert named.provider.resource.attributes["service.name"] == "authz-eu"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_default_otlp_exporter_delivers_the_span(
    monkeypatch: pytest.MonkeyPatch, collector: tuple[Collector, int]
) -> None:
    servicer, port = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    telemetry = Telemetry.from_env()
    telemetry.record(DECISION, CheckInput(method="GET", path="/a"), time.time_ns())
    assert telemetry.shutdown(timeout=10)
    spans = [
        span
        for req in servicer.requests
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert [s.name for s in spans] == ["extauthz.check"]
    attrs = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attrs["extauthz.decision"] == "allow"
    assert attrs["extauthz.source.spiffe_id"] == "spiffe://td/x"
    assert attrs["url.path"] == "/a"


def test_dead_collector_never_delays_a_decision_or_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    telemetry = Telemetry.from_env()
    start = time.monotonic()
    for _ in range(500):
        telemetry.record(DECISION, None, time.time_ns())
    recording = time.monotonic() - start
    start = time.monotonic()
    flushed = telemetry.shutdown(timeout=1.0)
    stopping = time.monotonic() - start
    # Loose bounds: a blocking export would take the exporter's 10 s timeout per batch.
    assert recording < 5.0
    assert stopping < 5.0
    assert flushed is False  # the spans could not be delivered, and we did not wait for them
