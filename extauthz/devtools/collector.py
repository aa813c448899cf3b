"""A local OTLP/gRPC collector that keeps what it receives (development only).

Implements ``opentelemetry.proto.collector.trace.v1.TraceService`` and
``metrics.v1.MetricsService`` on 127.0.0.1, so tests and benchmarks can point extauthz and
Envoy at it (``OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint``) and read the spans and
metrics back as the protobuf messages the exporters sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

T = TypeVar("T")
_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


@dataclass(frozen=True)
class Received:
    """One span or metric (an ``opentelemetry.proto`` message) and who sent it."""

    service: str  # the resource's service.name
    item: Any


def _service(resource: Any) -> str:
    for attr in resource.attributes:
        if attr.key == "service.name":
            return str(attr.value.string_value)
    return ""


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Collector) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        self.sink._add(
            self.sink._spans,
            [
                Received(_service(rs.resource), span)
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ],
        )
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink: Collector) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        self.sink._add(
            self.sink._metrics,
            [
                Received(_service(rm.resource), metric)
                for rm in request.resource_metrics
                for sm in rm.scope_metrics
                for metric in sm.metrics
            ],
        )
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Collector:
    """OTLP/gRPC trace and metrics receiver; a context manager that starts and stops it.

    With ``keep=False`` it only counts the export requests and their bytes, unparsed: a
    benchmark's collector must cost its machine as little as possible.
    """

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.requests = 0
        self.received_bytes = 0
        self.port = 0
        self._spans: list[Received] = []
        self._metrics: list[Received] = []
        self._cond = threading.Condition()  # an RLock: found() in wait_for reads spans()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        server = grpc.server(futures.ThreadPoolExecutor(4, thread_name_prefix="collector"))
        if self.keep:
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)  # type: ignore[no-untyped-call]
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
                _Metrics(self), server
            )
        else:
            count = grpc.unary_unary_rpc_method_handler(self._count)  # bytes in, bytes out
            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(service, {"Export": count})
                    for service in (_TRACE_SERVICE, _METRICS_SERVICE)
                ]
            )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(None)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _count(self, request: bytes, context: Any) -> bytes:
        with self._cond:
            self.requests += 1
            self.received_bytes += len(request)
        return b""  # an empty Export*ServiceResponse

    def _add(self, into: list[Received], items: list[Received]) -> None:
        with self._cond:
            into.extend(items)
            self._cond.notify_all()

    def spans(self) -> list[Received]:
        with self._cond:
            return list(self._spans)

    def metrics(self) -> list[Received]:
        with self._cond:
            return list(self._metrics)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._metrics.clear()

    def wait_for(self, found: Callable[[Collector], T | None], timeout: float = 20.0) -> T:
        """Wait until ``found(self)`` returns something other than None, and return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found(self)
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"collector: nothing matched after {timeout}s "
                        f"({len(self._spans)} spans, {len(self._metrics)} metrics received)"
                    )
                self._cond.wait(min(left, 0.5))
