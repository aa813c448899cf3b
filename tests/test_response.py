"""The hand-written CheckResponse encoder against protobuf's own: byte for byte.

``reference`` builds the message the way the table in ``extauthz/response.py`` reads, with
protobuf objects (what the encoder replaced); every kind of decision, odd strings and
lengths across varint boundaries must serialize to the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.decision import Decision, DenyResponse, Outcome
from extauthz.response import (
    DECISION_ID_HEADER,
    OUTCOMES,
    deny_body,
    encode_check_response,
    to_check_response,
)


def _option(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def reference(d: Decision) -> Any:
    row = OUTCOMES[d.outcome]
    status = status_pb2.Status(code=row.grpc_code)
    if d.outcome is Outcome.ALLOW:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_option(k, v) for k, v in d.upstream_headers],
            headers_to_remove=list(d.remove_headers),
        )
        return external_auth_pb2.CheckResponse(status=status, ok_response=ok)
    status.message = d.reason
    custom = d.deny_response
    body = json.dumps(
        {
            "error": row.error,
            "reason": d.reason,
            "message": d.message,
            "decision_id": d.decision_id,
        },
        separators=(",", ":"),
    )
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=custom.status if custom else row.http_status),
        headers=[
            _option("content-type", custom.content_type if custom else "application/json"),
            _option(DECISION_ID_HEADER, d.decision_id),
            *(_option(k, v) for k, v in d.client_headers),
            *(_option(k, v) for k, v in (custom.headers if custom else ())),
        ],
        body=custom.body if custom else body,
    )
    return external_auth_pb2.CheckResponse(status=status, denied_response=denied)


ID = "0123456789abcdef0123456789abcdef"
LONG = "v" * 200  # a two-byte length
HUGE = "h" * 20_000  # past the precomputed lengths
CUSTOM = DenyResponse(422, (("x-limit", "10000"), ("x-empty", "")), '{"a":1}', "text/plain")
DECISIONS = [
    Decision(Outcome.ALLOW, "allowed_by_policy", "allowed", ID),
    Decision(
        Outcome.ALLOW,
        "allowed_by_policy",
        "allowed",
        ID,
        upstream_headers=(
            ("x-user", "alice"),
            ("x-empty", ""),
            ("x-long", LONG),
            ("x-huge", HUGE),
            ("x-unicode", "zoë ☃ 𝄞"),
            (DECISION_ID_HEADER, ID),
            ("x-extauthz-spiffe-id", "spiffe://demo.local/ns/shop/sa/frontend"),
        ),
        remove_headers=("authorization", "x-forwarded-client-cert", ""),
    ),
    Decision(Outcome.PERMISSION_DENIED, "no_allow_policy_matched", "no ALLOW policy matched", ID),
    Decision(Outcome.PERMISSION_DENIED, "denied_by_policy", "m", ID, deny_response=CUSTOM),
    Decision(
        Outcome.PERMISSION_DENIED,
        "denied_by_policy",
        "m",
        ID,
        deny_response=DenyResponse(403, (), "", "application/json"),
    ),
    Decision(
        Outcome.UNAUTHENTICATED,
        "jwt_expired",
        'token "expired" \\ at 12:00 \u2028 ☃',
        ID,
        client_headers=(("www-authenticate", 'Bearer realm="extauthz", error="invalid_token"'),),
    ),
    Decision(Outcome.ERROR, "internal_error", "the authorization server failed to decide", ""),
    Decision(Outcome.ERROR, "", "", ID),
]


def test_every_kind_of_decision_encodes_as_protobuf_does() -> None:
    for d in DECISIONS:
        assert encode_check_response(d) == reference(d).SerializeToString(), d
        assert to_check_response(d) == reference(d)


def test_deny_body_is_json_dumps() -> None:
    for d in DECISIONS:
        row = OUTCOMES[d.outcome]
        expected = {"error": row.error, "reason": d.reason, "message": d.message}
        assert json.loads(deny_body(d)) == {**expected, "decision_id": d.decision_id}


_text = st.text(max_size=300)
_headers = st.lists(st.tuples(st.text(min_size=1, max_size=40), _text), max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    outcome=st.sampled_from(list(Outcome)),
    decision_id=st.sampled_from([ID, "", "é" * 16, "é" * 32]) | st.text(max_size=40),
    reason=_text,
    message=_text,
    headers=_headers,
    remove=st.lists(st.text(max_size=40), max_size=4),
    custom=st.none()
    | st.builds(DenyResponse, st.integers(100, 599), _headers.map(tuple), _text, _text),
)
def test_any_decision_encodes_as_protobuf_does(
    outcome: Outcome,
    decision_id: str,
    reason: str,
    message: str,
    headers: list[tuple[str, str]],
    remove: list[str],
    custom: DenyResponse | None,
) -> None:
    d = Decision(
        outcome,
        reason,
        message,
        decision_id,
        upstream_headers=(*headers, (DECISION_ID_HEADER, decision_id)),
        remove_headers=tuple(remove),
        client_headers=tuple(headers),
        deny_response=custom,
    )
    try:
        expected = reference(d).SerializeToString()
    except (ValueError, UnicodeError):  # a lone surrogate: protobuf refuses it, and so must we
        try:
            encode_check_response(d)
        except UnicodeError:
            return
        raise AssertionError("encoded a string protobuf refuses") from None
    assert encode_check_response(d) == expected


def test_varint_refuses_negative_numbers() -> None:
    from extauthz.wire import varint

    assert varint(300) == b"\xac\x02"
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_long_header_values_are_encoded_but_not_cached() -> None:
    from extauthz import response

    response._ok_header_lru.cache_clear()
    short, long = "v" * 10, "w" * (response._CACHED_VALUE_CHARS + 1)
    assert response._cached_ok_header("x-a", short) == response._ok_header("x-a", short)
    assert response._cached_ok_header("x-a", long) == response._ok_header("x-a", long)
    assert response._ok_header_lru.cache_info().currsize == 1
