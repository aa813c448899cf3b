"""The trace a Check belongs to: W3C trace context and B3, read the OpenTelemetry way.

The propagators are composed once at startup from ``OTEL_PROPAGATORS`` (names of the
``opentelemetry_propagator`` entry points: ``tracecontext``, ``baggage``, ``b3``, ``b3multi``,
``none``). Unset, extauthz extracts B3 (single ``b3`` header and multi ``x-b3-*``) then W3C
``traceparent``/``tracestate`` and ``baggage``: as in OpenTelemetry's composite propagator,
a later propagator's find replaces an earlier one's, so W3C wins when a request carries
both.

Per Check the context comes from the ext_authz call's gRPC metadata (Envoy sets it there
with tracing on; its span is the decision span's parent), else from the HTTP headers of the
checked request (a caller's context, when Envoy does not trace). A malformed value is the
same as none.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanContext, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .errors import ConfigError


def propagators_from_env(environ: Mapping[str, str] = os.environ) -> list[TextMapPropagator]:
    """The ``OTEL_PROPAGATORS`` composition, in order (default: B3, then W3C and baggage)."""
    configured = environ.get("OTEL_PROPAGATORS", "").strip()
    if not configured:
        # B3MultiFormat extracts the single b3 header too (it looks there first).
        return [B3MultiFormat(), TraceContextTextMapPropagator(), W3CBaggagePropagator()]
    names = [n.strip().lower() for n in configured.split(",") if n.strip()]
    if "none" in names:
        return []
    return [_load(name) for name in names]


def _load(name: str) -> TextMapPropagator:
    found = importlib.metadata.entry_points(group="opentelemetry_propagator", name=name)
    for entry in found:
        propagator: TextMapPropagator = entry.load()()
        return propagator
    known = sorted(
        e.name for e in importlib.metadata.entry_points(group="opentelemetry_propagator")
    )
    raise ConfigError(f"OTEL_PROPAGATORS: unknown propagator {name!r} (installed: {known})")


class Parent:
    """Finds the remote parent of a decision span with these propagators (in composition
    order: the last one that finds a span wins, as in a ``CompositePropagator``)."""

    def __init__(self, propagators: Sequence[TextMapPropagator]) -> None:
        # Last to first, stopping at the first span found: the composite's answer, with one
        # extraction when the favourite format is there. Baggage never sets a span, and the
        # decision span has no use for it.
        self.order = [p for p in reversed(propagators) if not isinstance(p, W3CBaggagePropagator)]

    def extract(
        self, metadata: Iterable[tuple[str, Any]], headers: Mapping[str, str]
    ) -> tuple[Context, SpanContext] | None:
        """The context to parent on and its span, or None when neither carrier has one.

        ``metadata`` is the gRPC invocation metadata (lower-case keys; ``-bin`` values are
        bytes and never trace context), ``headers`` the checked request's (lower-case).
        """
        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        for source in (carrier, headers):
            if not source:
                continue
            for propagator in self.order:
                context = propagator.extract(source)
                span = get_current_span(context).get_span_context()
                if span.is_valid:
                    return context, span
        return None
