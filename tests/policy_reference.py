"""A deliberately naive reference interpreter of Istio authorization, for the property tests.

Written from Istio's documentation and from the code that turns an AuthorizationPolicy into
Envoy RBAC (``istio/pilot/pkg/security/authz/model/generator.go`` and ``matcher/*.go``), not
from ``extauthz.policy``: each field is matched the way Istio's generated Envoy config matches
it, often with the very regex Istio emits, so that a reader can check it line by line against
Istio. It is slow, validates nothing (the caller only feeds it valid policies) and walks the
plain YAML dicts, so it shares no data model, parser or matcher with the engine it checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT_NAMESPACE = "istio-system"
SPIFFE = "spiffe://"
DRY_RUN = "istio.io/dry-run"

Doc = Mapping[str, Any]


@dataclass(frozen=True)
class Request:
    """What a policy can see of one request.

    ``peer`` is Istio's source principal (the SPIFFE ID without ``spiffe://``), None without
    mTLS. ``claims`` is the payload of the (correctly signed) token the request carries, None
    without one; whether it counts depends on the RequestAuthentications in scope.
    ``headers`` have lower-case names.
    """

    method: str = "GET"
    host: str = "example.com"
    path: str = "/"
    port: int = 8080
    headers: Mapping[str, str] = field(default_factory=dict)
    peer: str | None = None
    claims: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Verdict:
    """The decision, the deciding policy (``ns/name``) and what AUDIT / dry-run recorded."""

    allowed: bool
    # denied_by_policy, no_allow_policy, allowed_by_policy, no_allow_policy_matched, or
    # jwt_issuer_unknown (rejected before authorization)
    reason: str
    policy: str | None = None
    audit: tuple[str, ...] = ()
    dry_run_allowed: bool | None = None
    dry_run_policy: str | None = None


# --- Envoy/Istio string matchers ----------------------------------------------------------


def string_match(value: str, actual: str | None, *, ignore_case: bool = False) -> bool:
    """Istio's ``matcher.StringMatcher``: ``*`` is the regex ``.+``, else suffix/prefix/exact."""
    if actual is None:
        return False
    if ignore_case:
        value, actual = value.lower(), actual.lower()
    if value == "*":
        return len(actual) > 0
    if value.startswith("*"):
        return actual.endswith(value[1:])
    if value.endswith("*"):
        return actual.startswith(value[:-1])
    return actual == value


def header_match(value: str, actual: str | None, *, ignore_case: bool = False) -> bool:
    """Istio's ``HeaderMatcher``/``HostMatcher``: ``*`` is Envoy's present_match."""
    if value == "*":
        return actual is not None
    return string_match(value, actual, ignore_case=ignore_case)


def principal_match(value: str, peer: str | None) -> bool:
    """``StringMatcherWithPrefix(value, "spiffe://")`` against the peer's URI SAN."""
    if peer is None:
        return False
    uri = SPIFFE + peer
    if value == "*":
        return re.fullmatch(".+", uri) is not None
    if value.startswith("*"):
        return re.fullmatch(re.escape(SPIFFE) + ".*" + re.escape(value[1:]), uri) is not None
    if value.endswith("*"):
        return uri.startswith(SPIFFE + value[:-1])
    return uri == SPIFFE + value


def namespace_match(value: str, peer: str | None) -> bool:
    """Istio: ``StringMatcherRegex(".*/ns/" + strings.Replace(v, "*", ".*") + "/.*")``."""
    if peer is None:
        return False
    regex = ".*/ns/" + value.replace("*", ".*") + "/.*"
    return re.fullmatch(regex, SPIFFE + peer) is not None


def service_account_match(value: str, peer: str | None, policy_namespace: str | None) -> bool:
    """Istio's ``serviceAccountRegex``: a bare name is in the policy's own namespace."""
    if peer is None:
        return False
    ns, slash, sa = value.partition("/")
    if not slash:
        ns, sa = policy_namespace or "", value
    regex = f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"
    return re.fullmatch(regex, SPIFFE + peer) is not None


def _claim(claims: Mapping[str, Any] | None, name: str) -> str | None:
    value = claims.get(name) if claims is not None else None
    return value if isinstance(value, str) else None


def request_principal_match(value: str, claims: Mapping[str, Any] | None) -> bool:
    """Istio's ``requestPrincipalGenerator``, case by case: ``iss`` and ``sub`` claims matched
    separately after splitting the value at its last ``/``."""
    if claims is None:
        return False
    iss, sub = _claim(claims, "iss"), _claim(claims, "sub")
    idx = value.rfind("/")
    found = idx >= 0
    v_iss, v_sub = (value[:idx], value[idx + 1 :]) if found else (value, "")

    def any_(s: str | None) -> bool:  # the regex ".+"
        return s is not None and len(s) > 0

    def exact(want: str) -> Callable[[str | None], bool]:
        return lambda s: s == want

    def prefix(want: str) -> Callable[[str | None], bool]:
        return lambda s: s is not None and s.startswith(want)

    def suffix(want: str) -> Callable[[str | None], bool]:
        return lambda s: s is not None and s.endswith(want)

    m_iss: Callable[[str | None], bool]
    m_sub: Callable[[str | None], bool]
    if value == "*":
        m_iss, m_sub = any_, any_
    elif value.startswith("*"):
        if found:
            m_iss = any_ if v_iss == "*" else suffix(v_iss[1:])
            m_sub = exact(v_sub)
        else:
            m_iss, m_sub = any_, suffix(value[1:])
    elif value.endswith("*"):
        if found:
            m_iss = exact(v_iss)
            m_sub = any_ if v_sub == "*" else prefix(v_sub[:-1])
        else:
            m_iss, m_sub = prefix(value[:-1]), any_
    else:
        m_iss, m_sub = exact(v_iss), exact(v_sub)
    return m_iss(iss) and m_sub(sub)


def claim_match(value: str, claims: Mapping[str, Any] | None, path: Sequence[str]) -> bool:
    """A JWT claim (nested by ``path``) as Istio's list-or-string metadata matcher sees it.

    Istio has Envoy split the top-level ``scope`` and ``permission`` claims on spaces.
    """
    node: Any = claims
    for step in path:
        if not isinstance(node, Mapping) or step not in node:
            return False
        node = node[step]
    if tuple(path) in (("scope",), ("permission",)) and isinstance(node, str):
        node = node.split(" ")
    items = node if isinstance(node, list) else [node]
    return any(isinstance(i, str) and string_match(value, i) for i in items)


# --- rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    request: Request
    claims: Mapping[str, Any] | None  # the token's claims if the token counts, else None
    policy_namespace: str | None


def _field_match(name: str, value: str, ctx: _Ctx) -> bool:
    """One value of a ``source``/``operation`` field (positive form) against the request."""
    r = ctx.request
    if name == "principals":
        return principal_match(value, r.peer)
    if name == "requestPrincipals":
        return request_principal_match(value, ctx.claims)
    if name == "namespaces":
        return namespace_match(value, r.peer)
    if name == "serviceAccounts":
        return service_account_match(value, r.peer, ctx.policy_namespace)
    if name == "hosts":
        return header_match(value, r.host, ignore_case=True)
    if name == "ports":
        return int(value) == r.port
    if name == "methods":
        return header_match(value, r.method)
    if name == "paths":
        return string_match(value, r.path)
    raise NotImplementedError(name)


_CONDITION_FIELDS = {
    "source.principal": "principals",
    "source.namespace": "namespaces",
    "source.serviceAccount": "serviceAccounts",
    "request.auth.principal": "requestPrincipals",
    "destination.port": "ports",
}


def _condition_value_match(key: str, value: str, ctx: _Ctx) -> bool:
    if key in _CONDITION_FIELDS:
        return _field_match(_CONDITION_FIELDS[key], value, ctx)
    if key.startswith("request.headers[") and key.endswith("]"):
        header = key[len("request.headers[") : -1].lower()
        return header_match(value, ctx.request.headers.get(header))
    if key == "request.auth.audiences":
        return claim_match(value, ctx.claims, ["aud"])
    if key == "request.auth.presenter":
        return claim_match(value, ctx.claims, ["azp"])
    if key.startswith("request.auth.claims["):
        path = re.findall(r"\[([^\[\]]+)\]", key[len("request.auth.claims") :])
        return claim_match(value, ctx.claims, path)
    raise NotImplementedError(key)


def _any_value(name: str, values: Sequence[str], ctx: _Ctx) -> bool:
    return any(_field_match(name, v, ctx) for v in values)


def _clause_holds(clause: Mapping[str, Sequence[str]], ctx: _Ctx) -> bool:
    """All fields of one source/operation hold; ``notX`` holds when no value of it matches."""
    for name, values in clause.items():
        if name.startswith("not"):
            if _any_value(name[3].lower() + name[4:], values, ctx):
                return False
        elif not _any_value(name, values, ctx):
            return False
    return True


def _condition_holds(cond: Mapping[str, Any], ctx: _Ctx) -> bool:
    key = cond["key"]
    if "values" in cond and not any(_condition_value_match(key, v, ctx) for v in cond["values"]):
        return False
    return not (
        "notValues" in cond and any(_condition_value_match(key, v, ctx) for v in cond["notValues"])
    )


def rule_matches(rule: Mapping[str, Any] | None, ctx: _Ctx) -> bool:
    """``from`` entries OR'ed, ``to`` entries OR'ed, ``when`` AND'ed; the three AND'ed."""
    rule = rule or {}
    sources = [entry["source"] for entry in rule.get("from") or []]
    operations = [entry["operation"] for entry in rule.get("to") or []]
    if sources and not any(_clause_holds(s, ctx) for s in sources):
        return False
    if operations and not any(_clause_holds(o, ctx) for o in operations):
        return False
    return all(_condition_holds(c, ctx) for c in rule.get("when") or [])


# --- policies ------------------------------------------------------------------------------


def _meta(doc: Doc) -> Mapping[str, Any]:
    return doc.get("metadata") or {}


def _spec(doc: Doc) -> Mapping[str, Any]:
    return doc.get("spec") or {}


def key(doc: Doc) -> str:
    """``namespace/name``, or just the name for a policy without a namespace."""
    meta = _meta(doc)
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


def applies(doc: Doc, namespace: str, labels: Mapping[str, str], root: str) -> bool:
    """Root namespace (or none) means every workload; a selector needs all its labels."""
    ns = _meta(doc).get("namespace")
    if ns not in (None, root, namespace):
        return False
    wanted = (_spec(doc).get("selector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def action(doc: Doc) -> str:
    return str(_spec(doc).get("action", "ALLOW"))


def dry_run(doc: Doc) -> bool:
    annotations = _meta(doc).get("annotations") or {}
    return str(annotations.get(DRY_RUN, "false")).lower() == "true"


def policy_matches(doc: Doc, request: Request, claims: Mapping[str, Any] | None) -> bool:
    """Any rule matches. No rules (``spec: {}``) matches nothing; ``rules: [{}]`` everything."""
    ctx = _Ctx(request, claims, _meta(doc).get("namespace"))
    return any(rule_matches(r, ctx) for r in _spec(doc).get("rules") or [])


def _evaluate(
    policies: Sequence[Doc], request: Request, claims: Mapping[str, Any] | None
) -> tuple[bool, str, str | None]:
    """Istio's order: any DENY match denies; no ALLOW policy allows; else an ALLOW must match."""
    for p in policies:
        if action(p) == "DENY" and policy_matches(p, request, claims):
            return False, "denied_by_policy", key(p)
    allows = [p for p in policies if action(p) == "ALLOW"]
    if not allows:
        return True, "no_allow_policy", None
    for p in allows:
        if policy_matches(p, request, claims):
            return True, "allowed_by_policy", key(p)
    return False, "no_allow_policy_matched", None


def decide(
    docs: Sequence[Doc],
    request: Request,
    *,
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> Verdict:
    """The decision for ``request`` to the workload ``namespace``/``labels`` under ``docs``.

    A token counts only when a RequestAuthentication applies to the workload (without one
    Istio installs no JWT filter); then its ``iss`` must be one of their jwtRules' issuers,
    else the request is rejected before authorization (401).
    """
    in_scope = [d for d in docs if applies(d, namespace, labels, root_namespace)]
    authn = [d for d in in_scope if d["kind"] == "RequestAuthentication"]
    claims = request.claims if authn else None
    if claims is not None:
        issuers = {r["issuer"] for d in authn for r in _spec(d).get("jwtRules") or []}
        if claims.get("iss") not in issuers:
            return Verdict(False, "jwt_issuer_unknown")
    authz = [d for d in in_scope if d["kind"] == "AuthorizationPolicy"]
    enforced = [p for p in authz if not dry_run(p)]
    allowed, reason, policy = _evaluate(enforced, request, claims)
    audit = tuple(
        key(p) for p in enforced if action(p) == "AUDIT" and policy_matches(p, request, claims)
    )
    shadow_allowed: bool | None = None
    shadow_policy: str | None = None
    if any(dry_run(p) for p in authz):
        # What the decision would be with the dry-run policies enforced too.
        shadow_allowed, _, shadow_policy = _evaluate(authz, request, claims)
    return Verdict(allowed, reason, policy, audit, shadow_allowed, shadow_policy)
