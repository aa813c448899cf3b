"""The loaded policy set and its evaluation in Istio's order: DENY, then ALLOW.

A :class:`PolicySet` is an immutable snapshot of one load. The resources that apply to a
workload (namespace + labels) are selected once per workload and memoised, so a Check does
only the rule matching itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import PolicyError, PolicySetError, WorkloadUnknownError
from ..identity.jwt import TokenVerifier
from .compile import compile_resource
from .model import (
    Action,
    Attributes,
    AuthorizationPolicy,
    PolicySource,
    RequestAuthentication,
    Rule,
)
from .source import load_text, policy_files

log = logging.getLogger(__name__)

DEFAULT_ROOT_NAMESPACE = "istio-system"
_MAX_WORKLOADS = 4096


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of policy evaluation alone (identity already established)."""

    allowed: bool
    reason: str
    policy: str = ""
    rule: str = ""
    audit: tuple[str, ...] = ()
    dry_run: Verdict | None = None


def _first(policies: Iterable[AuthorizationPolicy], attrs: Attributes) -> tuple[str, Rule] | None:
    for p in policies:
        rule = p.first_match(attrs)
        if rule is not None:
            return p.key, rule
    return None


@dataclass(frozen=True, slots=True)
class _Enforcement:
    deny: tuple[AuthorizationPolicy, ...]
    allow: tuple[AuthorizationPolicy, ...]
    audit: tuple[AuthorizationPolicy, ...]

    @classmethod
    def of(cls, policies: Iterable[AuthorizationPolicy]) -> _Enforcement:
        ps = tuple(policies)
        return cls(
            tuple(p for p in ps if p.action is Action.DENY),
            tuple(p for p in ps if p.action is Action.ALLOW),
            tuple(p for p in ps if p.action is Action.AUDIT),
        )

    def evaluate(self, attrs: Attributes) -> Verdict:
        audit = tuple(p.key for p in self.audit if p.first_match(attrs) is not None)
        hit = _first(self.deny, attrs)
        if hit is not None:
            return Verdict(False, "denied_by_policy", hit[0], hit[1].name, audit)
        if not self.allow:
            return Verdict(True, "no_allow_policy", audit=audit)
        hit = _first(self.allow, attrs)
        if hit is not None:
            return Verdict(True, "allowed_by_policy", hit[0], hit[1].name, audit)
        return Verdict(False, "no_allow_policy_matched", audit=audit)


class WorkloadPolicies:
    """The resources that apply to one workload, split by action, plus its JWT verifier."""

    def __init__(
        self,
        authz: Iterable[AuthorizationPolicy],
        authn: Iterable[RequestAuthentication],
    ) -> None:
        authz = tuple(authz)
        self.enforced = _Enforcement.of(p for p in authz if not p.dry_run)
        # Istio's shadow rules: what the decision would be if dry-run policies were enforced.
        self.shadow = _Enforcement.of(authz) if any(p.dry_run for p in authz) else None
        self.verifier = TokenVerifier(p for ra in authn for p in ra.providers)

    def evaluate(self, attrs: Attributes) -> Verdict:
        verdict = self.enforced.evaluate(attrs)
        if self.shadow is None:
            return verdict
        shadow = self.shadow.evaluate(attrs)
        return Verdict(
            verdict.allowed,
            verdict.reason,
            verdict.policy,
            verdict.rule,
            verdict.audit,
            dry_run=shadow,
        )


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
        self._workloads: dict[tuple[str | None, str | None], WorkloadPolicies] = {}

    @property
    def revision(self) -> str:
        return self.source.revision

    def for_workload(self, namespace: str | None, labels: str | None) -> WorkloadPolicies:
        """The policies of the workload ``namespace`` + ``labels`` (``a=b,c=d`` or None)."""
        key = (namespace, labels)
        found = self._workloads.get(key)
        if found is not None:
            return found
        if namespace is None and self.namespaced:
            raise WorkloadUnknownError(
                "policies are namespaced but the request names no workload namespace"
            )
        parsed = parse_labels(labels) if labels is not None else None
        authz = [p for p in self.authz if p.scope.applies_to(namespace, parsed)]
        authn = [p for p in self.authn if p.scope.applies_to(namespace, parsed)]
        if parsed is None:
            selecting = [
                r.key
                for r in self._resources
                if r.scope.match_labels and r.scope.namespace in (None, namespace)
            ]
            if selecting:
                raise WorkloadUnknownError(
                    f"policies {selecting[:3]} select workloads by label but the request "
                    "names no workload labels"
                )
        wp = WorkloadPolicies(authz, authn)
        if len(self._workloads) < _MAX_WORKLOADS:
            self._workloads[key] = wp  # a benign race: two threads build equal values
        return wp

    @classmethod
    def empty(cls) -> PolicySet:
        return cls((), (), PolicySource((), "empty"))

    @classmethod
    def load(cls, directory: Path, *, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
        """Load and compile every policy file below ``directory``.

        All problems of all files are collected into one :class:`PolicySetError`; nothing is
        half-loaded.
        """
        files = policy_files(directory)
        errors: list[PolicyError] = []
        authz: list[AuthorizationPolicy] = []
        authn: list[RequestAuthentication] = []
        warnings: list[str] = []
        digest = hashlib.sha256()
        seen: dict[tuple[str, str | None, str], str] = {}
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
                            doc.body, file=rel, root_namespace=root_namespace, base_dir=path.parent
                        )
                    except PolicyError as exc:
                        errors.append(exc)
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
        if errors:
            raise PolicySetError(errors)
        for w in warnings:
            log.warning("%s", w)
        source = PolicySource(tuple(map(str, files)), digest.hexdigest()[:12], tuple(warnings))
        return cls(authz, authn, source)
