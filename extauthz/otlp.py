"""OTLP/gRPC span export with a faster encoder than the SDK's.

The SDK's encoder builds each attribute as its own message and then copies it into the span
message: 88 µs per decision span on the reference 2-core machine, more than the decision
itself, and at 100% sampling it runs on the cores that decide. Here each span is written in
the protobuf wire format directly (a few fixed fields and length-prefixed strings) and the
spans of one scope are parsed into the request by protobuf's C parser in one call. The
encoding of a string attribute is cached by (key, value): most of them (decision, reason,
policy, rule, caller, host...) repeat from span to span. Spans with events or links
(extauthz makes none) go through the SDK's encoder; ``tests/test_otlp.py`` checks that both
give the same message.

Import only after :func:`extauthz.telemetry._check_otlp_protos`: the exporter needs the real
opentelemetry-proto files.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from .wire import length_prefixed as _length
from .wire import varint as _varint

log = logging.getLogger(__name__)

_KIND = {
    SpanKind.INTERNAL: PbSpan.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PbSpan.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PbSpan.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PbSpan.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PbSpan.SPAN_KIND_CONSUMER,
}
_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_PARENT = _LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")

# Wire tags (field number << 3 | wire type) of opentelemetry/proto/trace/v1/trace.proto.
_SCOPE_SPANS_SPAN = b"\x12"  # ScopeSpans.spans = 2
_TRACE_ID = b"\x0a\x10"  # 1, 16 bytes
_SPAN_ID = b"\x12\x08"  # 2, 8 bytes
_TRACE_STATE = b"\x1a"  # 3
_PARENT_SPAN_ID = b"\x22\x08"  # 4, 8 bytes
_NAME = b"\x2a"  # 5
_KIND_TAG = b"\x30"  # 6, varint
_START = b"\x39"  # 7, fixed64
_END = b"\x41"  # 8, fixed64
_ATTRIBUTE = b"\x4a"  # 9: KeyValue {key = 1; AnyValue value = 2 {string_value = 1}}
_DROPPED_ATTRIBUTES = b"\x50"  # 10, varint
_DROPPED_EVENTS = b"\x60"  # 12
_DROPPED_LINKS = b"\x70"  # 14
_STATUS = b"\x7a"  # 15: Status {message = 2; code = 3}
_FLAGS = b"\x85\x01"  # 16, fixed32

_CACHED = 4096  # encoded attributes kept; the cache starts over when it is full
_UNIQUE = frozenset({"extauthz.decision_id", "extauthz.request_id"})  # never cached


class SpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` (endpoint, headers, TLS, retries from ``OTEL_*``), faster encoder."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = Encoder()  # only the export thread uses it
        self._last: tuple[Sequence[ReadableSpan], ExportTraceServiceRequest] | None = None

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        # Each retry of a batch translates it again: encode it once.
        if self._last is not None and self._last[0] is data:
            return self._last[1]
        request = self._encoder.encode(data)
        self._last = (data, request)
        return request


class Encoder:
    """Spans to an ``ExportTraceServiceRequest``, as the SDK's ``encode_spans`` would."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], bytes] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        if any(s.events or s.links for s in spans):
            return encode_spans(spans)
        request = ExportTraceServiceRequest()
        # Grouped as the SDK groups them (equal resources, then equal scopes), first seen
        # first; equality is looked up once per distinct object, as it hashes JSON.
        groups: dict[tuple[Resource, InstrumentationScope | None], list[bytes]] = {}
        seen: dict[tuple[int, int], list[bytes]] = {}
        for span in spans:
            ident = (id(span.resource), id(span.instrumentation_scope))
            encoded = seen.get(ident)
            if encoded is None:
                key = (span.resource, span.instrumentation_scope or None)
                encoded = seen[ident] = groups.setdefault(key, [])
            encoded.append(self._span(span))
        by_resource: dict[Resource, Any] = {}
        for (resource, scope), encoded in groups.items():
            resource_spans = by_resource.get(resource)
            if resource_spans is None:
                resource_spans = by_resource[resource] = request.resource_spans.add()
                resource_spans.resource.SetInParent()
                _set_attributes(resource_spans.resource.attributes, resource.attributes)
                resource_spans.schema_url = resource.schema_url
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.SetInParent()
            if scope is not None:
                scope_spans.scope.name = scope.name
                scope_spans.scope.version = scope.version or ""
                _set_attributes(scope_spans.scope.attributes, scope.attributes)
                scope_spans.schema_url = scope.schema_url or ""
            scope_spans.MergeFromString(b"".join(encoded))
        return request

    def _span(self, span: ReadableSpan) -> bytes:
        """One ``ScopeSpans.spans`` entry, tag and length included."""
        context = span.get_span_context()
        assert context is not None  # every ended span has one
        out = [_TRACE_ID, context.trace_id.to_bytes(16, "big")]
        out += [_SPAN_ID, context.span_id.to_bytes(8, "big")]
        if context.trace_state:
            state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
            out += [_TRACE_STATE, _length(state.encode())]
        parent = span.parent
        if parent is not None:
            out += [_PARENT_SPAN_ID, parent.span_id.to_bytes(8, "big")]
        out += [_NAME, _length(span.name.encode())]
        kind = _KIND[span.kind]
        if kind:
            out += [_KIND_TAG, _varint(kind)]
        if span.start_time:
            out += [_START, _FIXED64.pack(span.start_time)]
        if span.end_time:
            out += [_END, _FIXED64.pack(span.end_time)]
        self._attributes(out, span.attributes)
        for tag, count in (
            (_DROPPED_ATTRIBUTES, span.dropped_attributes),
            (_DROPPED_EVENTS, span.dropped_events),
            (_DROPPED_LINKS, span.dropped_links),
        ):
            if count:
                out += [tag, _varint(count)]
        status = span.status
        code = status.status_code.value
        body = (b"\x12" + _length(status.description.encode()) if status.description else b"") + (
            b"\x18" + _varint(code) if code else b""
        )
        out += [_STATUS, _length(body)]
        remote = parent is not None and parent.is_remote
        out += [_FLAGS, _FIXED32.pack(_REMOTE_PARENT if remote else _LOCAL_PARENT)]
        return _SCOPE_SPANS_SPAN + _length(b"".join(out))

    def _attributes(self, out: list[bytes], attributes: Mapping[str, Any] | None) -> None:
        cache = self._cache
        for key, value in (attributes or {}).items():
            if type(value) is not str:
                out.append(_other_attribute(key, value))
                continue
            encoded = cache.get((key, value))
            if encoded is None:
                any_value = b"\x0a" + _length(value.encode())
                kv = b"\x0a" + _length(key.encode()) + b"\x12" + _length(any_value)
                encoded = _ATTRIBUTE + _length(kv)
                if key not in _UNIQUE:
                    if len(cache) >= _CACHED:
                        cache.clear()
                    cache[key, value] = encoded
            out.append(encoded)


def _other_attribute(key: str, value: Any) -> bytes:
    kv = KeyValue(key=key)
    try:
        _set_value(kv.value, value)
    except TypeError:
        # As the SDK's encoder does: lose the attribute, not the batch.
        log.exception("cannot encode span attribute %s", key)
        return b""
    return _ATTRIBUTE + _length(kv.SerializeToString())


def _set_attributes(into: Any, attributes: Mapping[str, Any] | None) -> None:
    for key, value in (attributes or {}).items():
        kv = into.add()
        kv.key = key
        try:
            _set_value(kv.value, value)
        except TypeError:
            log.exception("cannot encode attribute %s", key)
            del into[-1]


def _set_value(pb: Any, value: Any) -> None:
    # bool before int: a bool is an int.
    if isinstance(value, str):
        pb.string_value = value
    elif isinstance(value, bool):
        pb.bool_value = value
    elif isinstance(value, int):
        pb.int_value = value
    elif isinstance(value, float):
        pb.double_value = value
    elif isinstance(value, bytes):
        pb.bytes_value = value
    elif isinstance(value, Sequence):
        pb.array_value.SetInParent()
        for item in value:
            _set_value(pb.array_value.values.add(), item)
    elif isinstance(value, Mapping):
        pb.kvlist_value.SetInParent()
        _set_attributes(pb.kvlist_value.values, value)
    elif value is None:
        pb.SetInParent()
    else:
        raise TypeError(f"cannot encode attribute value of type {type(value).__name__}")
