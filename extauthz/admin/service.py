"""``extauthz.admin.v1.Admin``: the explanation ``extauthz check`` prints, on a live server.

Explain takes a recent decision id (replayed against the policy snapshot it was made with),
a request description (as ``extauthz check``) or a serialized Envoy CheckRequest; the last
two are decided against the policy set in force. PolicyStatus reports that set and the hot
reloader's state.

Explanations show request details (paths, and the header and claim values a policy looked
at), so this service is served only on the admin listener (``--admin-listen``), never on
the port Envoy calls; keep that listener on localhost or a protected network.

It runs on the event-loop thread, like Check: an explanation is a few rule evaluations, and
the compiled policy sets memoise per workload without locks.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from ..authorizer import Authorizer
from ..decision import Decision, Outcome
from ..errors import ConfigError, ExtAuthzError
from ..policy.explain import CheckResult, Explanation, PolicyResult, RuleResult
from ..probe import parse_probe
from ..reload import PolicyReloader
from ..request import CheckInput, from_check_request
from .recent import RecentDecisions, Recorded
from .v1 import admin_pb2, admin_pb2_grpc

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name

_OUTCOMES = {
    Outcome.ALLOW: admin_pb2.OUTCOME_ALLOW,
    Outcome.UNAUTHENTICATED: admin_pb2.OUTCOME_UNAUTHENTICATED,
    Outcome.PERMISSION_DENIED: admin_pb2.OUTCOME_PERMISSION_DENIED,
    Outcome.ERROR: admin_pb2.OUTCOME_ERROR,
}

Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Explain and PolicyStatus over ``authorizer`` (and its reloader, when it has one)."""

    def __init__(
        self,
        authorizer: Authorizer,
        *,
        recent: RecentDecisions | None = None,
        reloader: PolicyReloader | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.recent = recent
        self.reloader = reloader

    async def Explain(
        self, request: admin_pb2.ExplainRequest, context: Context
    ) -> admin_pb2.ExplainResponse:
        target = request.WhichOneof("target")
        if target == "decision_id":
            return await self._explain_recorded(request.decision_id, context)
        if target == "request":
            inp, claims = await _probe(request.request, context)
        elif target == "check_request":
            inp, claims = await _check_request(request.check_request, context), None
        else:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ExplainRequest names nothing: set decision_id, request or check_request",
            )
        return explanation_message(self.authorizer.explain(inp, claims=claims), replayed=False)

    async def _explain_recorded(
        self, decision_id: str, context: Context
    ) -> admin_pb2.ExplainResponse:
        found = self.recent.get(decision_id) if self.recent is not None else None
        if found is None:
            held = (
                f"the last {self.recent.capacity} decisions are kept"
                if self.recent is not None
                else "recording is disabled (--recent-decisions 0)"
            )
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"decision {decision_id!r} is not among the recent decisions ({held})",
            )
        explanation = self.replay(found)
        return explanation_message(explanation, replayed=True, recorded=found.decision)

    def replay(self, rec: Recorded) -> Explanation:
        """Re-run a recorded decision on its own policy snapshot, explaining every policy."""
        if rec.input is None:  # the CheckRequest was unreadable: nothing to evaluate
            return Explanation(rec.decision, None, None, "", "", ())
        first = self.authorizer.explain(rec.input, policies=rec.policies)
        explanation = first
        if rec.decision.issuer and first.decision.issuer != rec.decision.issuer:
            # The token verified then but not now: it has most likely expired since. Replay
            # on its claims instead, as `extauthz check` does with described claims.
            claims = _verified_claims(rec, first)
            if claims is not None:
                explanation = self.authorizer.explain(
                    rec.input, claims=claims, policies=rec.policies
                )
        # The replay is the recorded decision re-made: report it under the recorded id.
        decision = explanation.decision.replace(decision_id=rec.decision.decision_id)
        return replace(explanation, decision=decision)

    async def PolicyStatus(
        self, request: admin_pb2.PolicyStatusRequest, context: Context
    ) -> admin_pb2.PolicyStatusResponse:
        policies = self.authorizer.policies
        response = admin_pb2.PolicyStatusResponse(
            revision=policies.revision,
            ok=True,
            files=list(policies.source.files),
            warnings=list(policies.source.warnings),
            watching=self.reloader is not None,
            recent_decisions=len(self.recent) if self.recent is not None else 0,
            recent_capacity=self.recent.capacity if self.recent is not None else 0,
        )
        if self.reloader is not None:
            status = self.reloader.status
            response.revision = status.revision
            response.ok = status.ok
            response.errors.extend(status.errors)
            response.reloads = status.reloads
            response.failures = status.failures
            if status.loaded_at:
                response.loaded_at.FromNanoseconds(round(status.loaded_at * 1e9))
        return response


def add_admin_service(servicer: AdminServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (the generated registration function is untyped)."""
    admin_pb2_grpc.add_AdminServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]


def _verified_claims(rec: Recorded, replay: Explanation) -> Mapping[str, Any] | None:
    """The payload of the token the recorded decision verified, decoded WITHOUT verification.

    Acceptable only because the recorded decision did verify this very token (same request,
    same policy snapshot, so the same token location), and only to explain that decision:
    the claims are never used to decide a live request. The issuer must still match.
    """
    assert rec.input is not None
    try:
        workload = rec.policies.for_workload(
            replay.namespace, replay.labels, replay.targets, remember=False
        )
        hit = workload.verifier.find(rec.input)
    except ExtAuthzError:
        return None
    if hit is None:
        return None
    parts = hit[0].split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    if not isinstance(payload, dict) or payload.get("iss") != rec.decision.issuer:
        return None
    return payload


async def _probe(
    desc: admin_pb2.RequestDescription, context: Context
) -> tuple[CheckInput, Mapping[str, Any] | None]:
    """A RequestDescription through :func:`parse_probe`, exactly as ``extauthz check``."""
    node: dict[str, Any] = {}
    for key in ("method", "host", "path", "principal", "source_ip", "destination_ip", "sni"):
        value = getattr(desc, key)
        if value:
            node[key] = value
    if desc.token:
        node["token"] = desc.token
    if desc.headers:
        node["headers"] = dict(desc.headers)
    if desc.destination_port:
        node["destination_port"] = desc.destination_port
    if desc.HasField("claims"):
        node["claims"] = _integral(json_format.MessageToDict(desc.claims))
    if desc.HasField("namespace"):
        node["namespace"] = desc.namespace
    if desc.HasField("labels"):
        node["labels"] = desc.labels
    for key in ("service", "gateway"):
        if desc.HasField(key):
            node[key] = getattr(desc, key)
    try:
        probe = parse_probe(node)
    except ConfigError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
    return probe.input, probe.claims


def _integral(value: Any) -> Any:
    """Struct numbers are doubles: give whole ones back as ints (``exp: 1700000000``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


async def _check_request(data: bytes, context: Context) -> CheckInput:
    try:
        request = external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"check_request is not a serialized envoy.service.auth.v3.CheckRequest: {exc}",
        )
    try:
        return from_check_request(request)
    except ExtAuthzError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)


def decision_message(d: Decision) -> admin_pb2.Decision:
    msg = admin_pb2.Decision(
        id=d.decision_id,
        outcome=_OUTCOMES[d.outcome],
        reason=d.reason,
        message=d.message,
        policy=d.policy,
        rule=d.rule,
        dry_run_policy=d.dry_run_policy,
        audit=list(d.audit),
        policy_revision=d.policy_revision,
        spiffe_id=d.spiffe_id,
        principal=d.principal,
        issuer=d.issuer,
        subject=d.subject,
    )
    if d.dry_run_allowed is not None:
        msg.dry_run_allowed = d.dry_run_allowed
    return msg


def _check_message(c: CheckResult) -> admin_pb2.FieldCheck:
    return admin_pb2.FieldCheck(
        path=c.path,
        line=c.line,
        passed=c.passed,
        field=c.field,
        values=list(c.values),
        negated=c.negated,
        actual=c.actual,
        description=c.describe(),
    )


def _rule_message(r: RuleResult) -> admin_pb2.RuleResult:
    return admin_pb2.RuleResult(
        name=r.name,
        line=r.line,
        matched=r.matched,
        failures=[_check_message(c) for c in r.failures],
    )


def _policy_message(p: PolicyResult) -> admin_pb2.PolicyResult:
    return admin_pb2.PolicyResult(
        key=p.key,
        action=p.action,
        dry_run=p.dry_run,
        file=p.file,
        line=p.line,
        matched=p.matched,
        matched_rule=p.matched_rule,
        rules=[_rule_message(r) for r in p.rules],
    )


def explanation_message(
    explanation: Explanation, *, replayed: bool, recorded: Decision | None = None
) -> admin_pb2.ExplainResponse:
    response = admin_pb2.ExplainResponse(
        decision=decision_message(explanation.decision),
        replayed=replayed,
        principal=explanation.principal,
        request_principal=explanation.request_principal,
        policies=[_policy_message(p) for p in explanation.policies],
        text="\n".join(explanation.lines()),
    )
    if recorded is not None:
        response.recorded.CopyFrom(decision_message(recorded))
    if explanation.namespace is not None:
        response.workload.namespace = explanation.namespace
    if explanation.labels is not None:
        response.workload.labels = explanation.labels
    for kind, name in explanation.targets:
        setattr(response.workload, kind.lower(), name)
    return response
