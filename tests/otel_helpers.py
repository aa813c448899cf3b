"""Reading OpenTelemetry SDK metrics in tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader


def points(reader: InMemoryMetricReader, name: str) -> dict[frozenset[tuple[str, Any]], int]:
    data = reader.get_metrics_data()
    out: dict[frozenset[tuple[str, Any]], int] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        out[frozenset(p.attributes.items())] = int(p.value)
    return out
