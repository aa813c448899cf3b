"""Why a decision came out as it did: every applicable policy, every rule, the failing field.

Never on the request path. It re-runs the same compiled :class:`FieldCheck` tests the engine
runs (so an explanation cannot disagree with the decision) but evaluates every rule of every
policy, including dry-run and AUDIT ones, and keeps what each check saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..decision import Decision
from .model import Action, Attributes, AuthorizationPolicy, Clause, FieldCheck, Rule, Target

_ORDER = {Action.DENY: 0, Action.ALLOW: 1, Action.AUDIT: 2}
# Request values an explanation never shows (explanations reach the admin service and logs).
_SECRET_FIELDS = frozenset(
    f"request.headers[{h}]"
    for h in ("authorization", "proxy-authorization", "cookie", "x-forwarded-client-cert")
)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One field check: what the policy asked, what the request had, and whether it held."""

    path: str
    line: int
    passed: bool
    field: str
    values: tuple[str, ...]
    negated: bool
    actual: str

    def describe(self) -> str:
        result = "ok" if self.passed else "FAILED"
        if self.field == "cel":
            return f"{self.path} (line {self.line}): {result}: {self.values[0]} -> {self.actual}"
        matched = self.passed != self.negated
        verb = "matches" if matched else "does not match"
        name = f"not {self.field}" if self.negated else self.field
        wanted = ", ".join(self.values)
        return f"{self.path} (line {self.line}): {result}: {name}: {self.actual} {verb} [{wanted}]"


@dataclass(frozen=True, slots=True)
class RuleResult:
    """A rule and, when it did not match, the first failing check of each failing part."""

    name: str
    line: int
    matched: bool
    failures: tuple[CheckResult, ...]


@dataclass(frozen=True, slots=True)
class PolicyResult:
    key: str
    action: str
    dry_run: bool
    file: str
    line: int
    matched_rule: str
    rules: tuple[RuleResult, ...]

    @property
    def matched(self) -> bool:
        return bool(self.matched_rule)


def _show(value: Any) -> str:
    if value is None:
        return "<absent>"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return "/".join(value)  # (iss, sub): the request principal
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _check(check: FieldCheck, attrs: Attributes) -> CheckResult:
    if check.field in _SECRET_FIELDS:
        return CheckResult(
            check.path,
            check.line,
            check.test(attrs),
            check.field,
            check.values,
            check.negated,
            "<redacted>",
        )
    try:
        value = check.get(attrs)
        # a CEL condition's getter gives its own account: true, false or the error
        actual = str(value) if check.field == "cel" else _show(value)
    except Exception as exc:  # an explanation must not fail where a decision would not
        actual = f"<error: {exc}>"
    return CheckResult(
        check.path,
        check.line,
        check.test(attrs),
        check.field,
        check.values,
        check.negated,
        actual,
    )


def _first_failure(clause: Clause, attrs: Attributes) -> CheckResult | None:
    for check in clause.checks:
        result = _check(check, attrs)
        if not result.passed:
            return result
    return None


def _any_clause(clauses: tuple[Clause, ...], attrs: Attributes) -> list[CheckResult]:
    """Empty when one of the OR'ed clauses holds, else the first failure of each."""
    failures: list[CheckResult] = []
    for clause in clauses:
        failed = _first_failure(clause, attrs)
        if failed is None:
            return []
        failures.append(failed)
    return failures


def explain_rule(rule: Rule, attrs: Attributes) -> RuleResult:
    failures = [
        *_any_clause(rule.sources, attrs),
        *_any_clause(rule.operations, attrs),
        *(r for c in rule.conditions.checks if not (r := _check(c, attrs)).passed),
    ]
    matched = rule.matches(attrs)
    if matched == bool(failures):
        raise AssertionError(f"explanation of {rule.name} disagrees with the engine")
    return RuleResult(rule.name, rule.line, matched, tuple(failures))


def explain_policies(
    policies: Iterable[AuthorizationPolicy], attrs: Attributes
) -> tuple[PolicyResult, ...]:
    """Every policy in Istio's evaluation order (DENY, ALLOW, AUDIT), every rule evaluated."""
    out: list[PolicyResult] = []
    for p in sorted(policies, key=lambda p: _ORDER[p.action]):
        rules = tuple(explain_rule(r, attrs) for r in p.rules)
        matched = next((r.name for r in rules if r.matched), "")
        out.append(PolicyResult(p.key, p.action.value, p.dry_run, p.file, p.line, matched, rules))
    return tuple(out)


def render(results: Iterable[PolicyResult]) -> list[str]:
    """Readable lines: one per policy, one per rule, one per failing check."""
    lines: list[str] = []
    for p in results:
        flags = " (dry-run)" if p.dry_run else ""
        verdict = f"matched {p.matched_rule}" if p.matched else "no rule matched"
        if not p.rules:
            verdict = "has no rules (matches nothing)"
        lines.append(f"{p.action} {p.key}{flags} [{p.file}:{p.line}]: {verdict}")
        for r in p.rules:
            mark = "+" if r.matched else "-"
            lines.append(f"  {mark} {r.name} (line {r.line})")
            lines.extend(f"      {f.describe()}" for f in r.failures)
    return lines


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision and the evaluation behind it (policies empty when identity failed first)."""

    decision: Decision
    namespace: str | None
    labels: str | None
    principal: str
    request_principal: str
    policies: tuple[PolicyResult, ...]
    targets: frozenset[Target] = frozenset()

    def lines(self) -> list[str]:
        d = self.decision
        where = f" ({d.policy} {d.rule})" if d.policy else ""
        out = [
            f"decision: {d.outcome.value.upper()} reason={d.reason}{where}",
            f"workload: namespace={self.namespace or '-'} labels={self.labels or '-'}"
            + "".join(f" {kind.lower()}={name}" for kind, name in sorted(self.targets)),
            f"peer principal: {self.principal or '<none: no mTLS peer>'}",
            f"request principal: {self.request_principal or '<none: no token>'}",
        ]
        if d.dry_run_allowed is not None:
            would = "allow" if d.dry_run_allowed else "deny"
            out.append(f"dry-run: with dry-run policies enforced it would {would}")
        if d.audit:
            out.append(f"audit: {', '.join(d.audit)}")
        if not self.policies:
            out.append(
                f"policies: not evaluated ({d.message})"
                if d.reason not in ("no_allow_policy",)
                else "policies: none apply to this workload"
            )
        out.extend(render(self.policies))
        return out
