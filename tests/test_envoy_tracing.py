"""One trace through a real Envoy: its spans and extauthz's decision span, at one collector.

The shipped sidecar (envoy/sidecar.yaml, OpenTelemetry tracer on) in front of `orders`, and
extauthz, both exporting OTLP/gRPC to a local collector; metrics go there too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from extauthz.devtools.collector import Collector, Received
from extauthz.devtools.mesh import Mesh

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Mesh]:
    fast = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
    with Mesh(
        tmp_path_factory.mktemp("traced"),
        workloads=("orders",),
        clients=("frontend",),
        collector_port=collector.port,
        env=fast,
    ) as m:
        yield m


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        value = getattr(a.value, kind)
        out[a.key] = [v.string_value for v in value.values] if kind == "array_value" else value
    return out


def decision_span(collector: Collector, decision_id: str) -> Any:
    def found(c: Collector) -> Any:
        for r in c.spans():
            if r.service == "extauthz" and attributes(r.item).get("extauthz.decision_id") == (
                decision_id
            ):
                return r.item
        return None

    return collector.wait_for(found)


def envoy_span(collector: Collector, span_id: bytes) -> Received:
    return collector.wait_for(
        lambda c: next((r for r in c.spans() if r.item.span_id == span_id), None)
    )


def token(mesh: Mesh, **kw: Any) -> str:
    return mesh.idp.token("alice", audience="shop", **kw)


CASES: dict[str, tuple[Callable[[Mesh], str | None], int, dict[str, Any]]] = {
    "allow": (
        token,
        200,
        {
            "extauthz.decision": "allow",
            "extauthz.reason": "allowed_by_policy",
            "extauthz.policy": "shop/orders",
            "extauthz.rule": "rules[0]",
            "extauthz.jwt.issuer": "https://idp.demo.local",
            "extauthz.jwt.subject": "alice",
            "extauthz.jwt.audience": ["shop"],
        },
    ),
    "no token: 403": (
        lambda m: None,
        403,
        {"extauthz.decision": "permission_denied", "extauthz.reason": "no_allow_policy_matched"},
    ),
    "expired token: 401": (
        lambda m: token(m, ttl=-3600),
        401,
        {"extauthz.decision": "unauthenticated", "extauthz.reason": "jwt_expired"},
    ),
}


@pytest.mark.parametrize(("make_token", "status", "expected"), CASES.values(), ids=CASES.keys())
def test_the_decision_span_is_a_child_of_envoys_ext_authz_call(
    mesh: Mesh,
    collector: Collector,
    make_token: Callable[[Mesh], str | None],
    status: int,
    expected: dict[str, Any],
) -> None:
    r = mesh.call("frontend", "orders", "GET", "/orders/42?expand=items", token=make_token(mesh))
    assert r.status == status, r.body
    decision_id = (
        r.json()["headers"]["x-extauthz-decision-id"]
        if status == 200
        else r.headers["x-extauthz-decision-id"]
    )
    span = decision_span(collector, decision_id)

    # Its parent is the span Envoy made for the ext_authz call, in Envoy's trace ...
    call = envoy_span(collector, span.parent_span_id)
    assert call.service == "orders"  # the sidecar's service_name
    assert call.item.kind == CLIENT
    assert "envoy.service.auth.v3.Authorization.Check" in call.item.name
    assert call.item.trace_id == span.trace_id
    # ... whose parent is Envoy's server span for the request: one trace, no gaps.
    ingress = envoy_span(collector, call.item.parent_span_id)
    assert ingress.item.name == "ingress"
    assert ingress.item.kind == SERVER
    assert ingress.item.trace_id == span.trace_id
    assert span.kind == SERVER
    assert span.name == "extauthz.check"

    attrs = attributes(span)
    assert attrs.items() >= expected.items()
    assert (
        attrs.items()
        >= {
            "extauthz.decision_id": decision_id,
            "extauthz.workload.namespace": "shop",
            "extauthz.source.spiffe_id": "spiffe://demo.local/ns/shop/sa/frontend",
            "extauthz.source.principal": "demo.local/ns/shop/sa/frontend",
            "http.request.method": "GET",
            "server.address": "orders.shop",
            "url.path": "/orders/42",  # never the query
        }.items()
    )
    assert attrs["extauthz.request_id"].isdigit()  # Envoy's stream id
    assert len(attrs["extauthz.policy_revision"]) == 12
    assert not any("expand" in str(v) for v in attrs.values())
    assert not any(str(v).startswith("ey") for v in attrs.values())  # never a token


def test_a_callers_traceparent_is_continued_through_envoy(mesh: Mesh, collector: Collector) -> None:
    caller_span = "b7ad6b7169203331"
    r = mesh.call(
        "frontend",
        "orders",
        "GET",
        "/orders/7",
        token=token(mesh),
        headers={"traceparent": f"00-{CLIENT_TRACE}-{caller_span}-01"},
    )
    assert r.status == 200, r.body
    span = decision_span(collector, r.json()["headers"]["x-extauthz-decision-id"])
    assert span.trace_id.hex() == CLIENT_TRACE
    ingress = envoy_span(collector, envoy_span(collector, span.parent_span_id).item.parent_span_id)
    assert ingress.item.parent_span_id.hex() == caller_span


def test_decisions_are_counted_at_the_collector(mesh: Mesh, collector: Collector) -> None:
    assert mesh.call("frontend", "orders", "GET", "/orders/1", token=token(mesh)).status == 200
    assert mesh.call("frontend", "orders", "GET", "/orders/1").status == 403
    # A reason no other test of this module produces: its count is this test's alone.
    for _ in range(3):
        assert mesh.call("frontend", "orders", "GET", "/orders/1", token="not-a-jwt").status == 401
    malformed = (("reason", "jwt_malformed"), ("result", "unauthenticated"))

    def counted(c: Collector) -> dict[tuple[str, ...], int] | None:
        exports = [r.item for r in c.metrics() if r.item.name == "extauthz.decisions"]
        if not exports:
            return None
        latest = {
            tuple(sorted((a.key, a.value.string_value) for a in p.attributes)): p.as_int
            for p in exports[-1].sum.data_points
        }
        allow = (("policy", "shop/orders"), ("reason", "allowed_by_policy"), ("result", "allow"))
        deny = (("reason", "no_allow_policy_matched"), ("result", "permission_denied"))
        if latest.get(allow, 0) >= 1 and latest.get(deny, 0) >= 1 and latest.get(malformed, 0) >= 3:
            return latest
        return None

    latest = collector.wait_for(counted)
    assert latest[malformed] == 3
    names = {r.item.name for r in collector.metrics() if r.service == "extauthz"}
    assert {"extauthz.decisions", "extauthz.decision.duration", "extauthz.checks.in_flight"} <= (
        names
    )
    (duration,) = {
        r.item.name: r.item for r in collector.metrics() if r.item.name.endswith("duration")
    }.values()
    assert duration.unit == "s"
    assert sum(p.count for p in duration.histogram.data_points) >= 2
