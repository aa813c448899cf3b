"""The HTTP transport, Envoy's ext_authz ``http_service``: the request model it reads
(:func:`from_http`, the peer header's refusals), the answer it writes
(:func:`encode_http_response`, held to say what the gRPC CheckResponse says but never with a
5xx; :class:`UpstreamNames`), :class:`HttpCheckServer` over real sockets (keep-alive,
pipelining, malformed input and limits, shedding, a JWKS refetch and its cancellation,
graceful stop, the decision log and its trace ids, one in-flight count with gRPC, a failed
start) and ``serve --http-listen`` through the CLI.

Requests are written by hand, as Envoy writes them (so they can be pipelined); answers are
read by h11, which refuses anything that is not well-formed HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h11
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.checks import FAILED, CheckRecorder
from extauthz.config import Settings
from extauthz.decision import Decision, DenyResponse, Outcome
from extauthz.decisionlog.log import DecisionLog
from extauthz.devtools.envoy import free_ports
from extauthz.devtools.idp import DevIdP, IdpServer
from extauthz.devtools.pki import DevCA
from extauthz.errors import ConfigError, RequestError, SpiffeIdError, TokenExpiredError
from extauthz.httpserver import HttpCheckServer
from extauthz.identity.jwks import FetchSettings, KeySetRegistry
from extauthz.policy.engine import PolicySet
from extauthz.request import (
    PEER_HEADER,
    TIMEOUT_HEADER,
    CheckInput,
    from_check_request,
    from_http,
)
from extauthz.response import (
    DECISION_ID_HEADER,
    HEADERS_TO_REMOVE,
    UnsafeHeaderError,
    UpstreamNames,
    deny_body,
    encode_http_response,
    http_status,
    to_check_response,
)
from extauthz.server import Server
from extauthz.telemetry import Telemetry

PREFIX = "/authz"  # Envoy's http_service path_prefix in the end-to-end tests
CALLER = "spiffe://td/ns/shop/sa/frontend"
PEER = f"namespace=shop;labels=app=orders;src=10.0.0.7:40001;dst=10.0.0.8:8443;uri={CALLER}"
ID = "0123456789abcdef0123456789abcdef"
POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["10.66.0.0/16"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  rules:
    - from: [{source: {principals: ["td/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: [GET], paths: ["/ok/*"]}}]
---
apiVersion: extauthz.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: quota, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/quota]}}]}]
  denyResponse:
    status: 429
    headers: {retry-after: "30"}
    body: {error: quota_exceeded}
"""


# --- 1. the request model: from_http -----------------------------------------------------


@dataclass(frozen=True)
class Read:
    """One http_service request and what the CheckInput read from it must hold."""

    target: str
    headers: dict[str, str]
    expect: dict[str, Any]
    prefix: str = ""


READS = {
    "prefix removed, query split": Read(
        "/authz/orders/1?expand=items&x=1",
        {},
        {"path": "/orders/1", "query": "expand=items&x=1", "method": "GET"},
        prefix="/authz",
    ),
    "the prefix alone is /": Read("/authz", {}, {"path": "/", "query": ""}, prefix="/authz"),
    "prefix, then only a query": Read("/authz/?a=1", {}, {"path": "/", "query": "a=1"}, "/authz"),
    "no prefix, empty query": Read("/x?", {}, {"path": "/x", "query": ""}),
    "host becomes a lower-case :authority": Read(
        "/x", {"host": "Orders.Shop:8080"}, {"host": "orders.shop:8080"}
    ),
    "Envoy's framing removed, pseudo-headers added": Read(
        "/authz/x?q=1",
        {
            "host": "orders.shop",
            "content-length": "0",
            TIMEOUT_HEADER: "250",
            PEER_HEADER: PEER,
            "x-envoy-internal": "true",  # Envoy's HTTP client marks every check with it
            "user-agent": "curl/8.5",
            "x-request-id": "req-1",
            "x-forwarded-proto": "https",
            "accept": "a/b,c/d",  # repeated, comma-joined: passed on as it is
        },
        {
            "headers": {
                ":authority": "orders.shop",
                ":method": "GET",
                ":path": "/x?q=1",
                "user-agent": "curl/8.5",
                "x-request-id": "req-1",
                "x-forwarded-proto": "https",
                "accept": "a/b,c/d",
            },
            "request_id": "req-1",
            "scheme": "https",
        },
        prefix="/authz",
    ),
    "the peer: addresses, principal, workload": Read(
        "/x",
        {PEER_HEADER: PEER},
        {
            "source_ip": "10.0.0.7",
            "source_port": 40001,
            "destination_ip": "10.0.0.8",
            "destination_port": 8443,
            "source_principal": CALLER,
            "context_extensions": {"namespace": "shop", "labels": "app=orders"},
        },
    ),
    "IPv6 addresses in brackets": Read(
        "/x",
        {PEER_HEADER: "src=[::1]:80;dst=[2001:db8::1]:8443;uri=spiffe://td/ns/a/sa/b"},
        {
            "source_ip": "::1",
            "source_port": 80,
            "destination_ip": "2001:db8::1",
            "destination_port": 8443,
            "context_extensions": {},
        },
    ),
    "a pipe address has no port": Read(
        "/x",
        {PEER_HEADER: "src=/run/envoy.sock;uri=spiffe://td/ns/a/sa/b"},
        {"source_ip": "/run/envoy.sock", "source_port": 0},
    ),
    "a ; inside the uri": Read(
        "/x",
        {PEER_HEADER: "src=1.2.3.4:5;uri=spiffe://td/ns/a/sa/b;v=1"},
        {"source_principal": "spiffe://td/ns/a/sa/b;v=1", "source_ip": "1.2.3.4"},
    ),
    "no URI SAN: no principal": Read(
        "/x",
        {PEER_HEADER: "namespace=shop;src=1.2.3.4:5;uri="},
        {"source_principal": "", "context_extensions": {"namespace": "shop"}},
    ),
    "a label key ending in uri is not the uri field": Read(
        "/x",
        {PEER_HEADER: "namespace=shop;labels=app=orders,datauri=on;src=10.0.0.7:1;uri=" + CALLER},
        {
            "source_principal": CALLER,
            "source_ip": "10.0.0.7",
            "context_extensions": {"namespace": "shop", "labels": "app=orders,datauri=on"},
        },
    ),
    "a long value (not cached) reads alike": Read(
        "/x",
        {PEER_HEADER: f"labels={'k=v,' * 200}x=y;src=1.2.3.4:5;uri={CALLER}"},
        {"source_principal": CALLER, "source_port": 5},
    ),
    "no peer header: no principal, no address": Read(
        "/x",
        {"host": "h"},
        {"source_principal": "", "source_ip": "", "source_port": 0, "context_extensions": {}},
    ),
}


@pytest.mark.parametrize("case", READS.values(), ids=READS.keys())
def test_from_http_reads_what_envoy_sends(case: Read) -> None:
    """Each field of the CheckInput is the one Envoy's http_service request carries."""
    inp = from_http("GET", case.target, dict(case.headers), case.prefix)
    for name, expected in case.expect.items():
        value = getattr(inp, name)
        assert (dict(value) if isinstance(value, Mapping) else value) == expected, name


def test_from_http_reads_what_a_check_request_carries() -> None:
    """Policies see the same request over either transport: the CheckInput read from the
    http_service request equals the one read from Envoy's gRPC CheckRequest for it."""
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.principal = CALLER
    attrs.source.address.socket_address.address = "10.0.0.7"
    attrs.source.address.socket_address.port_value = 40001
    attrs.destination.address.socket_address.address = "10.0.0.8"
    attrs.destination.address.socket_address.port_value = 8443
    attrs.context_extensions.update({"namespace": "shop", "labels": "app=orders"})
    http = attrs.request.http
    http.method, http.host, http.path = "POST", "orders.shop", "/p?q=1"
    http.headers.update(
        {":authority": "orders.shop", ":method": "POST", ":path": "/p?q=1", "x-a": "1"}
    )
    headers = {"host": "Orders.Shop", "content-length": "0", PEER_HEADER: PEER, "x-a": "1"}
    assert from_http("POST", "/authz/p?q=1", headers, "/authz") == from_check_request(req)


@pytest.mark.parametrize(
    ("target", "headers", "prefix", "match"),
    [
        ("/other/x", {}, "/authz", "is not under '/authz'"),
        ("/authzx/y", {}, "/authz", "is not under"),  # a prefix of the name, not of the path
        ("http://orders/x", {}, "", "origin-form"),
        ("*", {}, "", "origin-form"),
        ("/x", {PEER_HEADER: "namespace=shop;src=1.2.3.4:5"}, "", "no uri= field"),
        ("/x", {PEER_HEADER: "labels=datauri=x;src=1.2.3.4:5"}, "", "no uri= field"),
        ("/x", {PEER_HEADER: f"uri=spiffe://td/ns/a/sa/admin,{PEER}"}, "", "two uri= fields"),
        ("/x", {PEER_HEADER: f"{PEER},src=6.6.6.6:1;uri=spiffe://x/y"}, "", "two uri= fields"),
    ],
    ids=[
        "outside-prefix",
        "prefix-of-name",
        "absolute-form",
        "asterisk",
        "no-uri",
        "uri-in-key",
        "a-client-copy-before-envoys",
        "a-client-copy-after-envoys",
    ],
)
def test_from_http_refuses(target: str, headers: dict[str, str], prefix: str, match: str) -> None:
    """A target outside the prefix or not a path, a peer header without its uri field or
    with two (a client's copy joined with Envoy's: neither is believed), is a RequestError
    (the server answers it with a 403 request_invalid)."""
    with pytest.raises(RequestError, match=match):
        from_http("GET", target, headers, prefix)


@pytest.mark.parametrize(
    "uris",
    [
        "spiffe://td/ns/a/sa/one,spiffe://td/ns/a/sa/two",
        "spiffe://td/ns/a/sa/one, https://example.com/other",
        ",spiffe://td/ns/a/sa/one",
    ],
    ids=["two-spiffe-ids", "a-spiffe-id-and-another-uri", "an-empty-first"],
)
def test_several_uri_sans_are_refused(uris: str) -> None:
    """Envoy joins a certificate's URI SANs with ',': which one is the SPIFFE ID cannot be
    told (an SVID has exactly one), so the check is refused as an invalid identity (401)."""
    with pytest.raises(SpiffeIdError, match="several URI SANs"):
        from_http("GET", "/x", {PEER_HEADER: f"src=1.2.3.4:5;uri={uris}"}, "")


@pytest.mark.parametrize("prefix", ["authz", "/authz/", "/"])
def test_a_bad_path_prefix_is_a_config_error(prefix: str) -> None:
    """``--http-path-prefix`` is Envoy's path_prefix: /name, no trailing slash."""
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    with pytest.raises(ConfigError, match=f"--http-path-prefix '{prefix}'"):
        HttpCheckServer(recorder, "127.0.0.1:0", path_prefix=prefix)


@pytest.mark.parametrize("prefix", ["", "/authz", "/ext/authz"])
def test_a_good_path_prefix_is_kept(prefix: str) -> None:
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    assert HttpCheckServer(recorder, "127.0.0.1:0", path_prefix=prefix).path_prefix == prefix


# --- 2. the answer: encode_http_response ----------------------------------------------


@dataclass
class Answer:
    """One HTTP answer as a client reads it: headers in the order sent, values as text."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.body)
        return body


class AnswerReader:
    """Parses a server's answers strictly (h11), one per request, in order."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.CLIENT)
        self._answer: Answer | None = None

    def expect(self) -> None:
        """One more request was sent (the requests themselves are written by hand)."""
        self._h11.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        self._h11.send(h11.EndOfMessage())

    def feed(self, data: bytes) -> None:
        self._h11.receive_data(data)

    def next(self) -> Answer | None:
        """The answer, once whole; None if more bytes are needed."""
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                headers = [(k.decode(), v.decode()) for k, v in event.headers]
                self._answer = Answer(event.status_code, headers, b"")
            elif isinstance(event, h11.Data):
                assert self._answer is not None
                self._answer.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                answer, self._answer = self._answer, None
                assert answer is not None
                if self._h11.our_state is self._h11.their_state is h11.DONE:
                    self._h11.start_next_cycle()
                return answer
            else:
                raise AssertionError(f"unexpected {event!r}")

    @property
    def leftover(self) -> bytes:
        """Bytes the server sent beyond the answers read."""
        return bytes(self._h11.trailing_data[0])


def parse(raw: bytes) -> Answer:
    """The one answer ``raw`` holds, and nothing after it."""
    reader = AnswerReader()
    reader.expect()
    reader.feed(raw)
    answer = reader.next()
    assert answer is not None, raw
    assert reader.leftover == b"", raw
    return answer


@dataclass(frozen=True)
class Said:
    """What Envoy is told, whichever the transport: allowed or not, the status the client
    gets on deny, the headers (upstream on allow, to the client on deny), the headers to
    remove upstream, the body."""

    allowed: bool
    status: int
    headers: list[tuple[str, str]]
    removed: list[str]
    body: bytes


def said_over_http(decision: Decision) -> Said:
    answer = parse(encode_http_response(decision))
    headers = [(k, v) for k, v in answer.headers if k not in ("content-length", HEADERS_TO_REMOVE)]
    removed = answer.get(HEADERS_TO_REMOVE)
    assert answer.get("content-length") == str(len(answer.body))
    return Said(
        answer.status == 200,
        answer.status,
        headers,
        [] if removed is None else removed.split(","),
        answer.body,
    )


def said_over_grpc(decision: Decision) -> Said:
    resp = to_check_response(decision)
    if resp.status.code == 0:
        ok = resp.ok_response
        headers = [(h.header.key, h.header.value) for h in ok.headers]
        return Said(True, 200, headers, list(ok.headers_to_remove), b"")
    denied = resp.denied_response
    headers = [(h.header.key, h.header.value) for h in denied.headers]
    return Said(False, denied.status.code, headers, [], denied.body.encode())


_REFUSALS = Authorizer(PolicySet.empty())
SHED = CheckRecorder(_REFUSALS, Telemetry(None), max_in_flight=1).shed()
EXPIRED = _REFUSALS.refuse(TokenExpiredError('token "expired" at 12:00 \u2028 ☃'))
QUOTA = DenyResponse(429, (("retry-after", "30"), ("x-empty", "")), '{"error":"quota"}', "a/json")
DECISIONS = {
    "allow": Decision(Outcome.ALLOW, "allowed_by_policy", "allowed", ID),
    "allow with headers": Decision(
        Outcome.ALLOW,
        "allowed_by_policy",
        "allowed",
        ID,
        upstream_headers=(
            ("x-user", "alice"),
            ("x-name", "Zoë ☃ 𝄞"),  # a claim header: UTF-8 over both transports
            ("x-empty", ""),
            ("x-long", "v" * 300),  # past the cached encodings
            (DECISION_ID_HEADER, ID),
            ("x-extauthz-spiffe-id", CALLER),
        ),
        remove_headers=("authorization", "x-forwarded-client-cert"),
    ),
    "403 no allow": Decision(
        Outcome.PERMISSION_DENIED, "no_allow_policy_matched", "no ALLOW policy matched", ID
    ),
    "401 expired token": EXPIRED,
    "429 overloaded": SHED,
    "403 last resort": FAILED,
    "429 policy's own answer": Decision(
        Outcome.PERMISSION_DENIED, "denied_by_policy", "m", ID, deny_response=QUOTA
    ),
    "403 policy's own 503": Decision(
        Outcome.PERMISSION_DENIED,
        "denied_by_policy",
        "m",
        ID,
        deny_response=DenyResponse(503, (("retry-after", "5"),), "down", "text/plain"),
    ),
    "302 policy's own answer": Decision(
        Outcome.PERMISSION_DENIED,
        "no_allow_policy_matched",
        "m",
        ID,
        deny_response=DenyResponse(302, (("location", "https://login/é"),), "", "text/plain"),
    ),
}


@pytest.mark.parametrize(("name", "decision"), DECISIONS.items(), ids=DECISIONS.keys())
def test_the_http_answer_says_what_the_check_response_says(name: str, decision: Decision) -> None:
    """Headers (in order, byte for byte as UTF-8), headers to remove and body are those of
    the gRPC CheckResponse for the same decision; so is the status, but for a 5xx: Envoy
    takes a 5xx from an HTTP authorization server for its own failure (status_on_error
    without our body; failure_mode_allow would let the request through), so over HTTP it
    is a 429 when shed, else a 403."""
    http, grpc_ = said_over_http(decision), said_over_grpc(decision)
    status = grpc_.status
    if status >= 500:
        status = 429 if decision.reason == "overloaded" else 403
    assert http == Said(grpc_.allowed, status, grpc_.headers, grpc_.removed, grpc_.body)
    assert http.allowed == decision.allowed
    assert http.status == (200 if http.allowed else int(name.split()[0]))  # as named


def test_an_allow_is_a_200_with_the_upstream_headers_and_no_body() -> None:
    decision = DECISIONS["allow with headers"]._replace(
        upstream_headers=(("x-user", "alice"), (DECISION_ID_HEADER, ID))
    )
    assert encode_http_response(decision) == (
        b"HTTP/1.1 200 OK\r\n"
        b"x-user: alice\r\n"
        b"x-extauthz-decision-id: " + ID.encode() + b"\r\n"
        b"x-envoy-auth-headers-to-remove: authorization,x-forwarded-client-cert\r\n"
        b"content-length: 0\r\n\r\n"
    )
    plain = parse(encode_http_response(DECISIONS["allow"]))
    assert plain == Answer(200, [("content-length", "0")], b"")  # nothing to remove: no header


@pytest.mark.parametrize(
    ("name", "status", "reason", "client_header"),
    [
        ("401 expired token", 401, "jwt_expired", "www-authenticate"),
        ("403 no allow", 403, "no_allow_policy_matched", None),
        ("429 overloaded", 429, "overloaded", "retry-after"),
        ("403 last resort", 403, "internal_error", None),
    ],
)
def test_a_deny_is_its_status_with_the_json_body(
    name: str, status: int, reason: str, client_header: str | None
) -> None:
    """The default deny: the outcome's status, JSON naming the reason and the decision id
    (in a header too), and the headers the client needs (how to authenticate, when to retry)."""
    decision = DECISIONS[name]
    raw = encode_http_response(decision)
    assert raw.startswith(f"HTTP/1.1 {status} ".encode())
    answer = parse(raw)
    assert answer.status == status
    assert answer.get("content-type") == "application/json"
    assert answer.get(DECISION_ID_HEADER) == decision.decision_id
    assert answer.body == deny_body(decision).encode()
    body = answer.json()
    assert (body["reason"], body["decision_id"]) == (reason, decision.decision_id)
    if client_header is not None:
        assert answer.get(client_header) == dict(decision.client_headers)[client_header]
    assert answer.get("connection") is None  # keep-alive is the default


def test_the_expired_token_answer_tells_how_to_authenticate() -> None:
    answer = parse(encode_http_response(EXPIRED))
    assert answer.get("www-authenticate") == (
        'Bearer realm="extauthz", error="invalid_token", error_description="jwt_expired"'
    )
    assert answer.json()["message"] == 'token "expired" at 12:00 \u2028 ☃'
    assert parse(encode_http_response(SHED)).get("retry-after") == "1"


def test_a_policys_deny_response_replaces_status_body_and_content_type() -> None:
    decision = DECISIONS["429 policy's own answer"]
    answer = parse(encode_http_response(decision))
    assert answer.status == 429
    assert answer.headers == [
        ("content-type", "a/json"),
        (DECISION_ID_HEADER, ID),  # the decision can still be looked up
        ("retry-after", "30"),
        ("x-empty", ""),
        ("content-length", "17"),
    ]
    assert answer.body == b'{"error":"quota"}'


def _deny(outcome: Outcome, reason: str, status: int | None = None) -> Decision:
    """A deny of ``outcome``, with a policy's deny response of ``status`` if given."""
    custom = None if status is None else DenyResponse(status, (), "", "text/plain")
    return Decision(outcome, reason, "m", ID, deny_response=custom)


UNAUTHENTICATED, DENIED, ERROR = Outcome.UNAUTHENTICATED, Outcome.PERMISSION_DENIED, Outcome.ERROR
HTTP_STATUSES = {
    "unauthenticated": (_deny(UNAUTHENTICATED, "jwt_expired"), 401),
    "permission denied": (_deny(DENIED, "no_allow_policy_matched"), 403),
    "error: the last resort": (FAILED, 403),
    "error: keys unavailable": (_deny(ERROR, "jwks_unavailable"), 403),
    "error: shed": (SHED, 429),
    "policy's 429": (_deny(DENIED, "denied_by_policy", 429), 429),
    "policy's 302": (_deny(DENIED, "denied_by_policy", 302), 302),
    "policy's 401": (_deny(DENIED, "denied_by_policy", 401), 401),
    "policy's 500": (_deny(DENIED, "denied_by_policy", 500), 403),
    "policy's 503": (_deny(DENIED, "denied_by_policy", 503), 403),
    "policy's 599": (_deny(DENIED, "denied_by_policy", 599), 403),
    "policy's 200": (_deny(DENIED, "denied_by_policy", 200), 403),
    "policy's 204 on unauthenticated": (_deny(UNAUTHENTICATED, "jwt_missing", 204), 403),
    "policy's 100": (_deny(DENIED, "denied_by_policy", 100), 403),
}


@pytest.mark.parametrize(("decision", "status"), HTTP_STATUSES.values(), ids=HTTP_STATUSES.keys())
def test_http_status_is_never_2xx_for_a_deny_nor_ever_5xx(decision: Decision, status: int) -> None:
    """A deny's HTTP status: the outcome's or the policy's, but a 2xx (an allow to Envoy)
    is a 403, and a 5xx (Envoy's own failure to Envoy) a 403, or a 429 when shed."""
    assert http_status(decision) == status
    assert parse(encode_http_response(decision)).status == status


@pytest.mark.parametrize("name", ["allow", "allow with headers", "403 no allow", "403 last resort"])
def test_keep_alive_false_closes_the_connection(name: str) -> None:
    """``keep_alive=False``: one ``connection: close``, the answer otherwise the same."""
    decision = DECISIONS[name]
    kept, closing = encode_http_response(decision), encode_http_response(decision, keep_alive=False)
    answer = parse(closing)
    assert answer.get("connection") == "close"
    assert [h for h in answer.headers if h[0] != "connection"] == parse(kept).headers
    assert answer.body == parse(kept).body


ALLOW, DENY = DECISIONS["allow"], DECISIONS["403 no allow"]


@pytest.mark.parametrize(
    "decision",
    [
        ALLOW._replace(upstream_headers=(("x-user", "a\r\nx-admin: true"),)),
        ALLOW._replace(upstream_headers=(("x-user\n", "a"),)),
        ALLOW._replace(upstream_headers=(("x-user", "a\0b"),)),
        ALLOW._replace(upstream_headers=((DECISION_ID_HEADER, "0" * 30 + "\r\n"),)),
        ALLOW._replace(remove_headers=("authorization\r\nx-admin: true",)),
        DENY._replace(client_headers=(("www-authenticate", "Bearer\rx"),)),
        DENY._replace(deny_response=DenyResponse(429, (("x-limit", "1\n"),), "", "text/plain")),
        DENY._replace(decision_id="id\r\n"),
    ],
    ids=[
        "value-crlf",
        "name-lf",
        "value-nul",
        "id-of-id-length-crlf",
        "removed-crlf",
        "client-cr",
        "custom-lf",
        "deny-id-crlf",
    ],
)
def test_a_header_that_would_split_the_answer_raises(decision: Decision) -> None:
    """CR, LF or NUL anywhere in a header: UnsafeHeaderError (the server then answers its
    last resort, a 403), never an answer with a header of the caller's making."""
    with pytest.raises(UnsafeHeaderError):
        encode_http_response(decision)


# Envoy copies upstream only the answer headers its allowed_upstream_headers names
# (--http-upstream-headers); one extauthz sets under another name is removed instead, so a
# client's own copy of it cannot reach the upstream either.

SET = (
    ("x-user", "alice"),
    ("authorization", "Bearer minted"),
    ("user-id", "7"),  # no x- prefix
    ("xuser", "b"),  # x, but not x-
    ("authorization-extra", "c"),  # authorization is a name, not a prefix
    (DECISION_ID_HEADER, ID),
)


def upstream_of(decision: Decision, upstream: UpstreamNames) -> tuple[list[str], list[str]]:
    """The names an allow sends upstream and those it removes, under ``upstream``."""
    answer = parse(encode_http_response(decision, upstream=upstream))
    assert answer.status == 200
    sent = [k for k, _ in answer.headers if k not in ("content-length", HEADERS_TO_REMOVE)]
    return sent, (answer.get(HEADERS_TO_REMOVE) or "").split(",")


def test_by_default_x_headers_and_authorization_go_upstream_the_rest_are_removed() -> None:
    decision = ALLOW._replace(upstream_headers=SET, remove_headers=("x-forwarded-client-cert",))
    sent, removed = upstream_of(decision, UpstreamNames())
    assert sent == ["x-user", "authorization", DECISION_ID_HEADER]
    assert removed == ["x-forwarded-client-cert", "user-id", "xuser", "authorization-extra"]


def test_upstream_names_of_ones_own_are_trimmed_lower_cased_names_and_prefixes() -> None:
    upstream = UpstreamNames(" X-Tenant , user-* ,,")
    decision = ALLOW._replace(upstream_headers=(("x-tenant", "t"), ("x-user", "u"), *SET[2:]))
    sent, removed = upstream_of(decision, upstream)
    assert sent == ["x-tenant", "user-id"]
    # The decision id too: a name Envoy would drop is removed, whoever sets it.
    assert removed == ["x-user", "xuser", "authorization-extra", DECISION_ID_HEADER]
    assert not upstream.forwarded("x-tenant-id")  # a name, not a prefix
    assert upstream.forwarded("user-")


def test_a_name_that_cannot_go_upstream_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A warning per name (the operator's config and Envoy's disagree), not per check."""
    upstream = UpstreamNames()
    decision = ALLOW._replace(upstream_headers=SET)
    with caplog.at_level(logging.WARNING, logger="extauthz.response"):
        for _ in range(3):
            encode_http_response(decision, upstream=upstream)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3
    for name in ("user-id", "xuser", "authorization-extra"):
        (message,) = [m for m in warned if f"header '{name}'" in m]
        assert "--http-upstream-headers 'x-*,authorization'" in message


@pytest.mark.parametrize(
    "patterns", ["", " , ", "*", "**", "x-*-y", "*-user", "x user", "x-**", "x:y", "x\ty"]
)
def test_bad_upstream_names_are_a_config_error_naming_the_flag(patterns: str) -> None:
    with pytest.raises(ConfigError, match=f"--http-upstream-headers {re.escape(repr(patterns))}"):
        UpstreamNames(patterns)
    with pytest.raises(ConfigError, match="--http-upstream-headers"):
        Server(
            Authorizer(PolicySet.empty()),
            Telemetry(None),
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            http_upstream_headers=patterns,
        )
    with pytest.raises(ConfigError, match="--http-upstream-headers"):  # no HTTP listener
        Server(
            Authorizer(PolicySet.empty()),
            Telemetry(None),
            listen="127.0.0.1:0",
            http_upstream_headers=patterns,
        )


def test_the_status_of_an_allow_is_200() -> None:
    assert http_status(ALLOW) == 200


# --- 3. HttpCheckServer over real sockets -----------------------------------------------


def envoy_request(
    path: str,
    *,
    method: str = "GET",
    peer: str | None = PEER,
    headers: Mapping[str, str] | None = None,
    prefix: str = PREFIX,
    version: str = "HTTP/1.1",
    lines: tuple[str, ...] = (),
) -> bytes:
    """A check request as Envoy's http_service sends it; ``lines``: more header lines, as
    they are (a name repeated, in any case)."""
    head = [
        f"{method} {prefix}{path} {version}",
        "host: orders.shop",
        "content-length: 0",
        f"{TIMEOUT_HEADER}: 5000",
    ]
    if peer is not None:
        head.append(f"{PEER_HEADER}: {peer}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head += lines
    return ("\r\n".join(head) + "\r\n\r\n").encode()


class Client:
    """One connection to the listener, as Envoy's: requests written by hand, answers read
    strictly in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._answers = AnswerReader()

    @classmethod
    async def connect(cls, server: HttpCheckServer) -> Client:
        if isinstance(server.address, str):
            return cls(*await asyncio.open_unix_connection(server.address))
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    async def send(self, *requests: bytes) -> None:
        """``requests`` in one write: more than one is pipelined."""
        self._writer.write(b"".join(requests))
        await self._writer.drain()

    async def answer(self, timeout: float = 10.0) -> Answer:
        self._answers.expect()
        async with asyncio.timeout(timeout):
            while (answer := self._answers.next()) is None:
                data = await self._reader.read(65536)
                assert data, "the server closed the connection without answering"
                self._answers.feed(data)
        return answer

    async def ask(self, request: bytes) -> Answer:
        await self.send(request)
        return await self.answer()

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection, with nothing sent after the answers."""
        assert self._answers.leftover == b""
        async with asyncio.timeout(timeout):
            data = await self._reader.read(65536)
        return data == b""

    async def close(self) -> None:
        self._writer.close()
        await asyncio.gather(self._writer.wait_closed(), return_exceptions=True)


def write_policies(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "p.yaml").write_text(POLICIES)
    return directory


class MemorySink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


class HoldingAuthorizer(Authorizer):
    """Holds every check where an unknown ``kid`` would: :meth:`check_now` hands the
    transport a JWKS refetch still running (a Future the test completes), so checks wait in
    :meth:`check_again`, counted in flight by the transport, until :meth:`release` (the keys
    came: decided once more). gRPC's check_async goes through the same two halves."""

    def __init__(self, policies: PolicySet) -> None:
        super().__init__(policies, Settings(jwks=FetchSettings(timeout=30.0)))
        self.refetch: Future[bool] = Future()
        self.held = 0

    def check_now(self, inp: CheckInput) -> tuple[Decision, Future[bool] | None, PolicySet]:
        decision, _, policies = super().check_now(inp)
        self.held += 1
        return decision, self.refetch, policies

    async def check_again(
        self,
        inp: CheckInput,
        decision: Decision,
        pending: Future[bool],
        policies: PolicySet,
        *,
        wait: float,
    ) -> Decision:
        try:
            return await super().check_again(inp, decision, pending, policies, wait=wait)
        finally:
            self.held -= 1

    def release(self) -> None:
        if not self.refetch.done():
            self.refetch.set_result(True)


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


@dataclass
class Rig:
    """A started HttpCheckServer, and the clients connected to it (closed at the end)."""

    server: HttpCheckServer
    recorder: CheckRecorder
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        client = await Client.connect(self.server)
        self.clients.append(client)
        return client


@asynccontextmanager
async def started(recorder: CheckRecorder, listen: str = "127.0.0.1:0") -> AsyncIterator[Rig]:
    """An HttpCheckServer for ``recorder`` on ``listen``, behind Envoy's path_prefix."""
    server = HttpCheckServer(recorder, listen, path_prefix=PREFIX)
    await server.start()
    rig = Rig(server, recorder)
    try:
        yield rig
    finally:
        for client in rig.clients:
            await client.close()
        await server.stop(1.0)


def recorder_for(authorizer: Authorizer, max_in_flight: int = 0) -> CheckRecorder:
    return CheckRecorder(authorizer, Telemetry(None), max_in_flight=max_in_flight)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The listener on 127.0.0.1:0, deciding with the test policies."""
    authorizer = Authorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    async with started(recorder_for(authorizer)) as made:
        yield made


@pytest.fixture(params=["tcp", "unix"])
async def listening(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """The listener on 127.0.0.1:0 and on a Unix socket, deciding with the test policies."""
    authorizer = Authorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    listen = "127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path / 'authz.sock'}"
    async with started(recorder_for(authorizer), listen) as made:
        yield made


@dataclass(frozen=True)
class Check:
    """A request to the listener and the answer the policies give it."""

    request: bytes
    status: int
    reason: str  # "" for an allow


CHECKS = {
    "allowed": Check(envoy_request("/ok/1"), 200, ""),
    "no allow matched": Check(envoy_request("/private"), 403, "no_allow_policy_matched"),
    "wrong method": Check(envoy_request("/ok/1", method="POST"), 403, "no_allow_policy_matched"),
    "another caller": Check(
        envoy_request("/ok/1", peer=PEER.replace("sa/frontend", "sa/intruder")),
        403,
        "no_allow_policy_matched",
    ),
    "a blocked source address": Check(
        envoy_request("/ok/1", peer=PEER.replace("10.0.0.7", "10.66.1.2")), 403, "denied_by_policy"
    ),
    "no peer header: no workload": Check(
        envoy_request("/ok/1", peer=None), 403, "workload_unknown"
    ),
    "outside the path prefix": Check(envoy_request("/ok/1", prefix=""), 403, "request_invalid"),
    "a peer header without uri": Check(
        envoy_request("/ok/1", peer="namespace=shop;src=10.0.0.7:1"), 403, "request_invalid"
    ),
    "a peer header with two uri fields": Check(
        envoy_request("/ok/1", peer=f"uri=spiffe://td/ns/shop/sa/admin,{PEER}"),
        403,
        "request_invalid",
    ),
    "a peer with several URI SANs": Check(
        envoy_request("/ok/1", peer=f"{PEER},spiffe://td/ns/shop/sa/admin"),
        401,
        "spiffe_id_invalid",
    ),
    "a policy's own deny": Check(envoy_request("/quota"), 429, ""),
}


@pytest.mark.parametrize("case", CHECKS.values(), ids=CHECKS.keys())
async def test_a_check_over_a_real_socket(listening: Rig, case: Check) -> None:
    """The policies' answer, from the request Envoy sends: a 200 with the identity headers
    for upstream, or the deny the client gets, with its decision id."""
    client = await listening.connect()
    answer = await client.ask(case.request)
    assert answer.status == case.status, answer
    decision_id = answer.get(DECISION_ID_HEADER)
    assert decision_id is not None
    assert len(decision_id) == 32
    if case.status == 200:
        assert answer.get("x-extauthz-spiffe-id") == CALLER
        assert "x-forwarded-client-cert" in (answer.get(HEADERS_TO_REMOVE) or "").split(",")
        assert answer.body == b""
    elif case.reason:
        assert answer.get("content-type") == "application/json"
        assert (answer.json()["reason"], answer.json()["decision_id"]) == (
            case.reason,
            decision_id,
        )
    else:  # the quota policy's own answer
        assert answer.get("retry-after") == "30"
        assert answer.json() == {"error": "quota_exceeded"}
    assert listening.recorder.telemetry.in_flight == 0


async def test_a_unix_socket_left_behind_is_replaced_and_removed_at_stop(tmp_path: Path) -> None:
    """A socket file a dead process left does not stop the start; stop removes ours."""
    path = tmp_path / "authz.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    assert path.exists()
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    server = HttpCheckServer(recorder, f"unix:{path}")
    await server.start()
    try:
        client = await Client.connect(server)
        assert (await client.ask(envoy_request("/x", prefix=""))).status == 200
        await client.close()
    finally:
        await server.stop(1.0)
    assert not path.exists()


async def test_a_regular_file_at_the_unix_path_is_left_alone(tmp_path: Path) -> None:
    """Only a socket is taken for one a dead process left: a file is no one's to delete."""
    path = tmp_path / "authz.sock"
    path.write_text("not a socket")
    server = HttpCheckServer(
        CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None)), f"unix:{path}"
    )
    with pytest.raises(
        ConfigError, match=f"--http-listen unix:{re.escape(str(path))}: cannot bind"
    ):
        await server.start()
    assert path.read_text() == "not a socket"


async def test_the_unix_socket_is_for_its_owner_and_group_only(tmp_path: Path) -> None:
    """Mode 0660 whatever the umask: whoever can connect can claim any identity."""
    path = tmp_path / "authz.sock"
    server = HttpCheckServer(
        CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None)), f"unix:{path}"
    )
    umask = os.umask(0)  # the socket would otherwise be 0777
    try:
        await server.start()
    finally:
        os.umask(umask)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        await server.stop(1.0)


async def test_requests_one_after_another_on_one_keep_alive_connection(rig: Rig) -> None:
    """Envoy reuses its connections: each answer leaves the connection open for the next."""
    client = await rig.connect()
    for path, status in [("/ok/1", 200), ("/private", 403), ("/ok/2", 200), ("/quota", 429)]:
        answer = await client.ask(envoy_request(path))
        assert answer.status == status, path
        assert answer.get("connection") is None
    assert rig.recorder.telemetry.in_flight == 0


async def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    """Several requests in one write: one answer each, in the order they were sent."""
    client = await rig.connect()
    sent = [CHECKS[name] for name in ("allowed", "no allow matched", "a policy's own deny")] * 3
    sent.append(CHECKS["outside the path prefix"])
    await client.send(*(c.request for c in sent))
    answers = [await client.answer() for _ in sent]
    assert [a.status for a in answers] == [c.status for c in sent]
    ids = [a.get(DECISION_ID_HEADER) for a in answers]
    assert len(set(ids)) == len(sent)  # one decision per request
    # Still open and in step after them.
    assert (await client.ask(envoy_request("/ok/3"))).status == 200


MALFORMED = {
    "not HTTP": b"NOT HTTP AT ALL\r\n\r\n",
    "a header line without a colon": b"GET /authz/x HTTP/1.1\r\nhost: a\r\nno colon here\r\n\r\n",
    "headers over 64 KiB": envoy_request("/ok/1", headers={"x-big": "a" * 70_000}),
    "a bad content-length": b"GET /authz/x HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_gets_a_400_and_the_connection_closes(
    rig: Rig, raw: bytes
) -> None:
    """What cannot be read as HTTP/1.1 is not a check: a 400 (Envoy answers its client
    with status_on_error, a deny) and the connection closes."""
    client = await rig.connect()
    answer = await client.ask(raw)
    assert answer.status == 400
    assert answer.get("connection") == "close"
    assert answer.get(DECISION_ID_HEADER) is None
    assert await client.closed_by_server()


def many_headers(count: int) -> bytes:
    """A check request of ``count`` header lines in all (envoy_request writes four)."""
    return envoy_request("/ok/1", lines=tuple(f"x-h{i}: v" for i in range(count - 4)))


LIMITS = {
    "a target over 64 KiB": (
        envoy_request("/ok/" + "a" * 64 * 1024),
        "request target over 65536 bytes",
    ),
    "257 headers": (many_headers(257), "more than 256 request headers"),
}


@pytest.mark.parametrize(("raw", "error"), LIMITS.values(), ids=LIMITS.keys())
async def test_a_request_past_a_limit_gets_a_400_and_the_connection_closes(
    rig: Rig, raw: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limits on the target's length and the headers' number (Envoy's own are
    lower): a 400 and the connection closes, as a malformed request; the limit is logged."""
    client = await rig.connect()
    with caplog.at_level(logging.WARNING, logger="extauthz.httpserver"):
        answer = await client.ask(raw)
    assert answer.status == 400
    assert answer.get("connection") == "close"
    assert await client.closed_by_server()
    assert "cannot read an HTTP check (" in caplog.text
    assert "); answering 400" in caplog.text
    assert "Traceback" not in caplog.text  # a limit is one line, not a bug's traceback
    assert error in caplog.text
    assert rig.recorder.telemetry.in_flight == 0


@pytest.mark.parametrize(
    "raw",
    [envoy_request("/ok/" + "a" * 60_000), many_headers(256)],
    ids=["a-60-KiB-target", "256-headers"],
)
async def test_a_request_within_the_limits_is_a_check(rig: Rig, raw: bytes) -> None:
    client = await rig.connect()
    assert (await client.ask(raw)).status == 200


async def test_garbage_after_a_good_request_is_answered_after_it(rig: Rig) -> None:
    """Pipelined, a good request is answered before the 400 for what follows it."""
    client = await rig.connect()
    await client.send(envoy_request("/ok/1"), b"GARBAGE\r\n\r\n")
    assert (await client.answer()).status == 200
    assert (await client.answer()).status == 400
    assert await client.closed_by_server()


@pytest.mark.parametrize(
    "request_bytes",
    [
        envoy_request("/ok/1", headers={"connection": "close"}),
        envoy_request("/ok/1", version="HTTP/1.0"),  # HTTP/1.0 closes unless asked not to
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_request_that_closes_is_answered_then_the_connection_closes(
    rig: Rig, request_bytes: bytes
) -> None:
    client = await rig.connect()
    answer = await client.ask(request_bytes)
    assert answer.status == 200
    assert answer.get("connection") == "close"
    assert await client.closed_by_server()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (envoy_request("/ok/1", headers={"connection": "upgrade", "upgrade": "websocket"}), 200),
        (envoy_request("orders.shop:443", method="CONNECT", prefix=""), 403),
    ],
    ids=["websocket-upgrade", "connect"],
)
async def test_an_upgrade_request_is_answered_once_then_the_connection_closes(
    rig: Rig, request_bytes: bytes, status: int
) -> None:
    """The check of a websocket upgrade (or a CONNECT) is a check like any other: one
    answer, with connection: close (the parser reads nothing after such a request), and
    never a 400 after it, which would be a second answer to the same request."""
    client = await rig.connect()
    answer = await client.ask(request_bytes + b"\x00bytes of another protocol")
    assert answer.status == status
    assert answer.get("connection") == "close"
    assert await client.closed_by_server()


async def test_an_upgrade_request_behind_a_waiting_one_is_answered_after_it(
    tmp_path: Path,
) -> None:
    """Queued behind a check that waits for keys, the upgrade request neither overtakes it
    nor closes the connection before it is answered: both answers come, in order."""
    authorizer = HoldingAuthorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    upgrade = envoy_request("/ok/1", headers={"connection": "upgrade", "upgrade": "websocket"})
    try:
        async with started(recorder_for(authorizer)) as rig:
            client = await rig.connect()
            await client.send(envoy_request("/private"), upgrade + b"\x00another protocol")
            await until(lambda: authorizer.held == 1, "the first check held")
            authorizer.release()
            first, second = await client.answer(), await client.answer()
            assert (first.status, second.status) == (403, 200)
            assert (first.get("connection"), second.get("connection")) == (None, "close")
            assert await client.closed_by_server()
    finally:
        authorizer.release()


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:0", "10.1.2.3:9000", "[::]:9000", "orders.shop:9000"],
)
def test_only_a_loopback_address_is_accepted(listen: str) -> None:
    """The listener trusts the peer header: anyone who can reach it can claim any identity."""
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    with pytest.raises(
        ConfigError, match=rf"--http-listen {re.escape(listen)}: only a loopback address"
    ):
        HttpCheckServer(recorder, listen)
    with pytest.raises(
        ConfigError, match=rf"--http-listen {re.escape(listen)}: only a loopback address"
    ):
        Server(
            Authorizer(PolicySet.empty()), Telemetry(None), listen="127.0.0.1:0", http_listen=listen
        )


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:port", "127.0.0.1:70000", "unix:x"])
def test_a_listen_value_that_is_no_address_is_refused(listen: str) -> None:
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    with pytest.raises(ConfigError, match=r"--http-listen .*expected"):
        HttpCheckServer(recorder, listen)


async def test_a_port_in_use_is_a_config_error_at_start() -> None:
    recorder = CheckRecorder(Authorizer(PolicySet.empty()), Telemetry(None))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpCheckServer(recorder, f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"--http-listen 127.0.0.1:{port}: cannot bind"):
            await server.start()


async def test_over_the_limit_a_check_is_shed_with_a_429_and_the_limit_frees_up(
    tmp_path: Path,
) -> None:
    """With ``max_concurrent_checks`` checks waiting for keys, the next is answered at once
    with a 429 ``overloaded`` (and retry-after; a 503 would be Envoy's own failure), not
    queued; the held ones are then decided by the policies, and checks are admitted again."""
    authorizer = HoldingAuthorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    try:
        async with started(recorder_for(authorizer, max_in_flight=2)) as rig:
            telemetry = rig.recorder.telemetry
            clients = [await rig.connect() for _ in range(3)]
            for client, path in zip(clients[:2], ["/ok/1", "/private"], strict=True):
                await client.send(envoy_request(path))
            await until(lambda: authorizer.held == 2, "two checks held")
            assert telemetry.in_flight == 2
            shed = await clients[2].ask(envoy_request("/ok/2"))
            assert shed.status == 429
            assert shed.json()["reason"] == "overloaded"
            assert shed.get("retry-after") == "1"
            assert authorizer.held == 2  # the shed one never reached the policies
            authorizer.release()
            assert [(await c.answer()).status for c in clients[:2]] == [200, 403]
            assert telemetry.in_flight == 0
            assert (await clients[2].ask(envoy_request("/ok/2"))).status == 200  # admitted
    finally:
        authorizer.release()


class UnencodableAuthorizer(Authorizer):
    """Allows with a header value a caller's claim could hold, were it not refused on the
    way (CR LF): the answer cannot be written."""

    def check_now(self, inp: CheckInput) -> tuple[Decision, Future[bool] | None, PolicySet]:
        decision, pending, policies = super().check_now(inp)
        return (
            decision._replace(upstream_headers=(("x-user", "a\r\nx-admin: true"),)),
            pending,
            policies,
        )


class BrokenAuthorizer(Authorizer):
    """Breaks the Authorizer's never-raise contract: the transport's own net must hold."""

    def check_now(self, inp: CheckInput) -> tuple[Decision, Future[bool] | None, PolicySet]:
        raise RuntimeError("boom")


@pytest.mark.parametrize("broken", [UnencodableAuthorizer, BrokenAuthorizer])
async def test_a_decision_that_cannot_be_answered_is_a_403_last_resort(
    broken: type[Authorizer],
) -> None:
    """Whatever fails after the request is read, Envoy gets an answer, a 403 deny (never an
    allow, never a 5xx, never a header of the caller's making), recorded, and the connection
    serves on."""
    async with started(recorder_for(broken(PolicySet.empty()))) as rig:
        client = await rig.connect()
        for _ in range(2):
            answer = await client.ask(envoy_request("/ok/1"))
            assert answer.status == 403
            assert answer.json()["reason"] == "internal_error"
            assert answer.get("x-admin") is None
            assert b"boom" not in answer.body
        assert rig.recorder.telemetry.in_flight == 0


async def test_a_connection_waiting_for_keys_is_not_read_until_answered(tmp_path: Path) -> None:
    """While its check waits for a JWKS refetch, the connection's reading is paused (what
    Envoy sends behind it stays in the socket, not in our queue), and resumes after."""
    authorizer = HoldingAuthorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    try:
        async with started(recorder_for(authorizer)) as rig:
            client = await rig.connect()
            await client.send(envoy_request("/ok/1"))
            await until(lambda: authorizer.held == 1, "the check held")
            (conn,) = rig.server._connections
            assert not conn._transport.is_reading()
            authorizer.release()
            assert (await client.answer()).status == 200
            assert conn._transport.is_reading()
            assert (await client.ask(envoy_request("/private"))).status == 403
    finally:
        authorizer.release()


async def test_a_cancelled_wait_for_keys_still_answers_once(tmp_path: Path) -> None:
    """The task waiting for keys cancelled (the loop closing): its request still gets one
    answer, the last resort (a 403), and the one queued behind it is then decided."""
    authorizer = HoldingAuthorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    try:
        async with started(recorder_for(authorizer)) as rig:
            client = await rig.connect()
            await client.send(envoy_request("/ok/1"), envoy_request("/private"))
            await until(lambda: authorizer.held == 1, "the first check held")
            (task,) = rig.server._tasks
            task.cancel()
            first = await client.answer()
            assert (first.status, first.json()["reason"]) == (403, "internal_error")
            await until(lambda: authorizer.held == 1, "the queued check held in its turn")
            authorizer.release()
            second = await client.answer()
            assert (second.status, second.json()["reason"]) == (403, "no_allow_policy_matched")
            assert (await client.ask(envoy_request("/ok/2"))).status == 200  # in step
            assert task.cancelled()
            assert rig.recorder.telemetry.in_flight == 0
    finally:
        authorizer.release()


# --- the unknown-kid refetch against a real HTTPS IdP ------------------------------------


def jwt_policies(issuer: str, jwks_uri: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: shop}}
spec:
  jwtRules: [{{issuer: "{issuer}", audiences: [orders], jwksUri: "{jwks_uri}"}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: users, namespace: shop}}
spec:
  rules:
    - from: [{{source: {{requestPrincipals: ["{issuer}/*"]}}}}]
      to: [{{operation: {{paths: ["/orders/*"]}}}}]
"""


async def test_a_check_waits_for_the_jwks_refetch_and_the_ones_behind_it_wait_in_order(
    tmp_path: Path, idp: IdpServer, ca: tuple[DevCA, Path]
) -> None:
    """A token signed by a key the IdP published after the last fetch: the check waits for
    the early refetch and is allowed; the requests pipelined behind it on the same connection,
    each decidable at once, are answered after it and in the order they were sent."""
    k1, k2 = DevIdP.create(idp.issuer, kid="k1"), DevIdP.create(idp.issuer, kid="k2")
    idp.publish(k1)
    fetch = FetchSettings(min_refetch_interval=60.0, timeout=5.0, ca_file=str(ca[1]))
    registry = KeySetRegistry(fetch)
    try:
        (tmp_path / "p.yaml").write_text(jwt_policies(idp.issuer, idp.jwks_uri))
        policies = PolicySet.load(tmp_path, keys=registry)
        assert idp.fetches() == 1
        authorizer = Authorizer(policies, Settings(jwks=fetch))
        idp.publish(k1, k2)  # rotated in after the fetch
        idp.delay = 0.3

        def bearer(signer: DevIdP) -> dict[str, str]:
            token = signer.token("alice", audience="orders", jti=uuid.uuid4().hex)
            return {"authorization": f"Bearer {token}"}

        sent = [
            (envoy_request("/orders/1", headers=bearer(k2)), 200, ""),  # waits for the keys
            (envoy_request("/orders/2"), 403, "no_allow_policy_matched"),
            (envoy_request("/orders/3", headers=bearer(k1)), 200, ""),
            (
                envoy_request("/orders/4", headers={"authorization": "Bearer x.y"}),
                401,
                "jwt_malformed",
            ),
        ]
        async with started(recorder_for(authorizer)) as rig:
            client = await rig.connect()
            begun = time.monotonic()
            await client.send(*(request for request, _, _ in sent))
            first = await client.answer()
            took = time.monotonic() - begun
            answers = [first] + [await client.answer() for _ in sent[1:]]
            in_flight = rig.recorder.telemetry.in_flight
        assert [(a.status, a.json()["reason"] if a.body else "") for a in answers] == [
            (status, reason) for _, status, reason in sent
        ]
        assert took >= 0.3  # the IdP's delay: the allow did wait for the refetch
        assert idp.fetches() == 2
        assert in_flight == 0
    finally:
        idp.delay = 0.0
        registry.close()


# --- the HTTP listener of a Server -------------------------------------------------------


@dataclass
class Served:
    server: Server
    authorizer: HoldingAuthorizer
    sink: MemorySink
    reader: InMemoryMetricReader

    @property
    def http(self) -> HttpCheckServer:
        assert self.server.http is not None
        return self.server.http


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A Server with gRPC and HTTP listeners, a decision log in memory, metrics, a limit of
    two checks in flight, and checks held until released."""
    authorizer = HoldingAuthorizer(PolicySet.load(write_policies(tmp_path / "policies")))
    reader = InMemoryMetricReader()
    sink = MemorySink()
    server = Server(
        authorizer,
        Telemetry(None, MeterProvider(metric_readers=[reader])),
        listen="127.0.0.1:0",
        grace=10.0,
        decision_log=DecisionLog(sink, workload=authorizer.workload),
        max_concurrent_checks=2,
        http_listen="127.0.0.1:0",
        http_path_prefix=PREFIX,
    )
    await server.start()
    try:
        yield Served(server, authorizer, sink, reader)
    finally:
        authorizer.release()
        await server.stop()


def grpc_check(path: str) -> Any:
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.principal = CALLER
    attrs.context_extensions["namespace"] = "shop"
    http = attrs.request.http
    http.method, http.host, http.path = "GET", "orders.shop", path
    return req


async def test_a_stop_answers_the_check_in_flight(served: Served) -> None:
    """SIGTERM's path: the held check is still answered (with the policies' allow), then the
    connection closes and new ones are refused."""
    holding = served.authorizer
    client = await Client.connect(served.http)
    port = served.http.port
    try:
        await client.send(envoy_request("/ok/1"))
        await until(lambda: holding.held == 1, "the check held")
        stopping = asyncio.ensure_future(served.server.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # waiting for the check in flight
        holding.release()
        answer = await client.answer()
        await asyncio.wait_for(stopping, 10)
        assert answer.status == 200
        assert await client.closed_by_server()
    finally:
        await client.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_each_http_check_leaves_one_record_and_one_count(served: Served) -> None:
    """The decision log and the decisions metric see every HTTP check once, with the
    decision id the answer carried and the peer the header named; a 400 is no check."""
    served.authorizer.release()  # decide at once
    sent = ["allowed", "no allow matched", "a policy's own deny", "outside the path prefix"]
    requests = [CHECKS[name].request for name in sent]
    requests[0] = envoy_request("/ok/1", lines=("X-Tenant: a", "x-tenant: b", "User-Agent: t"))
    client = await Client.connect(served.http)
    try:
        answers = [await client.ask(request) for request in requests]
        malformed = await Client.connect(served.http)
        assert (await malformed.ask(b"NOT HTTP\r\n\r\n")).status == 400
        await malformed.close()
    finally:
        await client.close()
    await served.server.stop()  # writes the decision log out

    records = [json.loads(line) for line in served.sink.lines]
    assert len(records) == len(sent)
    by_id = {r["decision_id"]: r for r in records}
    assert sorted(by_id) == sorted(a.get(DECISION_ID_HEADER) or "" for a in answers)
    for name, answer in zip(sent, answers, strict=True):
        record = by_id[answer.get(DECISION_ID_HEADER)]
        assert record["http_status"] == answer.status == CHECKS[name].status, name
    allowed = by_id[answers[0].get(DECISION_ID_HEADER)]
    assert allowed["outcome"] == "OUTCOME_ALLOW"
    assert allowed["caller"]["spiffe_id"] == CALLER
    assert allowed["request"]["path"] == "/ok/1"  # without Envoy's path_prefix
    assert allowed["request"]["source"] == {"address": "10.0.0.7", "port": 40001}
    assert allowed["request"]["destination"] == {"address": "10.0.0.8", "port": 8443}
    assert allowed["workload"] == {"namespace": "shop", "labels": "app=orders"}
    # Names lower-cased, a repeated one comma-joined (as Envoy's CheckRequest has them);
    # Envoy's own headers are not the client's.
    assert allowed["request"]["headers"] == {"x-tenant": "a,b", "user-agent": "t"}
    unreadable = by_id[answers[3].get(DECISION_ID_HEADER)]
    assert unreadable["reason"] == "request_invalid"
    assert "request" not in unreadable
    counted = points(served.reader, "extauthz.decisions")
    assert sum(counted.values()) == len(sent)


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_the_decision_log_has_the_trace_id_of_envoys_traceparent(served: Served) -> None:
    """Over HTTP the trace context is a header of the check (Envoy's ext_authz span's
    traceparent): each record of a check that carried one names its trace."""
    served.authorizer.release()  # decide at once
    traced = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    requests = [
        envoy_request("/ok/1", headers=traced),
        envoy_request("/private", headers=traced),
        envoy_request("/ok/2"),
    ]
    client = await Client.connect(served.http)
    try:
        answers = [await client.ask(request) for request in requests]
    finally:
        await client.close()
    await served.server.stop()  # writes the decision log out

    records = {r["decision_id"]: r for r in map(json.loads, served.sink.lines)}
    traces = [records[a.get(DECISION_ID_HEADER)].get("trace_id") for a in answers]
    assert traces == [TRACE_ID, TRACE_ID, None]
    assert [a.status for a in answers] == [200, 403, 200]


async def test_grpc_and_http_checks_share_one_in_flight_count(served: Served) -> None:
    """One limit for the server: a check held on each transport fills it, and the next
    check on either transport is shed; once released, both held checks are allowed."""
    holding = served.authorizer
    telemetry = served.server.telemetry
    client = await Client.connect(served.http)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            held_grpc = asyncio.ensure_future(stub.Check(grpc_check("/ok/1"), timeout=20))
            await until(lambda: holding.held == 1, "the gRPC check held")
            await client.send(envoy_request("/ok/2"))
            await until(lambda: holding.held == 2, "the HTTP check held")
            assert telemetry.in_flight == 2

            other = await Client.connect(served.http)
            shed = await other.ask(envoy_request("/ok/3"))
            await other.close()
            assert (shed.status, shed.json()["reason"]) == (429, "overloaded")
            shed_grpc = await stub.Check(grpc_check("/ok/4"), timeout=10)
            assert shed_grpc.denied_response.status.code == 503  # gRPC: no 5xx trap
            assert json.loads(shed_grpc.denied_response.body)["reason"] == "overloaded"

            holding.release()
            assert (await client.answer()).status == 200
            assert (await held_grpc).status.code == 0
            assert telemetry.in_flight == 0
        finally:
            holding.release()
            await client.close()


async def test_a_server_sends_upstream_only_what_its_upstream_names_let_through(
    tmp_path: Path,
) -> None:
    """``http_upstream_headers`` reaches the HTTP listener: the identity header it leaves
    out is removed, not sent."""
    server = Server(
        Authorizer(PolicySet.load(write_policies(tmp_path / "policies"))),
        Telemetry(None),
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        http_path_prefix=PREFIX,
        http_upstream_headers="authorization",
    )
    await server.start()
    try:
        assert server.http is not None
        client = await Client.connect(server.http)
        answer = await client.ask(envoy_request("/ok/1"))
        await client.close()
    finally:
        await server.stop()
    assert answer.status == 200
    assert answer.get("x-extauthz-spiffe-id") is None
    assert "x-extauthz-spiffe-id" in (answer.get(HEADERS_TO_REMOVE) or "").split(",")


class FailingDecisionLog(DecisionLog):
    """A decision log whose writer cannot start: after the HTTP listener did."""

    def start(self) -> None:
        raise RuntimeError("no writer thread")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_a_start_failing_after_the_http_listener_started_frees_its_port() -> None:
    """The decision log cannot start, after the HTTP listener did: Server.start stops it
    again, so the port is free for a retry or the next process. (Not the gRPC port: a
    grpc.aio server bound but never started keeps its port after stop.)"""
    http_port = free_ports(1)
    server = Server(
        Authorizer(PolicySet.empty()),
        Telemetry(None),
        listen="127.0.0.1:0",
        decision_log=FailingDecisionLog(MemorySink()),
        http_listen=f"127.0.0.1:{http_port}",
    )
    with pytest.raises(RuntimeError, match="no writer thread"):
        await server.start()
    assert server.http is not None
    assert server.http.port == http_port  # it had started
    assert port_is_free(http_port)


async def test_a_grpc_port_in_use_stops_the_start_before_the_http_listener() -> None:
    """The gRPC port is bound first: taken, the start stops with the HTTP port never bound."""
    http_port = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        server = Server(
            Authorizer(PolicySet.empty()),
            Telemetry(None),
            listen=listen,
            http_listen=f"127.0.0.1:{http_port}",
        )
        with pytest.raises(ConfigError, match=f"--listen {listen}: cannot bind"):
            await server.start()
    assert server.http is not None
    assert server.http.port == 0  # never started
    assert port_is_free(http_port)


# --- 4. serve --http-listen through the CLI ----------------------------------------------

CLI_ENV = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}


async def test_workers_listen_on_http_port_plus_their_index(tmp_path: Path) -> None:
    """``--workers 2``: worker i answers http_service checks on ``--http-listen``'s port + i,
    and the supervisor stops them all with exit 0."""
    base = free_ports(4)  # --listen: base, base + 1; --http-listen: base + 2, base + 3
    http = base + 2
    log_path = tmp_path / "extauthz.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extauthz",
                "serve",
                "--workers",
                "2",
                "--listen",
                f"127.0.0.1:{base}",
                "--http-listen",
                f"127.0.0.1:{http}",
                "--http-path-prefix",
                PREFIX,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=CLI_ENV,
        )
    try:
        for i in (0, 1):
            answer = await _ask_when_up(http + i, proc, log_path)
            assert answer.status == 200, log_path.read_text()  # no policies: allowed
            assert answer.get(DECISION_ID_HEADER) is not None
        text = log_path.read_text()
        for i in (0, 1):
            assert f"worker {i}: 127.0.0.1:{base + i}, http 127.0.0.1:{http + i}" in text, text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _ask_when_up(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> Answer:
    """One check on ``port`` once it accepts connections (the worker has started)."""
    async with asyncio.timeout(20):
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            client = Client(reader, writer)
            try:
                return await client.ask(envoy_request("/x"))
            finally:
                await client.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--http-listen", "0.0.0.0:9999"], "--http-listen 0.0.0.0:9999: only a loopback address"),
        (["--http-listen", "nowhere"], "--http-listen 'nowhere': expected HOST:PORT or unix:/path"),
        (
            ["--http-listen", "127.0.0.1:0", "--http-path-prefix", "authz/"],
            "--http-path-prefix 'authz/': expected /name",
        ),
        (
            ["--workers", "2", "--listen", "127.0.0.1:9191", "--http-listen", "127.0.0.1:0"],
            "--http-listen 127.0.0.1:0: --workers needs a fixed port",
        ),
        (
            ["--http-listen", "127.0.0.1:0", "--http-upstream-headers", "x-*,*"],
            "--http-upstream-headers 'x-*,*': expected names and name prefixes",
        ),
    ],
    ids=["not-loopback", "not-an-address", "bad-prefix", "workers-port-0", "bad-upstream"],
)
async def test_a_bad_http_flag_stops_serve_with_a_message_naming_it(
    argv: list[str], message: str
) -> None:
    """As every ConfigError: exit 1 and one ``error:`` line naming the flag, before serving."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--listen",
        "127.0.0.1:0",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CLI_ENV,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, stderr.decode()
    assert f"error: {message}" in stderr.decode()
