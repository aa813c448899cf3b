"""The fast OTLP span encoder gives exactly the SDK encoder's message."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from extauthz.decision import Decision, Outcome
from extauthz.otlp import Encoder
from extauthz.request import CheckInput
from extauthz.telemetry import span_attributes

RESOURCE = Resource.create({"service.name": "extauthz"})
OTHER_RESOURCE = Resource.create({"service.name": "other", "replica": 3})
SCOPE = InstrumentationScope("extauthz", "0.1.0")
OTHER_SCOPE = InstrumentationScope("jwks", None, "https://schema", {"a": "b"})
REMOTE = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1))
DECISION = Decision(
    Outcome.PERMISSION_DENIED,
    "no_allow_policy_matched",
    "no ALLOW policy matched",
    "ab" * 16,
    policy="shop/orders",
    rule="rules[0]",
    audit=("shop/audit",),
    dry_run_allowed=True,
    dry_run_policy="shop/dry",
    spiffe_id="spiffe://demo.local/ns/shop/sa/frontend",
    principal="demo.local/ns/shop/sa/frontend",
    issuer="https://idp",
    subject="alice",
    audiences=("shop", "api"),
    namespace="shop",
    policy_revision="abc",
)
INPUT = CheckInput(method="GET", host="orders.shop", path="/orders/é" + "x" * 300, request_id="r1")


def span(
    n: int,
    *,
    attributes: Any = None,
    parent: SpanContext | None = REMOTE,
    resource: Resource = RESOURCE,
    scope: InstrumentationScope | None = SCOPE,
    status: Status | None = None,
    **kw: Any,
) -> ReadableSpan:
    state = TraceState([("vendor", "x"), ("k", "v")]) if n % 2 else None
    return ReadableSpan(
        "extauthz.check",
        SpanContext(REMOTE.trace_id + n, 1000 + n, False, TraceFlags(1), state),
        parent,
        resource,
        span_attributes(DECISION, INPUT) if attributes is None else attributes,
        kind=SpanKind.SERVER,
        status=status or Status(StatusCode.UNSET),
        start_time=1_700_000_000_000_000_000 + n,
        end_time=1_700_000_000_000_100_000 + n,
        instrumentation_scope=scope,
        **kw,
    )


CASES = {
    "decision spans": [span(n) for n in range(3)],
    "error status, root, local parent": [
        span(0, status=Status(StatusCode.ERROR, "internal_error"), parent=None),
        span(1, parent=SpanContext(5, 6, False)),
        span(2, status=Status(StatusCode.OK)),
    ],
    "attribute types": [
        span(
            0,
            attributes={
                "s": "x",
                "empty": "",
                "b": True,
                "i": -3,
                "big": 2**40,
                "f": 1.5,
                "bytes": b"\x00\xff",
                "strings": ["a", "b"],
                "ints": [1, 2],
                "none": None,
                "map": {"k": "v"},
                "long": "é" * 200,
            },
        ),
        span(1, attributes={}),
    ],
    "resources and scopes interleaved": [
        span(0),
        span(1, resource=OTHER_RESOURCE),
        span(2, scope=OTHER_SCOPE),
        span(3, scope=None),
        span(4, resource=Resource.create({"service.name": "extauthz"})),  # equal, not same
        span(5, resource=OTHER_RESOURCE, scope=OTHER_SCOPE),
    ],
    "events and links (the SDK's encoder)": [
        span(0, events=[Event("e", {"a": 1}, 5)], links=[Link(REMOTE, {"l": "x"})]),
        span(1),
    ],
    "nothing": [],
}


@pytest.mark.parametrize("spans", CASES.values(), ids=CASES.keys())
def test_same_message_as_the_sdk(spans: list[ReadableSpan]) -> None:
    encoder = Encoder()
    expected = encode_spans(spans)
    assert encoder.encode(spans) == expected
    assert encoder.encode(spans) == expected  # again, from the attribute cache


def test_an_unencodable_attribute_is_dropped_not_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spans = [span(0, attributes={"ok": "x", "bad": object(), "also": 1})]
    with caplog.at_level(logging.ERROR):
        assert Encoder().encode(spans) == encode_spans(spans)
    assert "bad" in caplog.text
