"""Compile Istio ``security.istio.io`` resources into matchers, refusing anything doubtful.

Every problem is reported as ``file:line: <resource>: <field path>: what is wrong``; a typo in
a field name is an error (with a suggestion), never silently ignored, because an ignored
``notPrincipals`` would turn a DENY into nothing.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlparse

from ..decision import DenyResponse, Header
from ..duration import parse_duration
from ..errors import JwksError, PolicyError, PolicySetError
from ..identity.jwks import KeySetRegistry, RemoteKeySet
from ..identity.jwt import (
    DEFAULT_LOCATIONS,
    SUPPORTED_ALGORITHMS,
    ClaimToHeader,
    Jwk,
    JwtProvider,
    TokenLocation,
    claim_value,
    compile_jwks,
)
from ..identity.mint import (
    AUTHORIZATION_HEADER,
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    RESERVED_CLAIMS,
    TokenSpec,
)
from .cel import compile_cel
from .match import (
    BadValue,
    RequestPrincipalMatcher,
    StringMatcher,
    compile_ip_blocks,
    compile_namespaces,
    compile_path_templates,
    compile_request_principals,
    compile_service_accounts,
    compile_strings,
    is_path_template,
)
from .model import (
    Action,
    Attributes,
    AuthorizationPolicy,
    Clause,
    FieldCheck,
    Getter,
    RequestAuthentication,
    Rule,
    Scope,
    Target,
    Test,
)
from .source import Node

API_GROUP = "security.istio.io"
API_VERSIONS = frozenset({f"{API_GROUP}/v1", f"{API_GROUP}/v1beta1"})
# Istio's AuthorizationPolicy plus extauthz's extensions (CEL, deny responses, allow headers).
# A separate group so that Istio never applies, or rejects, a resource it does not understand.
EXTENSION_API = "extauthz.io/v1alpha1"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
ALGORITHMS_ANNOTATION = "extauthz.io/jwt-algorithms"

_RESOURCE_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
_AUTHZ_SPEC_KEYS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
_EXT_SPEC_KEYS = (*_AUTHZ_SPEC_KEYS, "denyResponse")
_EXT_RULE_KEYS = ("from", "to", "when", "headers", "token")
_TOKEN_KEYS = ("claims", "audience", "header", "ttl")
_DENY_RESPONSE_KEYS = ("status", "headers", "body")
# envoy.type.v3.StatusCode at or above 300: Envoy refuses any other code in a deny.
_DENY_STATUSES = frozenset(
    [*range(300, 306), 307, 308, *range(400, 418), 421, 422, 423, 424, 426, 428, 429, 431]
) | frozenset([*range(500, 509), 510, 511])
_AUTHN_SPEC_KEYS = ("selector", "targetRef", "targetRefs", "jwtRules")
_RULE_KEYS = ("from", "to", "when")
_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_OPERATION_FIELDS = (
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)
_CONDITION_KEYS = ("key", "values", "notValues")
_JWT_RULE_KEYS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
)
T = TypeVar("T")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
MAX_JWKS_TIMEOUT_SECONDS = 60.0
RESERVED_HEADER_PREFIX = "x-extauthz-"  # extauthz's own identity headers
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "cookie", "x-forwarded-client-cert"}
    # hop-by-hop and framing headers: Envoy owns them
    | {"content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
    | {"proxy-connection"}
)


def _output_header(value: Any) -> str | None:
    """A header a jwtRule may write, lower-cased; None if not a name or one that is reserved."""
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        return None
    name = value.lower()
    if name.startswith(RESERVED_HEADER_PREFIX) or name in _RESERVED_HEADERS:
        return None
    return name


@dataclass(frozen=True, slots=True)
class _Meta:
    """A resource's metadata, validated: what both resource compilers need."""

    name: str
    namespace: str | None
    scope_namespace: str | None  # None: applies to every namespace (root or none)
    annotations: Mapping[str, str]
    line: int


class _Ctx:
    """Where we are in a resource, to prefix every error."""

    def __init__(self, file: str, resource: str, keys: KeySetRegistry | None = None) -> None:
        self.file = file
        self.resource = resource
        self._keys = keys
        self.extended = False  # an extauthz.io resource: extension fields are allowed
        self.action = Action.ALLOW
        self.reads: list[Path] = []  # files besides the policy file (jwksUri), for reload

    @property
    def keys(self) -> KeySetRegistry:
        if self._keys is None:
            self._keys = KeySetRegistry(live=False)  # compiling alone never touches the network
        return self._keys

    def error(self, node: Any, path: str, message: str, key: str | None = None) -> PolicyError:
        line = 0
        if isinstance(node, Node):
            line = node.line_of(key) if key else node.line
        where = f"{self.resource}: {path}: " if path else f"{self.resource}: "
        return PolicyError(where + message, file=self.file, line=line)


def _check_keys(ctx: _Ctx, node: Any, path: str, allowed: Sequence[str]) -> Node:
    if not isinstance(node, Node):
        raise ctx.error(node, path, f"must be a mapping, got {type(node).__name__}")
    for key in node:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ctx.error(node, path, f"unknown field {key!r}{suggestion}", key)
    return node


def _string_list(ctx: _Ctx, node: Node, key: str, path: str) -> list[str]:
    value = node[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(node, f"{path}.{key}", "must be a list of strings", key)
    if not value:
        raise ctx.error(node, f"{path}.{key}", "must not be empty (omit the field instead)", key)
    return value


# --- resources --------------------------------------------------------------------------


def compile_resource(
    body: Any,
    *,
    file: str,
    root_namespace: str,
    base_dir: Path,
    reads: list[Path] | None = None,
    keys: KeySetRegistry | None = None,
) -> AuthorizationPolicy | RequestAuthentication | str:
    """Compile one YAML document. Returns a warning string for resources extauthz ignores.

    Other files the resource reads (``jwksUri``) are appended to ``reads``; remote key sets
    (http(s) ``jwksUri``, OIDC discovery) come from ``keys``, which fetches them when live.
    """
    ctx = _Ctx(file, "resource", keys)
    if reads is not None:
        ctx.reads = reads
    node = _check_keys(ctx, body, "", _RESOURCE_KEYS)
    api, kind = node.get("apiVersion"), node.get("kind")
    if not isinstance(api, str) or not isinstance(kind, str):
        raise ctx.error(node, "", "apiVersion and kind are required strings")
    meta = node.get("metadata")
    if not isinstance(meta, Node) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise ctx.error(node, "metadata.name", "is required", "metadata")
    name: str = meta["name"]
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ctx.error(meta, "metadata.namespace", "must be a non-empty string", "namespace")
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, Mapping) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise ctx.error(meta, "metadata.annotations", "must map strings to strings")
    ctx.resource = f"{kind} {namespace + '/' if namespace else ''}{name}"
    group = api.split("/")[0]
    if group == EXTENSION_API.split("/")[0]:
        if api != EXTENSION_API or kind != "AuthorizationPolicy":
            raise ctx.error(
                node,
                "apiVersion",
                f"{api} {kind}: extauthz.io extends only AuthorizationPolicy, as "
                f"{EXTENSION_API}; write RequestAuthentication as {API_GROUP}/v1",
                "apiVersion",
            )
        ctx.extended = True
    elif group != API_GROUP or kind not in ("AuthorizationPolicy", "RequestAuthentication"):
        return f"{file}:{node.line}: ignoring {api} {kind} {name!r} (not enforced by extauthz)"
    elif api not in API_VERSIONS:
        raise ctx.error(node, "apiVersion", f"unsupported version {api!r}", "apiVersion")
    spec = node.get("spec")
    if spec is None:
        spec = Node()
        spec.file, spec.line, spec.key_lines = file, node.line, {}
    # Policies in the root namespace, or with none at all, apply to every workload.
    scope_ns = None if namespace in (None, root_namespace) else namespace
    resource = _Meta(name, namespace, scope_ns, annotations, node.line)
    if kind == "AuthorizationPolicy":
        return _authorization_policy(ctx, spec, resource)
    return _request_authentication(ctx, spec, resource, base_dir)


# (group, kind) Istio accepts in targetRefs -> the target kind a route names it by
_TARGET_KINDS = {
    ("", "Service"): "Service",
    ("core", "Service"): "Service",
    ("networking.istio.io", "ServiceEntry"): "Service",
    ("gateway.networking.k8s.io", "Gateway"): "Gateway",
}


def _targets(ctx: _Ctx, spec: Node, meta: _Meta) -> frozenset[Target]:
    refs: list[tuple[str, Any]] = []
    if "targetRef" in spec:  # deprecated singular form
        refs.append(("spec.targetRef", spec["targetRef"]))
    if "targetRefs" in spec:
        items = spec["targetRefs"]
        if not isinstance(items, list) or not items:
            raise ctx.error(spec, "spec.targetRefs", "must be a non-empty list", "targetRefs")
        refs.extend((f"spec.targetRefs[{i}]", r) for i, r in enumerate(items))
    if meta.scope_namespace is None:
        raise ctx.error(
            spec,
            "spec.targetRefs",
            "a policy in the root namespace (or without one) cannot have targetRefs; "
            "GatewayClass targets are not supported",
            "targetRefs" if "targetRefs" in spec else "targetRef",
        )
    out: set[Target] = set()
    for path, ref in refs:
        node = _check_keys(ctx, ref, path, ("group", "kind", "name", "namespace"))
        group, kind, name = node.get("group", ""), node.get("kind"), node.get("name")
        mapped = _TARGET_KINDS.get((str(group), str(kind)))
        if mapped is None:
            raise ctx.error(
                node,
                f"{path}.kind",
                f"{group + '/' if group else ''}{kind} is not a target extauthz can identify; "
                "use Service, networking.istio.io ServiceEntry or "
                "gateway.networking.k8s.io Gateway",
                "kind",
            )
        if not isinstance(name, str) or not name:
            raise ctx.error(node, f"{path}.name", "is required", "name")
        if node.get("namespace", meta.namespace) != meta.namespace:
            raise ctx.error(
                node, f"{path}.namespace", "must be the policy's own namespace", "namespace"
            )
        out.add((mapped, name))
    return frozenset(out)


def _scope(ctx: _Ctx, spec: Node, meta: _Meta) -> Scope:
    namespace = meta.scope_namespace
    has_targets = "targetRef" in spec or "targetRefs" in spec
    if has_targets and "selector" in spec:
        raise ctx.error(spec, "spec.selector", "set selector or targetRefs, not both", "selector")
    if has_targets:
        return Scope(namespace, None, _targets(ctx, spec, meta))
    selector = spec.get("selector")
    if selector is None:
        return Scope(namespace, None)
    sel = _check_keys(ctx, selector, "spec.selector", ("matchLabels",))
    labels = sel.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ctx.error(sel, "spec.selector.matchLabels", "must map strings to strings")
    return Scope(namespace, MappingProxyType(dict(labels)) if labels else None)


def _authorization_policy(ctx: _Ctx, spec: Any, meta: _Meta) -> AuthorizationPolicy:
    spec = _check_keys(ctx, spec, "spec", _EXT_SPEC_KEYS if ctx.extended else _AUTHZ_SPEC_KEYS)
    action_name = spec.get("action", "ALLOW")
    if action_name == "CUSTOM" or "provider" in spec:
        raise ctx.error(
            spec,
            "spec.action",
            "CUSTOM delegates to an external authorizer; extauthz is that authorizer, so write "
            "the rules as ALLOW/DENY policies here",
            "action",
        )
    try:
        action = Action(action_name)
    except ValueError:
        raise ctx.error(
            spec, "spec.action", f"{action_name!r} is not one of ALLOW, DENY, AUDIT", "action"
        ) from None
    ctx.action = action
    dry_run = meta.annotations.get(DRY_RUN_ANNOTATION, "false").lower()
    if dry_run not in ("true", "false"):
        raise ctx.error(
            meta.annotations,
            f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
            "must be true/false",
            DRY_RUN_ANNOTATION,
        )
    rules_node = spec.get("rules") or []
    if not isinstance(rules_node, list):
        raise ctx.error(spec, "spec.rules", "must be a list", "rules")
    line = spec.line_of("rules")
    rules = _each(rules_node, lambda i, r: _rule(ctx, r, i, line, meta.namespace))
    return AuthorizationPolicy(
        name=meta.name,
        namespace=meta.namespace,
        scope=_scope(ctx, spec, meta),
        action=action,
        rules=rules,
        dry_run=dry_run == "true",
        file=ctx.file,
        line=meta.line,
        deny_response=_deny_response(ctx, spec) if "denyResponse" in spec else None,
    )


def _each(items: list[Any], build: Callable[[int, Any], T]) -> tuple[T, ...]:
    """Build every item, collecting the errors of all of them (one rule's typo must not hide
    the next one's), then raise them together."""
    out: list[T] = []
    errors: list[PolicyError] = []
    for i, item in enumerate(items):
        try:
            out.append(build(i, item))
        except PolicyError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise PolicySetError(errors)
    return tuple(out)


def _header_values(ctx: _Ctx, node: Node, key: str, path: str) -> tuple[Header, ...]:
    """A ``{name: value}`` map of headers extauthz may set (none of its own or reserved)."""
    items = node[key]
    if not isinstance(items, Mapping) or not items:
        raise ctx.error(node, f"{path}.{key}", "must be a non-empty map of header: value", key)
    out: list[Header] = []
    for name, value in items.items():
        header = _output_header(name)
        if header is None:
            raise ctx.error(
                items,
                f"{path}.{key}[{name}]",
                f"must be a header name, not {RESERVED_HEADER_PREFIX}* or a reserved header",
                name,
            )
        if not isinstance(value, str) or not value.isprintable():
            raise ctx.error(items, f"{path}.{key}[{name}]", "must be a printable string", name)
        out.append((header, value))
    return tuple(out)


def _deny_response(ctx: _Ctx, spec: Node) -> DenyResponse:
    if ctx.action is Action.AUDIT:
        raise ctx.error(spec, "spec.denyResponse", "an AUDIT policy never denies", "denyResponse")
    node = _check_keys(ctx, spec["denyResponse"], "spec.denyResponse", _DENY_RESPONSE_KEYS)
    status = node.get("status", 403)
    if isinstance(status, bool) or status not in _DENY_STATUSES:
        raise ctx.error(
            node,
            "spec.denyResponse.status",
            f"{status!r} is not an HTTP status Envoy can send on deny (3xx, 4xx or 5xx)",
            "status",
        )
    headers = _header_values(ctx, node, "headers", "spec.denyResponse") if "headers" in node else ()
    body = node.get("body", "")
    if isinstance(body, str):
        content_type = "text/plain"
    elif isinstance(body, Mapping | list):
        body, content_type = json.dumps(body, separators=(",", ":")), "application/json"
    else:
        raise ctx.error(node, "spec.denyResponse.body", "must be a string, map or list", "body")
    return DenyResponse(status, headers, body, content_type)


# --- rules ------------------------------------------------------------------------------


def _rule(ctx: _Ctx, node: Any, index: int, fallback_line: int, namespace: str | None) -> Rule:
    path = f"rules[{index}]"
    if node is None:
        node = Node()
        node.file, node.line, node.key_lines = ctx.file, fallback_line, {}
    node = _check_keys(ctx, node, path, _EXT_RULE_KEYS if ctx.extended else _RULE_KEYS)
    headers: tuple[Header, ...] = ()
    if "headers" in node:
        if ctx.action is not Action.ALLOW:
            raise ctx.error(node, f"{path}.headers", "only an ALLOW rule adds headers", "headers")
        headers = _header_values(ctx, node, "headers", path)
    token = _token_spec(ctx, node, path) if "token" in node else None
    if token is not None and any(name == token.header for name, _ in headers):
        raise ctx.error(
            node, f"{path}.headers", f"{token.header!r} is where the minted token goes", "headers"
        )
    sources = _entries(ctx, node, "from", "source", _SOURCE_FIELDS, path, namespace)
    operations = _entries(ctx, node, "to", "operation", _OPERATION_FIELDS, path, namespace)
    when = node.get("when") or []
    if not isinstance(when, list):
        raise ctx.error(node, f"{path}.when", "must be a list", "when")
    conditions = tuple(
        check
        for i, c in enumerate(when)
        for check in _condition(ctx, c, f"{path}.when[{i}]", namespace)
    )
    return Rule(
        index, node.line, sources, operations, Clause(f"{path}.when", conditions), headers, token
    )


def _token_spec(ctx: _Ctx, rule: Node, rule_path: str) -> TokenSpec:
    """``token:``: mint a JWT for the upstream when this (ALLOW) rule allows."""
    path = f"{rule_path}.token"
    if ctx.action is not Action.ALLOW:
        raise ctx.error(rule, path, "only an ALLOW rule mints a token", "token")
    node = rule["token"]
    if node is None:  # `token:` with nothing after it: every default
        return TokenSpec()
    node = _check_keys(ctx, node, path, _TOKEN_KEYS)
    claims = node.get("claims", [])
    if not isinstance(claims, list) or not all(isinstance(c, str) and c for c in claims):
        raise ctx.error(node, f"{path}.claims", "must be a list of claim names", "claims")
    reserved = sorted(RESERVED_CLAIMS.intersection(claims))
    if reserved:
        raise ctx.error(
            node,
            f"{path}.claims",
            f"{reserved} are set by extauthz on every minted token and cannot be copied "
            f"(reserved: {', '.join(sorted(RESERVED_CLAIMS))})",
            "claims",
        )
    if len(set(claims)) != len(claims):
        raise ctx.error(node, f"{path}.claims", "names a claim twice", "claims")
    audience = node.get("audience", "")
    if "audience" in node and (
        not isinstance(audience, str) or not audience or not audience.isprintable()
    ):
        raise ctx.error(node, f"{path}.audience", "must be a non-empty string", "audience")
    header = node.get("header", AUTHORIZATION_HEADER)
    name = header.lower() if isinstance(header, str) else ""
    # authorization is the one reserved header a minted token may replace.
    if name != AUTHORIZATION_HEADER and _output_header(header) is None:
        raise ctx.error(
            node,
            f"{path}.header",
            f"must be authorization or a header name, not {RESERVED_HEADER_PREFIX}* or another "
            "reserved header",
            "header",
        )
    ttl = DEFAULT_TTL_SECONDS
    if "ttl" in node:
        text = node["ttl"]
        # A bare number is refused: 60 could mean seconds or minutes to the reader.
        seconds = _duration(ctx, node, "ttl", path)
        ttl = int(seconds)
        if ttl != seconds:
            raise ctx.error(node, f"{path}.ttl", f"{text} is not a whole number of seconds", "ttl")
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise ctx.error(node, f"{path}.ttl", f"{text} is not between 1s and 1h", "ttl")
    return TokenSpec(tuple(claims), audience, name, ttl)


def _entries(
    ctx: _Ctx,
    rule: Node,
    key: str,
    inner: str,
    fields: Sequence[str],
    rule_path: str,
    namespace: str | None,
) -> tuple[Clause, ...]:
    entries = rule.get(key) or []
    if not isinstance(entries, list):
        raise ctx.error(rule, f"{rule_path}.{key}", "must be a list", key)
    clauses: list[Clause] = []
    for i, entry in enumerate(entries):
        entry_path = f"{rule_path}.{key}[{i}]"
        entry = _check_keys(ctx, entry, entry_path, (inner,))
        body_path = f"{entry_path}.{inner}"
        body = _check_keys(ctx, entry.get(inner), body_path, fields)
        if not body:
            raise ctx.error(body, body_path, f"an empty {inner} matches nothing useful; remove it")
        checks: list[FieldCheck] = []
        for name in body:
            values = _string_list(ctx, body, name, body_path)
            negate = name.startswith("not")
            base = name[3].lower() + name[4:] if negate else name
            try:
                test, get = _FIELDS[base](values, namespace)
            except BadValue as exc:
                raise ctx.error(body, f"{body_path}.{name}", str(exc), name) from None
            checks.append(
                FieldCheck(
                    f"{body_path}.{name}",
                    body.line_of(name),
                    _negate(test, negate),
                    base,
                    tuple(values),
                    negate,
                    get,
                )
            )
        clauses.append(Clause(body_path, tuple(checks)))
    return tuple(clauses)


def _negate(test: Test, negate: bool) -> Test:
    return (lambda a: not test(a)) if negate else test


# --- attributes: one compiler serves a from/to field and the same when key --------------

# values (and the policy's namespace) -> a test of the request and the value it reads
Compiler = Callable[[list[str], str | None], tuple[Test, Getter]]
Matcher = Callable[[Any], bool]


def _on(get: Getter, make: Callable[[list[str]], Matcher]) -> Compiler:
    """Compile ``values`` with ``make`` once; test the attribute ``get`` reads per request."""

    def compile_(values: list[str], namespace: str | None) -> tuple[Test, Getter]:
        made = make(values)
        match: Matcher = made
        if isinstance(made, StringMatcher | RequestPrincipalMatcher):
            match = made.function()
        return (lambda a: match(get(a))), get

    return compile_


def _any(make: Callable[[list[str]], Matcher]) -> Callable[[list[str]], Matcher]:
    """For list-valued attributes (audiences, list claims): any element may match."""

    def build(values: list[str]) -> Matcher:
        match = make(values)
        return lambda items: any(match(v) for v in items)

    return build


def _ports(values: list[str]) -> Matcher:
    for v in values:
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise BadValue(f"{v!r} is not a port number")
    ports = frozenset(str(int(v)) for v in values)
    return lambda port: port in ports


def _paths(values: list[str]) -> Matcher:
    strings = compile_strings([v for v in values if not is_path_template(v)])
    templates = [v for v in values if is_path_template(v)]
    if not templates:
        return strings
    tmpl = compile_path_templates(templates)
    return lambda path: strings(path) or tmpl(path)


def _service_account(value: str, namespace: str | None) -> str:
    """``sa`` or ``ns/sa``; a bare name is in the policy's own namespace, as in Istio."""
    if "*" in value or value.count("/") > 1 or not value.strip("/") or value != value.strip():
        raise BadValue(f"{value!r}: write a service account as '<name>' or '<namespace>/<name>'")
    if "/" in value:
        return value
    if namespace is None:
        raise BadValue(f"{value!r}: a policy without a namespace must write '<namespace>/<name>'")
    return f"{namespace}/{value}"


_principal: Getter = attrgetter("principal")  # in C: one Python frame fewer per test


def _service_accounts(values: list[str], namespace: str | None) -> tuple[Test, Getter]:
    match = compile_service_accounts([_service_account(v, namespace) for v in values])
    return (lambda a: match(a.principal)), _principal


def _exists(values: list[str]) -> Matcher:
    # Hosts, methods and headers: Istio's "*" only asks that the header exist.
    return compile_strings(values, star_matches_empty=True)


_PRINCIPAL = _on(_principal, compile_strings)
_REQUEST_PRINCIPAL = _on(attrgetter("request_principal"), compile_request_principals)
_NAMESPACE = _on(_principal, compile_namespaces)
_SOURCE_IP = _on(lambda a: a.source_ip, compile_ip_blocks)
_REMOTE_IP = _on(lambda a: a.remote_ip, compile_ip_blocks)
_PORT = _on(lambda a: a.port, _ports)

_FIELDS: dict[str, Compiler] = {
    "principals": _PRINCIPAL,
    "requestPrincipals": _REQUEST_PRINCIPAL,
    "namespaces": _NAMESPACE,
    "serviceAccounts": _service_accounts,
    "ipBlocks": _SOURCE_IP,
    "remoteIpBlocks": _REMOTE_IP,
    # Case-insensitive against the whole :authority; Istio does not strip the port, so
    # "example.com" does not match "example.com:8080" (write "example.com:*" too).
    "hosts": _on(
        attrgetter("inp.host"),
        lambda v: compile_strings(v, fold_case=True, star_matches_empty=True),
    ),
    "ports": _PORT,
    "methods": _on(attrgetter("inp.method"), _exists),
    "paths": _on(attrgetter("inp.path"), _paths),
}

_CONDITIONS: dict[str, Compiler] = {
    "source.principal": _PRINCIPAL,
    "source.namespace": _NAMESPACE,
    "source.serviceAccount": _service_accounts,
    "source.ip": _SOURCE_IP,
    "remote.ip": _REMOTE_IP,
    "destination.ip": _on(lambda a: a.destination_ip, compile_ip_blocks),
    "destination.port": _PORT,
    "request.auth.principal": _REQUEST_PRINCIPAL,
    "request.auth.presenter": _on(
        lambda a: (a.token.presenter or None) if a.token else None, compile_strings
    ),
    "request.auth.audiences": _on(
        lambda a: a.token.audiences if a.token else (), _any(compile_strings)
    ),
    "connection.sni": _on(lambda a: a.inp.sni or None, compile_strings),
}


_CLAIM_STEP = re.compile(r"\[([^\[\]]+)\]")


def _claim_path(key: str) -> tuple[str, ...]:
    suffix = key[len("request.auth.claims") :]
    steps = _CLAIM_STEP.findall(suffix)
    if not steps or "".join(f"[{s}]" for s in steps) != suffix:
        raise BadValue(f"{key!r}: write claims as request.auth.claims[name] or [a][b] for nesting")
    return tuple(steps)


def _claim_strings(value: Any, *, split: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split()) if split else (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _condition_compiler(key: str) -> Compiler:
    """The compiler of one ``when`` key; the bracketed keys are parsed here, at load."""
    if key in _CONDITIONS:
        return _CONDITIONS[key]
    if key.startswith("request.headers[") and key.endswith("]"):
        header = key[len("request.headers[") : -1].lower()
        if not _HEADER_NAME.fullmatch(header):
            raise BadValue(f"{key!r}: not a valid header name")
        return _on(lambda a: a.headers.get(header), _exists)
    if key.startswith("request.auth.claims"):
        steps = _claim_path(key)
        # Istio splits these space-delimited OAuth claims into lists before matching.
        split = steps in (("scope",), ("permission",))

        def claim(a: Attributes) -> tuple[str, ...]:
            claims = a.claims
            return () if claims is None else _claim_strings(claim_value(claims, steps), split=split)

        return _on(claim, _any(compile_strings))
    if key.startswith("experimental."):
        raise BadValue(f"{key!r}: experimental Envoy filter-state keys are not supported")
    raise BadValue(f"unknown condition key {key!r}")


def _condition(ctx: _Ctx, node: Any, path: str, namespace: str | None) -> list[FieldCheck]:
    """One ``when`` entry; ``values`` and ``notValues`` become two AND'ed checks."""
    if ctx.extended and isinstance(node, Node) and "cel" in node:
        return [_cel_condition(ctx, node, path)]
    node = _check_keys(ctx, node, path, _CONDITION_KEYS)
    key = node.get("key")
    if not isinstance(key, str) or not key:
        raise ctx.error(node, f"{path}.key", "is required")
    if "values" not in node and "notValues" not in node:
        raise ctx.error(node, path, "needs values or notValues")
    checks: list[FieldCheck] = []
    try:
        compile_ = _condition_compiler(key)
        for field, negate in (("values", False), ("notValues", True)):
            if field in node:
                values = _string_list(ctx, node, field, path)
                test, get = compile_(values, namespace)
                checks.append(
                    FieldCheck(
                        f"{path}[{key}].{field}",
                        node.line_of(field),
                        _negate(test, negate),
                        key,
                        tuple(values),
                        negate,
                        get,
                    )
                )
    except BadValue as exc:
        raise ctx.error(node, path, str(exc), "key") from None
    return checks


def _cel_condition(ctx: _Ctx, node: Node, path: str) -> FieldCheck:
    _check_keys(ctx, node, path, ("cel",))
    expr = node["cel"]
    if not isinstance(expr, str) or not expr.strip():
        raise ctx.error(node, f"{path}.cel", "must be a CEL expression string", "cel")
    try:
        # An error at request time (a missing claim, a type mismatch) must fail closed: it
        # makes a DENY rule match and an ALLOW rule not match.
        test = compile_cel(expr, on_error=ctx.action is Action.DENY)
    except BadValue as exc:
        raise ctx.error(node, f"{path}.cel", str(exc), "cel") from None
    return FieldCheck(f"{path}.cel", node.line_of("cel"), test, "cel", (expr,), get=test.explain)


# --- RequestAuthentication --------------------------------------------------------------


def _request_authentication(
    ctx: _Ctx, spec: Any, meta: _Meta, base_dir: Path
) -> RequestAuthentication:
    spec = _check_keys(ctx, spec, "spec", _AUTHN_SPEC_KEYS)
    algorithms = SUPPORTED_ALGORITHMS
    if ALGORITHMS_ANNOTATION in meta.annotations:
        listed = meta.annotations[ALGORITHMS_ANNOTATION].split(",")
        wanted = {a.strip() for a in listed if a.strip()}
        unknown = wanted - SUPPORTED_ALGORITHMS
        if unknown or not wanted:
            raise ctx.error(
                meta.annotations,
                f"metadata.annotations[{ALGORITHMS_ANNOTATION}]",
                f"unsupported algorithm(s) {sorted(unknown)}; choose from "
                f"{sorted(SUPPORTED_ALGORITHMS)}",
            )
        algorithms = frozenset(wanted)
    rules = spec.get("jwtRules") or []
    if not isinstance(rules, list):
        raise ctx.error(spec, "spec.jwtRules", "must be a list", "jwtRules")
    providers = _each(
        rules, lambda i, r: _jwt_rule(ctx, r, f"spec.jwtRules[{i}]", algorithms, base_dir)
    )
    issuers = [p.issuer for p in providers]
    dup = {i for i in issuers if issuers.count(i) > 1}
    if dup:
        raise ctx.error(spec, "spec.jwtRules", f"issuer(s) {sorted(dup)} listed twice", "jwtRules")
    return RequestAuthentication(
        meta.name,
        meta.namespace,
        _scope(ctx, spec, meta),
        providers,
        ctx.file,
        meta.line,
    )


def _jwt_rule(
    ctx: _Ctx, node: Any, path: str, algorithms: frozenset[str], base_dir: Path
) -> JwtProvider:
    node = _check_keys(ctx, node, path, _JWT_RULE_KEYS)
    issuer = node.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise ctx.error(node, f"{path}.issuer", "is required")
    audiences = (
        frozenset(_string_list(ctx, node, "audiences", path))
        if "audiences" in node
        else frozenset()
    )
    where = f"{ctx.file}:{node.line}"
    timeout = _duration(ctx, node, "timeout", path) if "timeout" in node else None
    if timeout is not None and timeout > MAX_JWKS_TIMEOUT_SECONDS:
        # A reload waits up to two of these for a first fetch, off the request path but not
        # for ever.
        raise ctx.error(
            node, f"{path}.timeout", f"must be at most {MAX_JWKS_TIMEOUT_SECONDS:g}s", "timeout"
        )
    keys: tuple[Jwk, ...] = ()
    remote: RemoteKeySet | None = None
    try:
        if "jwks" in node and "jwksUri" in node:
            raise ctx.error(node, path, "set jwks or jwksUri, not both", "jwks")
        if "jwks" in node:
            if not isinstance(node["jwks"], str):
                raise ctx.error(node, f"{path}.jwks", "must be a JSON string", "jwks")
            keys = compile_jwks(node["jwks"], source=f"{where}: {path}.jwks")
        elif "jwksUri" in node:
            uri = _jwks_uri(ctx, node, path)
            if uri.startswith(("https://", "http://")):
                remote = ctx.keys.key_set(uri, discovery=False, timeout=timeout)
            else:
                keys = compile_jwks(
                    _read_jwks_file(ctx, node, path, uri, base_dir),
                    source=f"{where}: {path}.jwksUri",
                )
        elif issuer.startswith(("https://", "http://")):
            # Istio: without jwks and jwksUri, the keys come from the issuer's OIDC discovery.
            remote = ctx.keys.key_set(issuer, discovery=True, timeout=timeout)
        else:
            raise ctx.error(
                node,
                path,
                "needs jwks or jwksUri, or an http(s) issuer to discover the keys of "
                "(OpenID Connect discovery)",
            )
    except JwksError as exc:
        raise ctx.error(node, path, exc.message.split(": ", 2)[-1], "jwks") from None
    forward = node.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        raise ctx.error(node, f"{path}.forwardOriginalToken", "must be true or false")
    payload_header = ""
    if "outputPayloadToHeader" in node:
        payload_header = _output_header(node["outputPayloadToHeader"]) or ""
        if not payload_header:
            raise ctx.error(
                node,
                f"{path}.outputPayloadToHeader",
                f"must be a header name, not {RESERVED_HEADER_PREFIX}* or a reserved header",
                "outputPayloadToHeader",
            )
    return JwtProvider(
        issuer=issuer,
        audiences=audiences,
        keys=keys,
        locations=_locations(ctx, node, path),
        algorithms=algorithms,
        output_claim_to_headers=_claim_headers(ctx, node, path),
        output_payload_to_header=payload_header,
        forward_original_token=forward,
        source=where,
        remote=remote,
    )


def _jwks_uri(ctx: _Ctx, node: Node, path: str) -> str:
    uri = node["jwksUri"]
    if not isinstance(uri, str) or not uri:
        raise ctx.error(node, f"{path}.jwksUri", "must be a URI string", "jwksUri")
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise ctx.error(node, f"{path}.jwksUri", "has no host", "jwksUri")
    elif parsed.scheme not in ("file", ""):
        raise ctx.error(node, f"{path}.jwksUri", f"unsupported scheme {parsed.scheme!r}", "jwksUri")
    return uri


def _read_jwks_file(ctx: _Ctx, node: Node, path: str, uri: str, base_dir: Path) -> str:
    parsed = urlparse(uri)
    file_path = Path(parsed.path if parsed.scheme == "file" else uri)
    if not file_path.is_absolute():
        file_path = base_dir / file_path
    ctx.reads.append(file_path)
    if file_path.exists() and not file_path.is_file():
        # A directory fails the read below anyway; a FIFO would block it (and reloads) forever.
        raise ctx.error(node, f"{path}.jwksUri", f"{file_path} is not a regular file", "jwksUri")
    try:
        return file_path.read_text()
    except OSError as exc:
        raise ctx.error(
            node, f"{path}.jwksUri", f"cannot read {file_path}: {exc.strerror}", "jwksUri"
        ) from None


def _duration(ctx: _Ctx, node: Node, key: str, path: str) -> float:
    """A duration such as ``5s``, ``1.5s``, ``250ms``, ``10m`` (protobuf JSON writes ``Ns``)."""
    value = node[key]
    try:
        seconds = parse_duration(value) if isinstance(value, str) else 0.0
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ctx.error(
            node, f"{path}.{key}", "must be a positive duration like 5s, 250ms or 10m", key
        )
    return seconds


def _locations(ctx: _Ctx, node: Node, path: str) -> tuple[TokenLocation, ...]:
    locs: list[TokenLocation] = []
    headers = node.get("fromHeaders") or []
    if not isinstance(headers, list):
        raise ctx.error(node, f"{path}.fromHeaders", "must be a list", "fromHeaders")
    for i, h in enumerate(headers):
        h = _check_keys(ctx, h, f"{path}.fromHeaders[{i}]", ("name", "prefix"))
        hname, prefix = h.get("name"), h.get("prefix", "")
        if not isinstance(hname, str) or not _HEADER_NAME.fullmatch(hname):
            raise ctx.error(h, f"{path}.fromHeaders[{i}].name", "must be a header name")
        if not isinstance(prefix, str):
            raise ctx.error(h, f"{path}.fromHeaders[{i}].prefix", "must be a string")
        locs.append(TokenLocation("header", hname.lower(), prefix))
    for key, kind in (("fromParams", "param"), ("fromCookies", "cookie")):
        if key in node:
            for v in _string_list(ctx, node, key, path):
                locs.append(TokenLocation(kind, v))  # type: ignore[arg-type]
    return tuple(locs) or DEFAULT_LOCATIONS


def _claim_headers(ctx: _Ctx, node: Node, path: str) -> tuple[ClaimToHeader, ...]:
    items = node.get("outputClaimToHeaders") or []
    if not isinstance(items, list):
        raise ctx.error(node, f"{path}.outputClaimToHeaders", "must be a list")
    out: list[ClaimToHeader] = []
    for i, item in enumerate(items):
        p = f"{path}.outputClaimToHeaders[{i}]"
        item = _check_keys(ctx, item, p, ("header", "claim"))
        header, claim = _output_header(item.get("header")), item.get("claim")
        if header is None:
            raise ctx.error(
                item,
                f"{p}.header",
                f"must be a header name, not {RESERVED_HEADER_PREFIX}* or a reserved header",
                "header",
            )
        if any(h.header == header for h in out):
            raise ctx.error(item, f"{p}.header", f"{header!r} is written twice", "header")
        if not isinstance(claim, str) or not claim:
            raise ctx.error(item, f"{p}.claim", "must be a claim name", "claim")
        out.append(ClaimToHeader(header, claim, tuple(claim.split("."))))
    return tuple(out)
