"""OpenTelemetry: one span per decision, configured the OpenTelemetry way.

Exporters come from ``OTEL_TRACES_EXPORTER`` (``otlp`` by default, ``console``, ``none``; a
comma-separated list), the OTLP protocol from ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` by default, or ``http/protobuf``), the sampler from
``OTEL_TRACES_SAMPLER``, endpoints and resource from their standard variables. Spans leave
through a BatchSpanProcessor: a slow or dead collector drops spans, it never delays a decision.

The span is recorded after the decision with its real start time, so telemetry observes the
pipeline instead of wrapping it: a telemetry failure cannot change an answer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .decision import Decision, Outcome
from .errors import ConfigError
from .identity.jwks import KeySetRegistry
from .identity.jwt import TOKEN_CACHE_TOTALS
from .request import CheckInput

log = logging.getLogger(__name__)

SPAN_NAME = "extauthz.check"
_PROPAGATOR = TraceContextTextMapPropagator()


OTLP_PROTO_FIX = "pip install --force-reinstall --no-deps opentelemetry-proto"


def _check_otlp_protos() -> None:
    """Fail fast if xds-protos overwrote opentelemetry-proto (grpc/grpc#42926)."""
    try:
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the OTLP exporter cannot load: the opentelemetry-proto files were overwritten by "
            "xds-protos' stale copy (grpc/grpc#42926). Run "
            f"'{OTLP_PROTO_FIX}' (make install does), or set OTEL_TRACES_EXPORTER=none"
        ) from None


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    )
    _check_otlp_protos()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")


class Telemetry:
    """Records decisions as spans. ``Telemetry(None)`` records nothing and costs nothing.

    Counters for dry-run verdicts and policy reloads go to ``meter_provider`` (default: the
    global one, a no-op until an SDK MeterProvider is installed).
    """

    def __init__(
        self, provider: TracerProvider | None, meter_provider: MeterProvider | None = None
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("extauthz", __version__) if provider else None
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("extauthz", __version__)
        self._dry_run = meter.create_counter(
            "extauthz.dry_run.decisions",
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

    def observe_keys(self, keys: KeySetRegistry) -> None:
        """Report the fetches of these remote key sets (the server's one registry)."""
        self._keys = keys

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
        self._dry_run.add(
            1,
            {
                "decision": "allow" if decision.allowed else "deny",
                "dry_run_decision": "allow" if would else "deny",
                "dry_run_policy": decision.dry_run_policy,
                "changed": changed,
            },
        )
        if changed:
            log.info(
                "dry-run: decision %s would be %s (by %s) if dry-run policies were enforced",
                decision.decision_id,
                "allow" if would else "deny",
                decision.dry_run_policy or "no ALLOW policy matching",
            )

    def record_reload(self, ok: bool) -> None:
        self._reloads.add(1, {"result": "ok" if ok else "error"})

    @classmethod
    def from_env(cls, extra: Iterable[SpanProcessor] = ()) -> Telemetry:
        """Build from the standard ``OTEL_*`` variables (plus processors tests inject)."""
        extra = list(extra)
        if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" and not extra:
            return cls(None)
        names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
        exporters = [e for n in names.split(",") if (e := _exporter(n.strip().lower()))]
        if not exporters and not extra:
            return cls(None)
        attrs = {} if "OTEL_SERVICE_NAME" in os.environ else {SERVICE_NAME: "extauthz"}
        # shutdown_on_exit=False: our own shutdown() bounds the final flush; the SDK's atexit
        # hook would wait out every retry against a dead collector.
        provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        for processor in extra:
            provider.add_span_processor(processor)
        return cls(provider)

    def record(
        self,
        decision: Decision,
        inp: CheckInput | None,
        start_ns: int,
        metadata: Iterable[tuple[str, Any]] = (),
    ) -> SpanContext | None:
        """Record the decision span; its context (ids) for the decision log, None untraced."""
        if decision.dry_run_allowed is not None:
            self.record_dry_run(decision)
        if self._tracer is None:
            return None
        span = self._tracer.start_span(
            SPAN_NAME,
            context=_parent(metadata),
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes=span_attributes(decision, inp),
        )
        if decision.outcome is Outcome.ERROR:
            span.set_status(Status(StatusCode.ERROR, decision.reason))
        span.end()
        return span.get_span_context()

    def shutdown(self, timeout: float = 3.0) -> bool:
        """Flush and stop within ``timeout`` seconds; False if spans had to be dropped.

        A dead collector makes the exporter retry for tens of seconds; exit must not wait for
        it (a pod has 30 s between SIGTERM and SIGKILL, and draining checks comes first).
        """
        if self.provider is None:
            return True
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            log.warning("telemetry: collector unreachable, unexported spans dropped at shutdown")
            return False
        return True


def _token_cache_lookups(_: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(TOKEN_CACHE_TOTALS.hits, {"result": "hit"}),
        Observation(TOKEN_CACHE_TOTALS.misses, {"result": "miss"}),
    ]


def _parent(metadata: Iterable[tuple[str, Any]]) -> Context | None:
    """The trace context Envoy propagates in the ext_authz call's gRPC metadata."""
    carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier) if carrier else None


def span_attributes(decision: Decision, inp: CheckInput | None) -> Mapping[str, Any]:
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
        "extauthz.source.spiffe_id": decision.spiffe_id,
        "extauthz.source.principal": decision.principal,
        "extauthz.jwt.issuer": decision.issuer,
        "extauthz.jwt.subject": decision.subject,
        "extauthz.dry_run.policy": decision.dry_run_policy,
        "extauthz.token.audience": decision.token_audience,
    }
    attrs.update({k: v for k, v in optional.items() if v})
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
