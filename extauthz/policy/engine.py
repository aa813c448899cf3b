"""The loaded policy set and its evaluation in Istio's order: DENY, then ALLOW.

A :class:`PolicySet` is an immutable snapshot of one load. The resources that apply to a
workload (namespace + labels) are selected once per workload and memoised, so a Check does
only the rule matching itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from ..decision import DenyResponse, Header
from ..errors import PolicyError, PolicySetError, WorkloadUnknownError
from ..identity.jwks import KeySetRegistry, RemoteKeySet
from ..identity.jwt import TokenCache, TokenVerifier
from ..identity.mint import AUTHORIZATION_HEADER, TokenSpec
from .compile import compile_resource
from .index import LINEAR_BELOW, RuleIndex
from .model import (
    Action,
    Attributes,
    AuthorizationPolicy,
    PolicySource,
    RequestAuthentication,
    Rule,
    Target,
)
from .source import load_text, misnamed_policies, policy_files

log = logging.getLogger(__name__)

DEFAULT_ROOT_NAMESPACE = "istio-system"
_MAX_WORKLOADS = 4096


class Verdict(NamedTuple):
    """The outcome of policy evaluation alone (identity already established).

    A NamedTuple: built in one step, and the common ones (a rule's hit with no AUDIT policy
    matching, no ALLOW policy) are built once per workload, at selection.
    """

    allowed: bool
    reason: str
    policy: str = ""
    rule: str = ""
    audit: tuple[str, ...] = ()
    dry_run: Verdict | None = None
    headers: tuple[Header, ...] = ()  # the allowing rule's extension headers
    token: TokenSpec | None = None  # the allowing rule's token to mint
    deny_response: DenyResponse | None = None


def _hit(policy: AuthorizationPolicy, rule: Rule) -> Verdict:
    """The verdict of a DENY or ALLOW rule that matched (no AUDIT policy matching)."""
    if policy.action is Action.DENY:
        return Verdict(
            False, "denied_by_policy", policy.key, rule.name, deny_response=policy.deny_response
        )
    return Verdict(
        True, "allowed_by_policy", policy.key, rule.name, headers=rule.headers, token=rule.token
    )


def _first(
    policies: Iterable[AuthorizationPolicy], attrs: Attributes
) -> tuple[AuthorizationPolicy, Rule] | None:
    for p in policies:
        rule = p.first_match(attrs)
        if rule is not None:
            return p, rule
    return None


@dataclass(frozen=True, slots=True)
class _Enforcement:
    deny: tuple[AuthorizationPolicy, ...]
    allow: tuple[AuthorizationPolicy, ...]
    audit: tuple[AuthorizationPolicy, ...]
    # Sent when no ALLOW policy matched: the first ALLOW policy's (in load order) that has one.
    no_match_response: DenyResponse | None
    # The rules of deny, allow and audit (in that order) filed by what they need of a request;
    # None: scan them all (few rules, or none the index can file).
    index: RuleIndex | None = None
    # The verdict of each DENY and ALLOW rule's hit, by the rule's id(), and of no rule hit.
    hits: Mapping[int, Verdict] = field(default_factory=dict)
    no_hit: Verdict = field(default_factory=lambda: Verdict(True, "no_allow_policy"))

    @classmethod
    def of(
        cls, policies: Iterable[AuthorizationPolicy], *, indexed: bool | None = None
    ) -> _Enforcement:
        """``indexed``: None chooses by size; False/True force a scan / the index (benchmarks)."""
        ps = tuple(policies)
        deny = tuple(p for p in ps if p.action is Action.DENY)
        allow = tuple(p for p in ps if p.action is Action.ALLOW)
        audit = tuple(p for p in ps if p.action is Action.AUDIT)
        index = None
        if indexed or (indexed is None and sum(len(p.rules) for p in ps) >= LINEAR_BELOW):
            index = RuleIndex((deny, allow, audit))
            if indexed is None and index.stats.unfiled == index.stats.rules:
                index = None  # nothing filed: every rule would be a candidate anyway
        no_match_response = next((p.deny_response for p in allow if p.deny_response), None)
        return cls(
            deny,
            allow,
            audit,
            no_match_response,
            index,
            {id(r): _hit(p, r) for p in (*deny, *allow) for r in p.rules},
            Verdict(False, "no_allow_policy_matched", deny_response=no_match_response)
            if allow
            else Verdict(True, "no_allow_policy"),
        )

    def evaluate(self, attrs: Attributes) -> Verdict:
        if self.index is None:
            audit = tuple(p.key for p in self.audit if p.first_match(attrs) is not None)
            deny_hit = _first(self.deny, attrs)
            allow_hit = _first(self.allow, attrs) if deny_hit is None else None
        else:
            audit, deny_hit, allow_hit = self._indexed(self.index, attrs)
        hit = deny_hit if deny_hit is not None else allow_hit
        verdict = self.hits[id(hit[1])] if hit is not None else self.no_hit
        return verdict._replace(audit=audit) if audit else verdict

    def _indexed(
        self, index: RuleIndex, attrs: Attributes
    ) -> tuple[
        tuple[str, ...],
        tuple[AuthorizationPolicy, Rule] | None,
        tuple[AuthorizationPolicy, Rule] | None,
    ]:
        """As the scan: matching AUDIT policies, the first DENY hit, else the first ALLOW hit.

        Candidates come in (group, policy, rule) order, so the first that matches is the first
        the scan would find.
        """
        candidates = index.candidates(attrs)
        entries = index.entries
        deny_end, allow_end, _ = index.ends
        audit: list[str] = []
        matched: AuthorizationPolicy | None = None
        deny_hit = allow_hit = None
        for seq in candidates:
            if seq < deny_end:
                if deny_hit is None and entries[seq][1].test(attrs):
                    deny_hit = entries[seq]
            elif seq < allow_end:
                if deny_hit is None and allow_hit is None and entries[seq][1].test(attrs):
                    allow_hit = entries[seq]
            else:
                policy, rule = entries[seq]
                if policy is not matched and rule.test(attrs):
                    audit.append(policy.key)
                    matched = policy
        return tuple(audit), deny_hit, allow_hit


class WorkloadPolicies:
    """The resources that apply to one workload, split by action, plus its JWT verifier."""

    def __init__(
        self,
        authz: Iterable[AuthorizationPolicy],
        authn: Iterable[RequestAuthentication],
        *,
        tokens: TokenCache | None = None,
        scope: int = 0,
    ) -> None:
        authz = tuple(authz)
        self.authz = authz
        self.enforced = _Enforcement.of(p for p in authz if not p.dry_run)
        # Istio's shadow rules: what the decision would be if dry-run policies were enforced.
        self.shadow = _Enforcement.of(authz) if any(p.dry_run for p in authz) else None
        self.verifier = TokenVerifier(
            (p for ra in authn for p in ra.providers), cache=tokens, scope=scope
        )
        # Where this workload's rules put minted tokens: a caller must never supply one. Not
        # authorization: that is the caller's own credential, the RequestAuthentication's to
        # verify and strip.
        self.token_headers = frozenset(
            r.token.header
            for p in authz
            if p.action is Action.ALLOW
            for r in p.rules
            if r.token is not None and r.token.header != AUTHORIZATION_HEADER
        )
        # Every header this workload's rules may write upstream: a caller's copy never passes.
        self.identity_headers = self.verifier.output_headers | self.token_headers
        self._managed: dict[frozenset[str], frozenset[str]] = {}
        # The request headers the rules read, if the rules read nothing but the peer, the
        # token, the method, the host, the path and those headers; None otherwise.
        self.memo_headers = memo_headers(authz)

    def managed_headers(self, own: frozenset[str]) -> frozenset[str]:
        """``identity_headers`` and the server's ``own`` ones: what only extauthz may set."""
        managed = self._managed.get(own)
        if managed is None:
            managed = self._managed[own] = self.identity_headers | own
        return managed

    def evaluate(self, attrs: Attributes) -> Verdict:
        verdict = self.enforced.evaluate(attrs)
        if self.shadow is None:
            return verdict
        # _replace(): a field added to Verdict later cannot be dropped here.
        return verdict._replace(dry_run=self.shadow.evaluate(attrs))


# What a rule may read for its verdict to be remembered: these functions of the peer
# principal, the verified token, the method, the host and the path, and named headers.
_MEMO_FIELDS = frozenset(
    {
        "principals",
        "requestPrincipals",
        "namespaces",
        "serviceAccounts",
        "methods",
        "paths",
        "hosts",
        "source.principal",
        "source.namespace",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.presenter",
        "request.auth.audiences",
    }
)
_HEADER_KEY = "request.headers["


def memo_headers(authz: Iterable[AuthorizationPolicy]) -> tuple[str, ...] | None:
    """The header names a decision of these policies reads, or None when a decision reads
    more than the peer, the token, method, host, path and named headers (addresses, ports,
    SNI, CEL) or a rule mints a token (a fresh one on expiry): then no decision may be reused.
    """
    headers: set[str] = set()
    for policy in authz:
        for rule in policy.rules:
            if rule.token is not None:
                return None
            for clause in (*rule.sources, *rule.operations, rule.conditions):
                for check in clause.checks:
                    name = check.field
                    if name.startswith(_HEADER_KEY):
                        headers.add(name[len(_HEADER_KEY) : -1].lower())
                    elif name not in _MEMO_FIELDS and not name.startswith("request.auth.claims"):
                        return None
    return tuple(sorted(headers))


def parse_labels(text: str) -> Mapping[str, str]:
    """``app=orders,version=v1`` (the ``labels`` context extension) into a mapping."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        if key:
            labels[key] = value if eq else ""
    return MappingProxyType(labels)


class PolicySet:
    """An immutable, compiled snapshot of a policy directory."""

    def __init__(
        self,
        authz: Iterable[AuthorizationPolicy],
        authn: Iterable[RequestAuthentication],
        source: PolicySource,
    ) -> None:
        self.authz = tuple(authz)
        self.authn = tuple(authn)
        self.source = source
        self._resources: tuple[AuthorizationPolicy | RequestAuthentication, ...] = (
            *self.authz,
            *self.authn,
        )
        self.namespaced = any(r.scope.namespace is not None for r in self._resources)
        self._workloads: dict[
            tuple[str | None, str | None, frozenset[Target]], WorkloadPolicies
        ] = {}
        # One verified-token cache for every workload of this set (bounded as a whole), its
        # entries scoped by the exact providers that verified them.
        self.token_cache = TokenCache()
        self._scopes: dict[tuple[int, ...], int] = {}

    @property
    def revision(self) -> str:
        return self.source.revision

    @property
    def mints_tokens(self) -> bool:
        """Whether a rule asks for a minted token (the server then needs ``--signing-key``)."""
        return any(r.token is not None for p in self.authz for r in p.rules)

    def for_workload(
        self,
        namespace: str | None,
        labels: str | None,
        targets: frozenset[Target] = frozenset(),
        *,
        remember: bool = True,
    ) -> WorkloadPolicies:
        """The policies of the workload ``namespace`` + ``labels`` (``a=b,c=d`` or None) that
        is reached as ``targets`` (the Service / Gateway names Envoy's route gives).

        ``remember=False`` (explanations, tests of policies) leaves the memo alone, so that
        made-up workloads cannot crowd out the ones Envoy asks about.
        """
        key = (namespace, labels, targets)
        found = self._workloads.get(key)
        if found is not None:
            return found
        if namespace is None and self.namespaced:
            raise WorkloadUnknownError(
                "policies are namespaced but the request names no workload namespace"
            )
        parsed = parse_labels(labels) if labels is not None else None
        authz = [p for p in self.authz if p.scope.applies_to(namespace, parsed, targets)]
        authn = [p for p in self.authn if p.scope.applies_to(namespace, parsed, targets)]
        here = [r for r in self._resources if r.scope.namespace in (None, namespace)]
        selecting = [r.key for r in here if r.scope.match_labels and not r.scope.targets]
        if parsed is None and selecting:
            raise WorkloadUnknownError(
                f"policies {selecting[:3]} select workloads by label but the request "
                "names no workload labels"
            )
        targeting = [r.key for r in here if r.scope.targets]
        if not targets and targeting:
            raise WorkloadUnknownError(
                f"policies {targeting[:3]} have targetRefs but the request names no service "
                "or gateway (context_extensions service / gateway)"
            )
        providers = tuple(id(p) for ra in authn for p in ra.providers)
        scope = self._scopes.setdefault(providers, len(self._scopes))
        wp = WorkloadPolicies(authz, authn, tokens=self.token_cache, scope=scope)
        if remember:
            if len(self._workloads) >= _MAX_WORKLOADS:
                # Oldest first: bounded, and a new workload is still remembered.
                self._workloads.pop(next(iter(self._workloads)), None)
            self._workloads[key] = wp  # a benign race: two threads build equal values
        return wp

    def workload_keys(self) -> list[tuple[str | None, str | None, frozenset[Target]]]:
        """The workloads this set has been asked about (to warm a reloaded set with)."""
        return list(self._workloads)

    def warm(self, keys: Iterable[tuple[str | None, str | None, frozenset[Target]]]) -> None:
        """Select (and index) these workloads' policies now, off the request path."""
        for namespace, labels, targets in keys:
            with contextlib.suppress(WorkloadUnknownError):
                self.for_workload(namespace, labels, targets)

    @classmethod
    def empty(cls) -> PolicySet:
        return cls((), (), PolicySource((), "empty"))

    @property
    def key_sets(self) -> tuple[RemoteKeySet, ...]:
        """The remote JWKS this set's RequestAuthentications read (each once)."""
        found = {id(p.remote): p.remote for a in self.authn for p in a.providers if p.remote}
        return tuple(found.values())

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        keys: KeySetRegistry | None = None,
    ) -> PolicySet:
        """Load and compile every policy file below ``directory``.

        All problems of all files are collected into one :class:`PolicySetError`; nothing is
        half-loaded. With a live ``keys`` registry, remote JWKS are fetched and their first
        fetch awaited (bounded by the fetch timeout): this runs at start-up or in the reload
        thread, never on the request path. Without one, nothing touches the network.
        """
        files = policy_files(directory)
        errors: list[PolicyError] = []
        authz: list[AuthorizationPolicy] = []
        authn: list[RequestAuthentication] = []
        warnings: list[str] = []
        digest = hashlib.sha256()
        seen: dict[tuple[str, str | None, str], str] = {}
        reads: list[Path] = []
        for path in files:
            rel = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(PolicyError(f"cannot read: {exc}", file=rel))
                continue
            digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
            try:
                for doc in load_text(text, rel):
                    try:
                        res = compile_resource(
                            doc.body,
                            file=rel,
                            root_namespace=root_namespace,
                            base_dir=path.parent,
                            reads=reads,
                            keys=keys,
                        )
                    except PolicyError as exc:
                        errors.append(exc)
                        continue
                    except PolicySetError as exc:  # several rules of one resource
                        errors.extend(exc.errors)
                        continue
                    if isinstance(res, str):
                        warnings.append(res)
                        continue
                    kind = type(res).__name__
                    where = f"{res.file}:{res.line}"
                    prior = seen.setdefault((kind, res.namespace, res.name), where)
                    if prior != where:
                        errors.append(
                            PolicyError(
                                f"{kind} {res.key} is defined again (first at {prior})",
                                file=res.file,
                                line=res.line,
                            )
                        )
                    elif isinstance(res, AuthorizationPolicy):
                        authz.append(res)
                    else:
                        authn.append(res)
            except PolicyError as exc:
                errors.append(exc)
        for path in misnamed_policies(directory):
            errors.append(
                PolicyError(
                    "holds apiVersion/kind resources, but *.test.yaml files are policy test "
                    "cases and are never enforced: rename it",
                    file=str(path),
                )
            )
        if errors:
            raise PolicySetError(errors)
        for w in warnings:
            log.warning("%s", w)
        for dep in sorted(set(reads)):
            # A changed JWKS file is a new revision even when no policy file changed.
            with contextlib.suppress(OSError):
                digest.update(str(dep).encode() + b"\0" + dep.read_bytes() + b"\0")
        source = PolicySource(
            tuple(map(str, files)),
            digest.hexdigest()[:12],
            tuple(warnings),
            tuple(sorted({str(p) for p in reads})),
        )
        loaded = cls(authz, authn, source)
        if keys is not None:
            for missing in keys.wait_ready(loaded.key_sets):
                # Not an error: the IdP may come back; until then its tokens get a 401.
                log.warning(
                    "JWKS %s: no keys yet (%s); tokens of this issuer are refused until a "
                    "fetch succeeds",
                    missing.describe,
                    missing.last_error or "first fetch still running",
                )
        return loaded
