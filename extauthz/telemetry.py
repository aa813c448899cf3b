"""OpenTelemetry: one span per decision and extauthz's metrics, configured the OpenTelemetry way.

Traces: exporters from ``OTEL_TRACES_EXPORTER`` (``otlp`` by default, ``console``, ``none``; a
comma-separated list), the OTLP protocol from ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` by default, or ``http/protobuf``), the sampler from
``OTEL_TRACES_SAMPLER``/``_ARG`` (the SDK's default, ``parentbased_always_on``, follows
Envoy's sampling decision), the parent from ``OTEL_PROPAGATORS`` (:mod:`.propagation`),
endpoints and resource from their standard variables. Spans leave through a
BatchSpanProcessor: a slow or dead collector drops spans, it never delays a decision.

Metrics: ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console``, ``prometheus``, ``none``; by default
``otlp`` when the traces go to OTLP, else ``none``) and, with ``--metrics-listen``, a
Prometheus scrape endpoint. Collection and export run in their own threads.

The span is recorded after the decision with its real start time, so telemetry observes the
pipeline instead of wrapping it: a telemetry failure cannot change an answer. It is built as
a finished span directly instead of through ``Tracer.start_span``/``end``, which validate
and copy every attribute again (38 µs per span against 8 µs; extauthz's attributes are
strings it made itself), and not at all while every export queue is full.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from . import __version__
from .config import host_port
from .decision import Decision, Outcome
from .errors import ConfigError
from .identity.jwks import KeySetRegistry
from .identity.jwt import TOKEN_CACHE_TOTALS
from .propagation import Parent, propagators_from_env
from .request import CheckInput

log = logging.getLogger(__name__)

SPAN_NAME = "extauthz.check"
# Seconds. A decision takes tens of µs to a few ms; waiting for a JWKS refetch, up to
# Envoy's deadline (250 ms in envoy/sidecar.yaml).
DURATION_BUCKETS = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
DEFAULT_PROMETHEUS = ("localhost", "9464")  # OTEL_EXPORTER_PROMETHEUS_HOST / _PORT defaults

_ROOT = Context()  # parent of a span with no remote parent (never the ambient context)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_RESULT = {o: {"result": o.value} for o in Outcome}


OTLP_PROTO_FIX = "pip install --force-reinstall --no-deps opentelemetry-proto"


def _check_otlp_protos() -> None:
    """Fail fast if xds-protos overwrote opentelemetry-proto (grpc/grpc#42926)."""
    try:
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the OTLP exporter cannot load: the opentelemetry-proto files were overwritten by "
            "xds-protos' stale copy (grpc/grpc#42926). Run "
            f"'{OTLP_PROTO_FIX}' (make install does), or set OTEL_TRACES_EXPORTER=none "
            "and OTEL_METRICS_EXPORTER=none"
        ) from None


def _protocol(signal: str) -> str:
    return os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    )


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    protocol = _protocol("TRACES")
    _check_otlp_protos()
    if protocol == "grpc":
        from .otlp import SpanExporter as GrpcExporter

        exporter: SpanExporter = GrpcExporter()
        return exporter
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")


def _metric_exporter(name: str) -> MetricExporter | None:
    """The exporter a periodic reader pushes to; None for ``none`` and ``prometheus``."""
    if name in ("none", "prometheus"):
        return None
    if name == "console":
        return ConsoleMetricExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r}")
    protocol = _protocol("METRICS")
    _check_otlp_protos()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter: MetricExporter = OTLPMetricExporter()
        return exporter
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")


def _names(variable: str, default: str) -> list[str]:
    return [n.strip().lower() for n in os.environ.get(variable, default).split(",") if n.strip()]


class MetricsServer:
    """The Prometheus scrape endpoint (``--metrics-listen``): ``GET /metrics``, text format.

    Its own registry, so only this provider's metrics (and the process's) are on it.
    """

    def __init__(self, listen: str, what: str = "--metrics-listen") -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        host, port = host_port(listen, what)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.reader: MetricReader = PrometheusMetricReader(registry=registry)
        try:
            self._httpd, _ = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"{what} {listen}: cannot bind: {exc}") from exc
        self.port: int = self._httpd.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _span_queue_size() -> int:
    """``OTEL_BSP_MAX_QUEUE_SIZE`` (2048), checked as the SDK would fail on it, but by name."""
    sizes = []
    for name, default in (
        ("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
    ):
        text = os.environ.get(name, str(default))
        if not text.isdigit() or int(text) <= 0:
            raise ConfigError(f"{name}={text!r}: expected a whole number > 0")
        sizes.append(int(text))
    queue, batch = sizes
    if batch > queue:
        raise ConfigError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch} is larger than OTEL_BSP_MAX_QUEUE_SIZE={queue}"
        )
    return queue


class _Backlog(SpanExporter):
    """Counts the spans waiting in a BatchSpanProcessor's queue, by wrapping its exporter.

    When the queue is full (a dead or slow collector), a span built now could only be
    dropped; telemetry then builds none, so a dead collector costs nothing per Check.
    """

    def __init__(self, exporter: SpanExporter, capacity: int) -> None:
        self.exporter = exporter
        self.capacity = capacity
        self.waiting = 0
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.waiting >= self.capacity

    def added(self) -> None:
        with self._lock:
            # At capacity the processor drops one for each it takes: the count stays.
            self.waiting = min(self.waiting + 1, self.capacity)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.waiting = max(0, self.waiting - len(spans))
        return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class Telemetry:
    """Records decisions as spans and metrics. ``Telemetry(None)`` records no span.

    Metrics go to ``meter_provider`` (default: the global one, a no-op until an SDK
    MeterProvider is installed). ``in_flight`` is the number of Checks being decided: the
    servicer keeps it, the ``extauthz.checks.in_flight`` metric reports it.
    """

    def __init__(
        self,
        provider: TracerProvider | None,
        meter_provider: MeterProvider | None = None,
        *,
        propagators: Sequence[TextMapPropagator] | None = None,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.provider = provider
        self.meter_provider = meter_provider
        self.metrics_server = metrics_server
        self.in_flight = 0
        # Only providers built by from_env are shut down by shutdown().
        self._owned_meter_provider: SdkMeterProvider | None = None
        self._processors: list[SpanProcessor] = []
        self._backlogs: list[_Backlog] = []
        self._parent = (
            Parent(propagators_from_env() if propagators is None else propagators)
            if provider is not None
            else None
        )
        self._scope = InstrumentationScope("extauthz", __version__)
        self._value_limit = SpanLimits().max_span_attribute_length
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("extauthz", __version__)
        # Counted here and observed at collection: the SDK's Counter.add validates and hashes
        # its attributes on every call (13 µs), a dict increment costs 0.2 µs.
        self._decision_counts: dict[tuple[str, str, str], int] = {}
        meter.create_observable_counter(
            "extauthz.decisions",
            callbacks=[self._decisions],
            unit="{decision}",
            description="decisions, by result (allow, unauthenticated, permission_denied, "
            "error), reason and deciding policy",
        )
        self._duration = meter.create_histogram(
            "extauthz.decision.duration",
            unit="s",
            description="time from a Check's arrival to its answer, by result",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "extauthz.checks.in_flight",
            callbacks=[self._checks_in_flight],
            unit="{check}",
            description="Checks being decided",
        )
        # Counted in a dict and observed at export, as the decisions are: Counter.add costs
        # ~14 µs per Check. Changed verdicts are logged at most once a second.
        self._dry_run_counts: dict[tuple[str, str, str, bool], int] = {}
        self._dry_run_logged = -1.0
        self._dry_run_unlogged = 0
        meter.create_observable_counter(
            "extauthz.dry_run.decisions",
            callbacks=[self._dry_runs],
            description="decisions with dry-run policies, by what enforcing them would change",
        )
        self._reloads = meter.create_counter(
            "extauthz.policy.reloads", description="policy reload attempts, by result"
        )
        self._keys: KeySetRegistry | None = None
        meter.create_observable_counter(
            "extauthz.token_cache.lookups",
            callbacks=[_token_cache_lookups],
            description="verified-token cache lookups, by result (hit: no signature check)",
        )
        meter.create_observable_counter(
            "extauthz.jwks.fetches",
            callbacks=[self._jwks_fetches],
            description="remote JWKS / OIDC discovery fetches, by result (ok, not_modified, error)",
        )
        meter.create_observable_counter(
            "extauthz.jwks.refetches",
            callbacks=[self._jwks_refetches],
            description="early refetches asked for by an unknown kid, by result (granted, "
            "rate_limited)",
        )

    @property
    def makes_spans(self) -> bool:
        """Whether :meth:`record` may make a span (and so reads the Check's metadata)."""
        return self._parent is not None and bool(self._processors)

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Send decision spans to ``processor`` too (tests add in-memory ones)."""
        if self.provider is None:
            raise ValueError("tracing is off: no TracerProvider")
        self.provider.add_span_processor(processor)  # which shuts it down
        self._processors.append(processor)

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Export decision spans through a BatchSpanProcessor of its own."""
        capacity = _span_queue_size()
        backlog = _Backlog(exporter, capacity)
        self.add_span_processor(BatchSpanProcessor(backlog, max_queue_size=capacity))
        self._backlogs.append(backlog)

    def observe_keys(self, keys: KeySetRegistry) -> None:
        """Report the fetches of these remote key sets (the server's one registry)."""
        self._keys = keys

    def _dry_runs(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = self._dry_run_counts.copy()
        return [
            Observation(
                n,
                {"decision": d, "dry_run_decision": w, "dry_run_policy": p, "changed": c},
            )
            for (d, w, p, c), n in counts.items()
        ]

    def _decisions(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = self._decision_counts.copy()  # one C call: safe against the event loop's +1
        return [
            Observation(
                n, {"result": r, "reason": why, "policy": p} if p else {"result": r, "reason": why}
            )
            for (r, why, p), n in counts.items()
        ]

    def _checks_in_flight(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.in_flight)]

    def _jwks_fetches(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._keys is None:
            return []
        t = self._keys.totals()
        return [
            Observation(t.fetches - t.not_modified, {"result": "ok"}),
            Observation(t.not_modified, {"result": "not_modified"}),
            Observation(t.failures, {"result": "error"}),
        ]

    def _jwks_refetches(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._keys is None:
            return []
        t = self._keys.totals()
        return [
            Observation(t.refetches, {"result": "granted"}),
            Observation(t.refetches_limited, {"result": "rate_limited"}),
        ]

    def record_dry_run(self, decision: Decision) -> None:
        """Count (and log when it differs) what dry-run policies would have decided."""
        would = decision.dry_run_allowed
        if would is None:
            return
        changed = would != decision.allowed
        key = (
            "allow" if decision.allowed else "deny",
            "allow" if would else "deny",
            decision.dry_run_policy,
            changed,
        )
        counts = self._dry_run_counts
        counts[key] = counts.get(key, 0) + 1
        if not changed:
            return
        now = time.monotonic()
        if now - self._dry_run_logged < 1.0:
            self._dry_run_unlogged += 1
            return
        log.info(
            "dry-run: decision %s would be %s (by %s) if dry-run policies were enforced%s",
            decision.decision_id,
            "allow" if would else "deny",
            decision.dry_run_policy or "no ALLOW policy matching",
            f" ({self._dry_run_unlogged} more since the last line)"
            if self._dry_run_unlogged
            else "",
        )
        self._dry_run_logged, self._dry_run_unlogged = now, 0

    def record_reload(self, ok: bool) -> None:
        self._reloads.add(1, {"result": "ok" if ok else "error"})

    @classmethod
    def from_env(
        cls,
        extra: Iterable[SpanProcessor] = (),
        *,
        metrics_listen: str | None = None,
        metric_readers: Iterable[MetricReader] = (),
    ) -> Telemetry:
        """Build from the standard ``OTEL_*`` variables and ``--metrics-listen``.

        ``extra`` span processors and ``metric_readers`` are what tests inject.
        """
        extra = list(extra)
        readers = list(metric_readers)
        disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
        trace_names = [] if disabled else _names("OTEL_TRACES_EXPORTER", "otlp")
        exporters = [e for n in trace_names if (e := _exporter(n))]
        # Metrics follow the traces to the collector unless told otherwise; with traces off,
        # nothing knocks on a collector nobody configured.
        metric_names = (
            []
            if disabled
            else _names("OTEL_METRICS_EXPORTER", "otlp" if "otlp" in trace_names else "none")
        )
        pushed = [m for n in metric_names if (m := _metric_exporter(n))]
        readers += [PeriodicExportingMetricReader(m) for m in pushed]
        listen_flag = "--metrics-listen"
        if metrics_listen is None and "prometheus" in metric_names:
            host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", DEFAULT_PROMETHEUS[0])
            port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", DEFAULT_PROMETHEUS[1])
            metrics_listen = f"{host}:{port}"
            listen_flag = "OTEL_EXPORTER_PROMETHEUS_HOST:PORT"
        tracing = bool(exporters or extra)
        propagators = propagators_from_env() if tracing else None
        attrs = {} if "OTEL_SERVICE_NAME" in os.environ else {SERVICE_NAME: "extauthz"}
        resource = Resource.create(attrs)
        if tracing:
            _span_queue_size()  # a bad OTEL_BSP_* is a clear error, before anything binds
        # Last: it binds a port, and nothing after it may fail.
        server = MetricsServer(metrics_listen, listen_flag) if metrics_listen is not None else None
        if server is not None:
            readers.append(server.reader)
        # shutdown_on_exit=False: our own shutdown() bounds the final flush; the SDK's atexit
        # hooks would wait out every retry against a dead collector.
        meter_provider = (
            SdkMeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
            if readers
            else None
        )
        provider = TracerProvider(resource=resource, shutdown_on_exit=False) if tracing else None
        telemetry = cls(provider, meter_provider, propagators=propagators, metrics_server=server)
        telemetry._owned_meter_provider = meter_provider
        for exporter in exporters:
            telemetry.add_exporter(exporter)
        for processor in extra:
            telemetry.add_span_processor(processor)
        return telemetry

    def record(
        self,
        decision: Decision,
        inp: CheckInput | None,
        started: int,
        metadata: Iterable[tuple[str, Any]] = (),
    ) -> SpanContext | None:
        """Count ``decision`` and record its span; ``started``: ``time.perf_counter_ns()``
        when the Check arrived, ``metadata``: the Check's gRPC invocation metadata. Returns
        the span's context (its ids, for the decision log), None when no span was made."""
        elapsed = time.perf_counter_ns() - started
        if decision.dry_run_allowed is not None:
            self.record_dry_run(decision)
        counts = self._decision_counts
        key = (decision.outcome.value, decision.reason, decision.policy)
        counts[key] = counts.get(key, 0) + 1
        self._duration.record(elapsed / 1e9, _RESULT[decision.outcome])
        if self._parent is None or not self._processors:
            return None
        if len(self._backlogs) == len(self._processors) and all(b.full for b in self._backlogs):
            return None  # a span built now could only be dropped
        return self._span(self._parent, decision, inp, elapsed, metadata)

    def _span(
        self,
        parent: Parent,
        decision: Decision,
        inp: CheckInput | None,
        elapsed: int,
        metadata: Iterable[tuple[str, Any]],
    ) -> SpanContext | None:
        provider = self.provider
        assert provider is not None
        found = parent.extract(metadata, inp.headers if inp is not None else _NO_HEADERS)
        context, remote = found if found is not None else (_ROOT, None)
        ids = provider.id_generator
        trace_id = remote.trace_id if remote is not None else ids.generate_trace_id()
        sampling = provider.sampler.should_sample(context, trace_id, SPAN_NAME, SpanKind.SERVER)
        if not sampling.decision.is_sampled():  # type: ignore[no-untyped-call]
            return None
        attributes = span_attributes(decision, inp)
        if sampling.attributes:
            attributes.update(sampling.attributes)
        if self._value_limit is not None:
            _truncate(attributes, self._value_limit)
        end = time.time_ns()
        span = ReadableSpan(
            SPAN_NAME,
            SpanContext(
                trace_id,
                ids.generate_span_id(),
                is_remote=False,
                trace_flags=_SAMPLED,
                trace_state=sampling.trace_state,
            ),
            remote,
            provider.resource,
            attributes,
            kind=SpanKind.SERVER,
            status=(
                Status(StatusCode.ERROR, decision.reason)
                if decision.outcome is Outcome.ERROR
                else _UNSET
            ),
            start_time=end - elapsed,
            end_time=end,
            instrumentation_scope=self._scope,
        )
        for processor in self._processors:
            processor.on_end(span)
        for backlog in self._backlogs:
            backlog.added()
        made: SpanContext = span.context
        return made

    def shutdown(self, timeout: float = 3.0) -> bool:
        """Flush and stop within ``timeout`` seconds; False if telemetry had to be dropped.

        A dead collector makes the exporters retry for tens of seconds; exit must not wait
        for it (a pod has 30 s between SIGTERM and SIGKILL, and draining checks comes first).
        """
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        stops: list[Callable[[], object]] = []
        if self.provider is not None:
            stops.append(self.provider.shutdown)
        if self._owned_meter_provider is not None:
            meters = self._owned_meter_provider
            stops.append(lambda: meters.shutdown(timeout_millis=timeout * 1000))
        # In parallel: a tracer stuck on a dead collector must not starve the meters' flush.
        workers = [
            threading.Thread(target=stop, name="otel-shutdown", daemon=True) for stop in stops
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in workers):
            log.warning(
                "telemetry: collector unreachable, unexported telemetry dropped at shutdown"
            )
            return False
        return True


def _token_cache_lookups(_: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(TOKEN_CACHE_TOTALS.hits, {"result": "hit"}),
        Observation(TOKEN_CACHE_TOTALS.misses, {"result": "miss"}),
    ]


def _truncate(attributes: dict[str, Any], limit: int) -> None:
    """``OTEL_(SPAN_)ATTRIBUTE_VALUE_LENGTH_LIMIT``, as the SDK applies it."""
    for key, value in attributes.items():
        if isinstance(value, str) and len(value) > limit:
            attributes[key] = value[:limit]
        elif isinstance(value, list):
            attributes[key] = [v[:limit] if isinstance(v, str) else v for v in value]


def span_attributes(decision: Decision, inp: CheckInput | None) -> dict[str, Any]:
    """Stable attribute names; never a token, a claim value or a query string."""
    attrs: dict[str, Any] = {
        "extauthz.decision": decision.outcome.value,
        "extauthz.reason": decision.reason,
        "extauthz.decision_id": decision.decision_id,
    }
    optional = {
        "extauthz.policy": decision.policy,
        "extauthz.rule": decision.rule,
        "extauthz.policy_revision": decision.policy_revision,
        "extauthz.workload.namespace": decision.namespace,
        "extauthz.source.spiffe_id": decision.spiffe_id,
        "extauthz.source.principal": decision.principal,
        "extauthz.jwt.issuer": decision.issuer,
        "extauthz.jwt.subject": decision.subject,
        "extauthz.dry_run.policy": decision.dry_run_policy,
        "extauthz.token.audience": decision.token_audience,
    }
    attrs.update({k: v for k, v in optional.items() if v})
    if decision.audiences:
        attrs["extauthz.jwt.audience"] = list(decision.audiences)
    if decision.audit:
        attrs["extauthz.audit.policies"] = list(decision.audit)
    if decision.dry_run_allowed is not None:
        attrs["extauthz.dry_run.decision"] = "allow" if decision.dry_run_allowed else "deny"
    if inp is not None:
        attrs["http.request.method"] = inp.method
        attrs["url.path"] = inp.path
        attrs["server.address"] = inp.host
        if inp.request_id:
            attrs["extauthz.request_id"] = inp.request_id
    return attrs
