"""Fuzzing the Check handler: never a crash, never an RPC error, never an allow the policies
do not grant. ``make fuzz`` runs the same targets under atheris for longer.

The target (:mod:`extauthz.devtools.fuzz`) serves a policy set whose allow condition is
known exactly, so any allow is checked against it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.devtools.fuzz import (
    GOOD_PEER,
    CheckTarget,
    Violation,
    check_xfcc,
    mutate_request,
    request,
    run_mutations,
)

MUTANTS = int(os.environ.get("FUZZ_MUTANTS", "100000"))


@pytest.fixture(scope="module")
def target() -> Iterator[CheckTarget]:
    t = CheckTarget()
    yield t
    t.close()


def test_the_oracle_can_fail(target: CheckTarget) -> None:
    """The target must notice a wrong allow: feed it an allow for a request it must deny."""
    bad = request("spiffe://cluster.local/ns/a/sa/bad", "GET", "/api/x", {})
    allow = external_auth_pb2.CheckResponse(ok_response=external_auth_pb2.OkHttpResponse())
    with pytest.raises(Violation, match="peer"):
        target._allowed_must_be_granted(bad, allow)


def test_seeds_reach_allow_and_every_kind_of_deny(target: CheckTarget) -> None:
    codes = [
        target.check(external_auth_pb2.CheckRequest.FromString(s)).status.code
        for s in target.seeds()
    ]
    assert codes == [0, 0, 7, 7, 7, 7, 16, 0, 7]


def test_100k_mutated_check_requests(target: CheckTarget) -> None:
    target.answers.clear()
    started = time.monotonic()
    seeds = target.seeds()
    assert run_mutations(target.check_bytes, seeds, MUTANTS, seed=1, edit=mutate_request) == MUTANTS
    took = time.monotonic() - started
    # Mutants must still reach the decision, not only the parser: every answer kind occurs.
    assert set(target.answers) >= {"0", "7", "16"}, target.answers
    print(f"\n{MUTANTS} mutants in {took:.1f} s; answers by gRPC code: {target.answers}")


def test_mutated_tokens_are_never_accepted(target: CheckTarget) -> None:
    seeds = [target.token.encode(), target.sign(sub="bob", aud="api").encode()]
    run_mutations(target.check_token, seeds, MUTANTS // 5, seed=2)


def test_mutated_xfcc_headers_parse_or_raise_xfcc_error() -> None:
    seeds = [
        b'By=spiffe://a/x;Hash=ab;Subject="/C=US/CN=x";URI=spiffe://td/ns/a/sa/b',
        b"By=http://a;URI=http://b,By=http://c;URI=spiffe://d;DNS=e.example",
    ]
    run_mutations(check_xfcc, seeds, MUTANTS // 5, seed=3)


# --- structured: the shapes the issue names, drawn by hypothesis ----------------------------

_TEXT = st.text(max_size=40)
_BINARY = st.binary(max_size=40)
_HEADER_NAME = st.sampled_from(
    ["authorization", "x-block", "cookie", "x-forwarded-client-cert", "host", "x-a", ":path"]
)


@st.composite
def hostile_requests(draw: st.DrawFn, token: str) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest()
    if draw(st.booleans()):
        http.method = draw(st.sampled_from(["GET", "POST", "", "get", "GET\x00", "CONNECT"]))
    path_kind = draw(st.sampled_from(["api", "huge", "text", "none", "query-token"]))
    if path_kind == "api":
        http.path = "/api/" + draw(_TEXT)
    elif path_kind == "huge":
        http.path = "/api/" + "a" * (1024 * 1024)  # 1 MB path
    elif path_kind == "text":
        http.path = draw(_TEXT)
    elif path_kind == "query-token":
        http.path = f"/api/x?access_token={token}&access_token={draw(_TEXT)}"
    token_value = draw(
        st.sampled_from(
            [
                f"Bearer {token}",
                f"bearer {token}",
                "Bearer " + token[:-3] + "abc",
                "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",
                "Bearer " + "eyJ" + "W" * 5000 + ".e30.x",
                "Bearer e30." + "eyJh" + "Ijp7" * 2000 + ".x",  # deep JSON-ish payload
                "",
            ]
        )
    )
    if draw(st.booleans()):  # encode_raw_headers: header_map with raw bytes and duplicates
        for _ in range(draw(st.integers(0, 6))):
            http.header_map.headers.add(key=draw(_HEADER_NAME), raw_value=draw(_BINARY))
        if token_value:
            http.header_map.headers.add(key="authorization", raw_value=token_value.encode())
        if draw(st.booleans()):
            http.header_map.headers.add(key="x-big", raw_value=b"\xff" * 65536)
    else:
        for _ in range(draw(st.integers(0, 6))):
            http.headers[draw(_HEADER_NAME)] = draw(_TEXT)
        if token_value:
            http.headers["authorization"] = token_value
    ctx = attribute_context_pb2.AttributeContext()
    if draw(st.booleans()):
        ctx.request.http.CopyFrom(http)
    ctx.source.principal = draw(
        st.sampled_from([GOOD_PEER, "", "spiffe://cluster.local/ns/a/sa/bad", "spiffe://", "x"])
    )
    if draw(st.booleans()):
        ctx.source.certificate = draw(st.sampled_from(["%ZZ", "-----BEGIN CERTIFICATE-----", ""]))
    if draw(st.booleans()):
        ctx.context_extensions["namespace"] = draw(_TEXT)
    return external_auth_pb2.CheckRequest(attributes=ctx)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_hostile_structured_requests(target: CheckTarget, data: st.DataObject) -> None:
    target.check(data.draw(hostile_requests(target.token)))


def test_the_token_oracle_accepts_every_token_the_target_signed(target: CheckTarget) -> None:
    target.check_token(target.sign(sub="bob", aud="api").encode())  # genuine: no Violation
    # Accepted by a verifier that trusts the target's key, but not among what the target
    # signed: only reachable if verification is broken, so the oracle is checked directly.
    forged = target.sign(sub="eve", aud="api")
    target.signed.discard(forged)
    with pytest.raises(Violation, match="never signed"):
        target.check_token(forged.encode())
