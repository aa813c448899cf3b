"""Which trace a Check joins: W3C and B3, gRPC metadata before HTTP headers, garbage ignored."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from extauthz.errors import ConfigError
from extauthz.propagation import Parent, propagators_from_env

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
OTHER_TRACE = "a3ce929d0e0e47364bf92f3577b34da6"
OTHER_SPAN = "b7ad6b7169203331"

W3C = {"traceparent": f"00-{TRACE}-{SPAN}-01"}
W3C_UNSAMPLED = {"traceparent": f"00-{TRACE}-{SPAN}-00"}
B3_SINGLE = {"b3": f"{TRACE}-{SPAN}-1"}
B3_MULTI = {"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}
OTHER_W3C = {"traceparent": f"00-{OTHER_TRACE}-{OTHER_SPAN}-01"}
GARBAGE = [
    {"traceparent": "00-not-hex-01"},
    {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},  # all-zero trace id is invalid
    {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    {"traceparent": f"00-{TRACE}-{SPAN}-01,00-{OTHER_TRACE}-{OTHER_SPAN}-01"},  # comma-joined
    {"b3": "garbage"},
    {"x-b3-traceid": "xyz", "x-b3-spanid": SPAN},
    {"tracestate": "a=b"},  # state without a parent
]


def parent(
    metadata: Mapping[str, str | bytes],
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str, bool] | None:
    """(trace id, span id, sampled) of the parent found, or None."""
    found = Parent(propagators_from_env(env or {})).extract(metadata.items(), headers or {})
    if found is None:
        return None
    _, span = found
    assert span.is_remote
    return format(span.trace_id, "032x"), format(span.span_id, "016x"), span.trace_flags.sampled


@pytest.mark.parametrize(
    ("carrier", "sampled"),
    [(W3C, True), (W3C_UNSAMPLED, False), (B3_SINGLE, True), (B3_MULTI, True)],
    ids=["w3c", "w3c-unsampled", "b3-single", "b3-multi"],
)
@pytest.mark.parametrize("where", ["metadata", "headers"])
def test_each_format_from_either_carrier(
    carrier: dict[str, str], sampled: bool, where: str
) -> None:
    found = parent(carrier, None) if where == "metadata" else parent({}, carrier)
    assert found == (TRACE, SPAN, sampled)


@pytest.mark.parametrize("metadata", [W3C, B3_SINGLE, B3_MULTI], ids=["w3c", "b3", "b3multi"])
def test_metadata_is_preferred_over_http_headers(metadata: dict[str, str]) -> None:
    # Envoy's ext_authz call span (metadata) is the parent, not the caller's (headers).
    assert parent(metadata, OTHER_W3C) == (TRACE, SPAN, True)


@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: ",".join(g))
def test_garbage_is_ignored_and_falls_back_to_headers(garbage: dict[str, str]) -> None:
    assert parent(garbage) is None
    assert parent(garbage, OTHER_W3C) == (OTHER_TRACE, OTHER_SPAN, True)
    assert parent({}, garbage) is None


def test_binary_metadata_is_never_a_trace_context() -> None:
    # grpc gives -bin values as bytes; they must neither break nor feed extraction.
    assert parent({"grpc-trace-bin": b"\x00\x01", **W3C}) == (TRACE, SPAN, True)


def test_w3c_wins_over_b3_in_one_carrier_by_default() -> None:
    both = {**B3_SINGLE, **OTHER_W3C}
    assert parent(both) == (OTHER_TRACE, OTHER_SPAN, True)


def test_tracestate_is_carried() -> None:
    found = Parent(propagators_from_env({})).extract(
        [*W3C.items(), ("tracestate", "vendor=x,other=y")], {}
    )
    assert found is not None
    assert dict(found[1].trace_state) == {"vendor": "x", "other": "y"}


@pytest.mark.parametrize(
    ("setting", "w3c", "b3"),
    [
        ("tracecontext,baggage", True, False),
        ("b3", False, True),
        ("b3multi", False, True),
        ("tracecontext, b3multi", True, True),
        ("none", False, False),
    ],
)
def test_otel_propagators_selects_the_formats(setting: str, w3c: bool, b3: bool) -> None:
    env = {"OTEL_PROPAGATORS": setting}
    assert (parent(W3C, env=env) is not None) is w3c
    assert (parent(B3_MULTI, env=env) is not None) is b3
    assert (parent(B3_SINGLE, env=env) is not None) is b3


def test_unknown_propagator_is_refused_at_startup() -> None:
    with pytest.raises(ConfigError, match=r"unknown propagator 'xray'.*tracecontext"):
        propagators_from_env({"OTEL_PROPAGATORS": "tracecontext,xray"})
