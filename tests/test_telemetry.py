"""Telemetry configured the OpenTelemetry way: exporters, sampler, metrics (OTLP and the
Prometheus endpoint), real OTLP export to a local collector, and a dead collector."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, SamplingResult
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Decision, Outcome
from extauthz.devtools.collector import Collector
from extauthz.devtools.envoy import free_port
from extauthz.errors import ConfigError
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.telemetry import DURATION_BUCKETS, SPAN_NAME, Telemetry, span_attributes

DECISION = Decision(
    Outcome.ALLOW, "no_allow_policy", "allowed", "ab" * 16, spiffe_id="spiffe://td/x"
)
DENY = Decision(
    Outcome.PERMISSION_DENIED, "no_allow_policy_matched", "no", "cd" * 16, namespace="shop"
)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED = (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),)
UNSAMPLED = (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-00"),)
OTEL_VARIABLES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_PROMETHEUS_HOST",
    "OTEL_EXPORTER_PROMETHEUS_PORT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_PROPAGATORS",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """A live collector, and every OTLP exporter pointed at it."""
    with Collector() as c:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", c.endpoint)
        yield c


@pytest.mark.parametrize(
    ("env", "tracing", "metrics"),
    [
        ({}, True, True),  # OTLP for both by default
        ({"OTEL_TRACES_EXPORTER": "none"}, False, False),  # metrics follow the traces
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "otlp"}, False, True),
        ({"OTEL_METRICS_EXPORTER": "none"}, True, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True, False),
        ({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_METRICS_EXPORTER": "console"}, True, True),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, True, True),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}, True, True),
        ({"OTEL_SDK_DISABLED": "true"}, False, False),
    ],
    ids=[
        "default",
        "none",
        "metrics-only",
        "traces-only",
        "console",
        "two",
        "http",
        "grpc",
        "metrics-http",
        "disabled",
    ],
)
def test_exporters_from_env(
    monkeypatch: pytest.MonkeyPatch,
    collector: Collector,
    env: dict[str, str],
    tracing: bool,
    metrics: bool,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "http" in "".join(env.values()):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    telemetry = Telemetry.from_env()
    assert (telemetry.provider is not None) is tracing
    assert (telemetry.meter_provider is not None) is metrics
    telemetry.shutdown(timeout=5)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unsupported exporter 'zipkin'"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "unsupported protocol 'http/json'"),
        ({"OTEL_METRICS_EXPORTER": "statsd"}, "OTEL_METRICS_EXPORTER: unsupported exporter"),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "udp"}, "unsupported protocol 'udp'"),
        ({"OTEL_PROPAGATORS": "xray"}, "unknown propagator 'xray'"),
        (
            {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "port"},
            "OTEL_EXPORTER_PROMETHEUS_HOST:PORT 'localhost:port': expected HOST:PORT",
        ),
    ],
    ids=["traces", "protocol", "metrics", "metrics-protocol", "propagator", "prometheus-port"],
)
def test_bad_config_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=fragment):
        Telemetry.from_env()


@pytest.mark.parametrize("listen", ["9464", "host:", ":9464", "127.0.0.1:99999"])
def test_bad_metrics_listen_is_refused(monkeypatch: pytest.MonkeyPatch, listen: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    with pytest.raises(ConfigError, match=r"--metrics-listen.*expected HOST:PORT"):
        Telemetry.from_env(metrics_listen=listen)


def test_metrics_listen_on_a_taken_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    first = Telemetry.from_env(metrics_listen="127.0.0.1:0")
    assert first.metrics_server is not None
    try:
        with pytest.raises(ConfigError, match="cannot bind"):
            Telemetry.from_env(metrics_listen=f"127.0.0.1:{first.metrics_server.port}")
    finally:
        first.shutdown()


def test_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    default = Telemetry.from_env()
    assert default.provider is not None
    assert default.provider.resource.attributes["service.name"] == "extauthz"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-eu")
    named = Telemetry.from_env()
    assert named.provider is not None
    assert named.provider.resource.attributes["service.name"] == "authz-eu"


def _traced(monkeypatch: pytest.MonkeyPatch) -> tuple[Telemetry, InMemorySpanExporter]:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    spans = InMemorySpanExporter()
    return Telemetry.from_env(extra=[SimpleSpanProcessor(spans)]), spans


@pytest.mark.parametrize(
    ("sampler", "arg", "metadata", "recorded"),
    [
        (None, None, SAMPLED, True),  # parentbased_always_on: Envoy sampled it
        (None, None, UNSAMPLED, False),  # ... Envoy did not
        (None, None, (), True),  # no parent: a root, sampled
        ("always_on", None, UNSAMPLED, True),
        ("always_off", None, SAMPLED, False),
        ("traceidratio", "0", SAMPLED, False),
        ("traceidratio", "1", UNSAMPLED, True),
        ("parentbased_traceidratio", "0", (), False),
        ("parentbased_traceidratio", "0", SAMPLED, True),
    ],
)
def test_the_sampler_comes_from_otel_traces_sampler(
    monkeypatch: pytest.MonkeyPatch,
    sampler: str | None,
    arg: str | None,
    metadata: Sequence[tuple[str, str]],
    recorded: bool,
) -> None:
    if sampler is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    telemetry, spans = _traced(monkeypatch)
    telemetry.record(
        DECISION, CheckInput(method="GET", path="/a"), time.perf_counter_ns(), metadata
    )
    assert len(spans.get_finished_spans()) == int(recorded)


def test_the_span_joins_the_parent_and_times_the_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    telemetry, spans = _traced(monkeypatch)
    started = time.perf_counter_ns()
    time.sleep(0.01)
    before = time.time_ns()
    telemetry.record(DENY, CheckInput(method="POST", path="/p", host="h"), started, SAMPLED)
    (span,) = spans.get_finished_spans()
    assert span.name == SPAN_NAME
    assert format(span.context.trace_id, "032x") == TRACE
    assert span.parent is not None
    assert span.parent.is_remote
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time >= before
    assert span.end_time - span.start_time >= 10_000_000
    assert span.status.status_code.name == "UNSET"
    assert dict(span.attributes or {})["extauthz.workload.namespace"] == "shop"


def test_an_error_decision_sets_the_span_status(monkeypatch: pytest.MonkeyPatch) -> None:
    telemetry, spans = _traced(monkeypatch)
    error = Decision(Outcome.ERROR, "internal_error", "failed", "ef" * 16)
    telemetry.record(error, None, time.perf_counter_ns())
    (span,) = spans.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.status.description == "internal_error"


def test_attribute_value_length_limit_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8")
    telemetry, spans = _traced(monkeypatch)
    telemetry.record(DECISION, CheckInput(path="/" + "x" * 100), time.perf_counter_ns())
    (span,) = spans.get_finished_spans()
    assert dict(span.attributes or {})["url.path"] == "/xxxxxxx"


@pytest.mark.parametrize(
    ("decision", "inp", "expected"),
    [
        (
            Decision(
                Outcome.ALLOW,
                "allowed_by_policy",
                "allowed",
                "ab" * 16,
                policy="shop/orders",
                rule="rules[1]",
                audit=("shop/audit",),
                dry_run_allowed=False,
                dry_run_policy="shop/lockdown",
                spiffe_id="spiffe://demo.local/ns/shop/sa/frontend",
                principal="demo.local/ns/shop/sa/frontend",
                issuer="https://idp",
                subject="alice",
                audiences=("shop",),
                policy_revision="r1",
                token_audience="orders",
                namespace="shop",
            ),
            CheckInput(method="GET", host="orders.shop", path="/orders/1", request_id="req-1"),
            {
                "extauthz.decision": "allow",
                "extauthz.reason": "allowed_by_policy",
                "extauthz.decision_id": "ab" * 16,
                "extauthz.policy": "shop/orders",
                "extauthz.rule": "rules[1]",
                "extauthz.policy_revision": "r1",
                "extauthz.workload.namespace": "shop",
                "extauthz.source.spiffe_id": "spiffe://demo.local/ns/shop/sa/frontend",
                "extauthz.source.principal": "demo.local/ns/shop/sa/frontend",
                "extauthz.jwt.issuer": "https://idp",
                "extauthz.jwt.subject": "alice",
                "extauthz.jwt.audience": ["shop"],
                "extauthz.token.audience": "orders",
                "extauthz.audit.policies": ["shop/audit"],
                "extauthz.dry_run.decision": "deny",
                "extauthz.dry_run.policy": "shop/lockdown",
                "http.request.method": "GET",
                "server.address": "orders.shop",
                "url.path": "/orders/1",
                "extauthz.request_id": "req-1",
            },
        ),
        (
            Decision(Outcome.PERMISSION_DENIED, "request_invalid", "bad", "cd" * 16),
            None,
            {
                "extauthz.decision": "permission_denied",
                "extauthz.reason": "request_invalid",
                "extauthz.decision_id": "cd" * 16,
            },
        ),
    ],
    ids=["everything", "nothing-known"],
)
def test_span_attributes(
    decision: Decision, inp: CheckInput | None, expected: dict[str, Any]
) -> None:
    assert span_attributes(decision, inp) == expected


def _metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def test_decisions_duration_and_in_flight_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    reader = InMemoryMetricReader()
    telemetry = Telemetry.from_env(metric_readers=[reader])
    allow = Decision(Outcome.ALLOW, "allowed_by_policy", "ok", "ab" * 16, policy="shop/orders")
    started = time.perf_counter_ns() - 300_000  # 300 µs ago
    for decision in (allow, allow, DENY):
        telemetry.record(decision, None, started)
    telemetry.in_flight = 2
    assert points(reader, "extauthz.decisions") == {
        frozenset(
            {("result", "allow"), ("reason", "allowed_by_policy"), ("policy", "shop/orders")}
        ): 2,
        frozenset({("result", "permission_denied"), ("reason", "no_allow_policy_matched")}): 1,
    }
    assert points(reader, "extauthz.checks.in_flight") == {frozenset(): 2}
    duration = _metrics(reader)["extauthz.decision.duration"]
    assert duration.unit == "s"
    by_result = {p.attributes["result"]: p for p in duration.data.data_points}
    assert by_result.keys() == {"allow", "permission_denied"}
    allowed = by_result["allow"]
    assert allowed.count == 2
    assert tuple(allowed.explicit_bounds) == DURATION_BUCKETS
    assert 0.0003 <= allowed.min < 0.1  # seconds, not nanoseconds
    # 300 µs lands in the (250 µs, 500 µs] bucket.
    assert allowed.bucket_counts[DURATION_BUCKETS.index(0.0005)] == 2
    assert telemetry.shutdown(timeout=5)


def test_prometheus_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    telemetry = Telemetry.from_env(metrics_listen="127.0.0.1:0")
    assert telemetry.metrics_server is not None
    port = telemetry.metrics_server.port
    telemetry.record(DENY, None, time.perf_counter_ns())
    telemetry.record_reload(ok=True)
    url = f"http://127.0.0.1:{port}/metrics"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        text = response.read().decode()
    lines = text.splitlines()
    decisions = [line for line in lines if line.startswith("extauthz_decisions_total{")]
    assert len(decisions) == 1
    assert 'result="permission_denied"' in decisions[0]
    assert 'reason="no_allow_policy_matched"' in decisions[0]
    assert decisions[0].endswith(" 1.0")
    assert any(line.startswith("extauthz_decision_duration_seconds_bucket{") for line in lines)
    assert any(line.startswith("extauthz_checks_in_flight") for line in lines)
    assert any(line.startswith("extauthz_policy_reloads_total{") for line in lines)
    assert any(line.startswith("process_cpu_seconds_total") for line in lines)
    assert telemetry.shutdown()
    with pytest.raises(urllib.error.URLError, match="refused"):
        opener.open(url, timeout=2)


def test_otel_metrics_exporter_prometheus_uses_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    telemetry = Telemetry.from_env()
    try:
        assert telemetry.metrics_server is not None
        assert telemetry.metrics_server.port == port
    finally:
        telemetry.shutdown()


def test_otlp_export_delivers_span_and_metrics(collector: Collector) -> None:
    telemetry = Telemetry.from_env()
    telemetry.record(DECISION, CheckInput(method="GET", path="/a"), time.perf_counter_ns(), SAMPLED)
    assert telemetry.shutdown(timeout=10)
    spans = [r.item for r in collector.spans()]
    assert [s.name for s in spans] == ["extauthz.check"]
    assert spans[0].trace_id.hex() == TRACE
    attrs = {a.key: a.value.string_value for a in spans[0].attributes}
    assert attrs["extauthz.decision"] == "allow"
    assert attrs["extauthz.source.spiffe_id"] == "spiffe://td/x"
    assert attrs["url.path"] == "/a"
    (decisions,) = [r.item for r in collector.metrics() if r.item.name == "extauthz.decisions"]
    ((point),) = decisions.sum.data_points
    assert point.as_int == 1
    assert {a.key: a.value.string_value for a in point.attributes} == {
        "result": "allow",
        "reason": "no_allow_policy",
    }


def test_dead_collector_never_delays_a_decision_or_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    telemetry = Telemetry.from_env()
    start = time.monotonic()
    for _ in range(5000):
        telemetry.record(DECISION, None, time.perf_counter_ns())
    recording = time.monotonic() - start
    start = time.monotonic()
    flushed = telemetry.shutdown(timeout=1.0)
    stopping = time.monotonic() - start
    # Loose bounds: a blocking export would take the exporter's 10 s timeout per batch.
    assert recording < 5.0
    assert stopping < 3.0
    assert flushed is False  # spans and metrics could not be delivered; we did not wait


class StuckExporter(SpanExporter):
    """A collector that never answers: export blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class CountingSampler(Sampler):
    """ALWAYS_ON, counting the spans telemetry started to build."""

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.calls += 1
        return ALWAYS_ON.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "counting"


def test_no_span_is_built_while_the_export_queue_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "16")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    sampler = CountingSampler()
    telemetry = Telemetry(TracerProvider(sampler=sampler, shutdown_on_exit=False))
    stuck = StuckExporter()
    telemetry.add_exporter(stuck)
    for _ in range(1000):
        telemetry.record(DECISION, None, time.perf_counter_ns())
    # The queue (16) plus the batch the stuck exporter holds (8), not 1000.
    assert sampler.calls <= 16 + 8
    stuck.release.set()
    deadline = time.monotonic() + 10
    while stuck.exported < sampler.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    before = sampler.calls
    telemetry.record(DECISION, None, time.perf_counter_ns())
    assert sampler.calls == before + 1  # drained: spans are built again
    assert telemetry.shutdown(timeout=5)
    assert stuck.exported == before + 1


@pytest.mark.parametrize(
    ("principal", "reason", "spiffe_id"),
    [
        # The caller is known; what failed was its trust domain: the span says who it was.
        (
            "spiffe://other.td/ns/a/sa/b",
            "spiffe_trust_domain_untrusted",
            "spiffe://other.td/ns/a/sa/b",
        ),
        # The caller's identity itself is what failed: nothing to say about it.
        ("spiffe://td/ns/a/sa/b/../c", "spiffe_id_invalid", ""),
    ],
    ids=["untrusted", "malformed"],
)
def test_a_refusal_keeps_the_workload_and_a_caller_it_knows(
    principal: str, reason: str, spiffe_id: str
) -> None:
    authorizer = Authorizer(PolicySet.empty(), Settings(trust_domains=frozenset({"td"})))
    inp = CheckInput(
        method="GET",
        path="/",
        source_principal=principal,
        context_extensions=MappingProxyType({"namespace": "shop"}),
    )
    decision = authorizer.check(inp)
    assert (decision.outcome, decision.reason) == (Outcome.UNAUTHENTICATED, reason)
    assert decision.namespace == "shop"
    assert decision.spiffe_id == spiffe_id
    attrs = span_attributes(decision, inp)
    assert attrs["extauthz.workload.namespace"] == "shop"
    assert attrs.get("extauthz.source.spiffe_id", "") == spiffe_id


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "abc"}, "OTEL_BSP_MAX_QUEUE_SIZE='abc'"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE='0'"),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "16", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32"},
            "is larger than OTEL_BSP_MAX_QUEUE_SIZE=16",
        ),
    ],
)
def test_bad_span_queue_settings_are_config_errors(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Telemetry.from_env()
