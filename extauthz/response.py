"""Decision → CheckResponse, by table. The only module (with ``server``) that builds protos.

Over gRPC, allow/deny is carried by ``CheckResponse.status`` alone; the HTTP status is what
the client sees on deny. Every outcome, errors included, is an answered CheckResponse: an RPC
error would let Envoy apply ``failure_mode_allow``. :func:`encode_http_response` is the same
table for Envoy's ``http_service`` (:mod:`extauthz.httpserver`).
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from http import HTTPStatus
from typing import Any, NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from .decision import Decision, Outcome
from .errors import ConfigError
from .wire import length_prefixed, varint

DECISION_ID_HEADER = "x-extauthz-decision-id"
log = logging.getLogger(__name__)


class Row(NamedTuple):
    grpc_code: int
    http_status: int
    error: str


# Authorino-style status mapping: one row per outcome.
OUTCOMES: dict[Outcome, Row] = {
    Outcome.ALLOW: Row(code_pb2.OK, 200, ""),
    Outcome.UNAUTHENTICATED: Row(code_pb2.UNAUTHENTICATED, 401, "unauthenticated"),
    Outcome.PERMISSION_DENIED: Row(code_pb2.PERMISSION_DENIED, 403, "permission_denied"),
    Outcome.ERROR: Row(code_pb2.UNAVAILABLE, 503, "authorization_unavailable"),
}

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_ENCODE_ASCII = json.encoder.encode_basestring_ascii  # json.dumps' own string encoder, in C

# --- the wire encoder -------------------------------------------------------------------
# A CheckResponse is a few length-delimited fields; building it as protobuf objects costs
# ~12 µs a decision (one Python call per message), writing the bytes ~2 µs. Field numbers
# are envoy.service.auth.v3's; tests/test_response.py holds the bytes equal to the message
# protobuf builds for every kind of decision. Empty strings are left out, as proto3 does.


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte, the payload's length, the payload."""
    return tag + length_prefixed(payload)


def _string(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode()) if text else b""


def _header_option(key: str, value: str) -> bytes:
    """HeaderValueOption{header: {key, value}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}."""
    header = _string(b"\x0a", key) + _string(b"\x12", value)
    return _field(b"\x0a", header) + _APPEND_ACTION


_APPEND_ACTION = b"\x18" + varint(_OVERWRITE)
_cached_option = lru_cache(maxsize=1024)(_header_option)  # deny headers, few and constant


def _status(code: int, message: str) -> bytes:
    body = (b"\x08" + varint(code) if code else b"") + _string(b"\x12", message)
    return _field(b"\x0a", body)  # CheckResponse.status, present even when empty


_OK_STATUS = _status(code_pb2.OK, "")


def _ok_header(key: str, value: str) -> bytes:
    """OkHttpResponse.headers entry: a HeaderValueOption, framed."""
    return _field(b"\x12", _header_option(key, value))


def _removed(name: str) -> bytes:
    """OkHttpResponse.headers_to_remove entry (a repeated string keeps its empty elements)."""
    return _field(b"\x2a", name.encode())


# Repeated on every decision of a caller / token / policy: cached, bounded in count and,
# by leaving long values (a claim or a payload header can be ~48 KB) uncached, in size.
_ok_header_lru = lru_cache(maxsize=4096)(_ok_header)
_CACHED_VALUE_CHARS = 256


def _cached_ok_header(name: str, value: str) -> bytes:
    if len(value) > _CACHED_VALUE_CHARS:
        return _ok_header(name, value)
    return _ok_header_lru(name, value)


_cached_removed = lru_cache(maxsize=256)(_removed)
# The decision id header of a new_decision_id() (32 characters) around the id's own bytes.
_ID_LENGTH = 32
_ID_HEAD, _ID_TAIL = _ok_header(DECISION_ID_HEADER, "0" * _ID_LENGTH).split(b"0" * _ID_LENGTH)


def _id_header(decision_id: str) -> bytes:
    raw = decision_id.encode()
    if len(raw) == _ID_LENGTH:
        return _ID_HEAD + raw + _ID_TAIL
    return _ok_header(DECISION_ID_HEADER, decision_id)


def encode_check_response(decision: Decision) -> bytes:
    """The serialized CheckResponse for ``decision``: what the server sends Envoy."""
    if decision.outcome is Outcome.ALLOW:
        ok_fields = b"".join(
            [
                _id_header(v) if k == DECISION_ID_HEADER else _cached_ok_header(k, v)
                for k, v in decision.upstream_headers
            ]
        )
        if decision.remove_headers:
            ok_fields += b"".join([_cached_removed(name) for name in decision.remove_headers])
        return _OK_STATUS + _field(b"\x1a", ok_fields)
    row = OUTCOMES[decision.outcome]
    custom = decision.deny_response
    options = [
        _cached_option("content-type", custom.content_type if custom else "application/json"),
        _header_option(DECISION_ID_HEADER, decision.decision_id),
        *(_cached_option(k, v) for k, v in decision.client_headers),
        *(_cached_option(k, v) for k, v in (custom.headers if custom else ())),
    ]
    http_status = custom.status if custom else row.http_status
    denied = (
        _field(b"\x0a", b"\x08" + varint(http_status) if http_status else b"")
        + b"".join(_field(b"\x12", option) for option in options)
        + _string(b"\x1a", custom.body if custom else deny_body(decision))
    )
    return _status(row.grpc_code, decision.reason) + _field(b"\x12", denied)


def deny_body(decision: Decision) -> str:
    """The JSON the client sees: the reason code and the id to look the decision up by."""
    # What json.dumps(..., separators=(",", ":")) writes, without its per-call setup.
    return (
        f'{{"error":{_ENCODE_ASCII(OUTCOMES[decision.outcome].error)},'
        f'"reason":{_ENCODE_ASCII(decision.reason)},'
        f'"message":{_ENCODE_ASCII(decision.message)},'
        f'"decision_id":{_ENCODE_ASCII(decision.decision_id)}}}'
    )


def to_check_response(decision: Decision) -> Any:
    """The CheckResponse message for ``decision`` (tools and tests; the server sends the
    bytes of :func:`encode_check_response`, which this parses)."""
    return external_auth_pb2.CheckResponse.FromString(encode_check_response(decision))


# --- the HTTP answer ----------------------------------------------------------------------
# For Envoy's ext_authz ``http_service`` (extauthz.httpserver): a 200 allows, with the
# upstream headers as response headers (Envoy copies those its allowed_upstream_headers
# match) and the headers to remove in ``x-envoy-auth-headers-to-remove``; any other status
# denies, and Envoy sends that status, our headers and body to the client.

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
_UNSAFE = frozenset("\r\n\0")


class UnsafeHeaderError(ValueError):
    """A header name or value would split the HTTP answer (CR, LF or NUL in it)."""


def _http_header(name: str, value: str) -> bytes:
    if not _UNSAFE.isdisjoint(name) or not _UNSAFE.isdisjoint(value):
        raise UnsafeHeaderError(f"header {name!r}: CR, LF or NUL in its name or value")
    # UTF-8, the bytes a CheckResponse's HeaderValue carries: Envoy copies header bytes as
    # they are, so a claim like "Zoë" reaches the upstream alike over either transport.
    return f"{name}: {value}\r\n".encode()


_http_header_lru = lru_cache(maxsize=4096)(_http_header)


def _cached_http_header(name: str, value: str) -> bytes:
    if len(value) > _CACHED_VALUE_CHARS:
        return _http_header(name, value)
    return _http_header_lru(name, value)


@lru_cache(maxsize=64)
def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_ALLOW_LINE = _status_line(200)
_HTTP_ID = f"{DECISION_ID_HEADER}: ".encode()


def _http_id_header(decision_id: str) -> bytes:
    if len(decision_id) == _ID_LENGTH and decision_id.isalnum():  # new_decision_id()'s hex
        return _HTTP_ID + decision_id.encode() + b"\r\n"
    return _http_header(DECISION_ID_HEADER, decision_id)


@lru_cache(maxsize=256)
def _http_removed(names: tuple[str, ...]) -> bytes:
    return _http_header(HEADERS_TO_REMOVE, ",".join(names))


_EMPTY_BODY = b"content-length: 0\r\n\r\n"
_CLOSE = b"connection: close\r\n"


# A header name (RFC 9110 token), or a prefix of one ending in a single '*'.
_NAME_PATTERN = re.compile(r"[a-z0-9!#$%&'+.^_`|~-]+\*?")


class UpstreamNames:
    """The answer headers Envoy's ``allowed_upstream_headers`` lets upstream
    (``--http-upstream-headers``; ``envoy/sidecar-http.yaml`` has ``x-*`` and
    ``authorization``). A header extauthz sets under another name could not reach the
    upstream, and the client's own copy would: such names go to the headers to remove
    instead (logged once per name)."""

    def __init__(self, patterns: str = "x-*,authorization") -> None:
        names = [p.strip().lower() for p in patterns.split(",") if p.strip()]
        bad = [n for n in names if _NAME_PATTERN.fullmatch(n) is None]
        if not names or bad:
            raise ConfigError(
                f"--http-upstream-headers {patterns!r}: expected names and name prefixes "
                "ending in '*', comma-separated (Envoy's allowed_upstream_headers)"
            )
        self.patterns = patterns
        self._prefixes = tuple(n[:-1] for n in names if n.endswith("*"))
        self._exact = frozenset(n for n in names if not n.endswith("*"))
        self.forwarded = lru_cache(maxsize=1024)(self._forwarded)

    def _forwarded(self, name: str) -> bool:
        if name in self._exact or name.startswith(self._prefixes):
            return True
        log.warning(
            "header %r cannot reach the upstream over HTTP (not in --http-upstream-headers "
            "%r, as Envoy's allowed_upstream_headers should be): removed instead",
            name,
            self.patterns,
        )
        return False


DEFAULT_UPSTREAM_NAMES = UpstreamNames()


def http_status(decision: Decision) -> int:
    """The status of the HTTP answer: never 2xx for a deny, and never 5xx at all. Envoy
    takes a 5xx from an HTTP authorization server for its own failure: it answers its
    ``status_on_error`` without our body, and ``failure_mode_allow: true`` would let the
    request through. What is 503 over gRPC is 429 when shed, else 403, over HTTP."""
    row = OUTCOMES[decision.outcome]
    if decision.outcome is Outcome.ALLOW:
        return row.http_status
    custom = decision.deny_response
    status = custom.status if custom else row.http_status
    if status < 300:  # a 2xx would be an allow: the policy compiler refuses it, too
        return 403
    if status >= 500:
        return 429 if decision.reason == "overloaded" else 403
    return status


def encode_http_response(
    decision: Decision,
    *,
    keep_alive: bool = True,
    upstream: UpstreamNames = DEFAULT_UPSTREAM_NAMES,
) -> bytes:
    """The HTTP/1.1 answer for ``decision``: the status (:func:`http_status`), the headers
    and the body.

    Raises :class:`UnsafeHeaderError` when a header would split the answer (the caller
    answers with its last resort, a 403): over gRPC Envoy rejects such a value itself.
    """
    close = b"" if keep_alive else _CLOSE
    if decision.outcome is Outcome.ALLOW:
        forwarded = upstream.forwarded
        head = b""
        removed = decision.remove_headers
        for k, v in decision.upstream_headers:
            if not forwarded(k):
                removed += (k,)
            elif k == DECISION_ID_HEADER:
                head += _http_id_header(v)
            else:
                head += _cached_http_header(k, v)
        if removed:
            head += _http_removed(removed)
        return _ALLOW_LINE + head + close + _EMPTY_BODY
    custom = decision.deny_response
    body = (custom.body if custom else deny_body(decision)).encode()
    headers = [
        _cached_http_header("content-type", custom.content_type if custom else "application/json"),
        _http_id_header(decision.decision_id),
        *(_cached_http_header(k, v) for k, v in decision.client_headers),
        *(_cached_http_header(k, v) for k, v in (custom.headers if custom else ())),
    ]
    return (
        _status_line(http_status(decision))
        + b"".join(headers)
        + close
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
