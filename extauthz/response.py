"""Decision → CheckResponse, by table. The only module (with ``server``) that builds protos.

Allow/deny is carried by ``CheckResponse.status`` alone; the HTTP status is what the client
sees on deny. Every outcome, errors included, is an answered CheckResponse: an RPC error would
let Envoy apply ``failure_mode_allow``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from .decision import Decision, Outcome

DECISION_ID_HEADER = "x-extauthz-decision-id"


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


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def deny_body(decision: Decision) -> str:
    """The JSON the client sees: the reason code and the id to look the decision up by."""
    return json.dumps(
        {
            "error": OUTCOMES[decision.outcome].error,
            "reason": decision.reason,
            "message": decision.message,
            "decision_id": decision.decision_id,
        },
        separators=(",", ":"),
    )


def to_check_response(decision: Decision) -> Any:
    row = OUTCOMES[decision.outcome]
    status = status_pb2.Status(code=row.grpc_code)
    if decision.outcome is Outcome.ALLOW:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(k, v) for k, v in decision.upstream_headers],
            headers_to_remove=list(decision.remove_headers),
        )
        return external_auth_pb2.CheckResponse(status=status, ok_response=ok)
    status.message = decision.reason
    custom = decision.deny_response
    headers = [
        _header("content-type", custom.content_type if custom else "application/json"),
        _header(DECISION_ID_HEADER, decision.decision_id),
        *(_header(k, v) for k, v in decision.client_headers),
        *(_header(k, v) for k, v in (custom.headers if custom else ())),
    ]
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=custom.status if custom else row.http_status),
        headers=headers,
        body=custom.body if custom else deny_body(decision),
    )
    return external_auth_pb2.CheckResponse(status=status, denied_response=denied)
