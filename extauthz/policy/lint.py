"""Warnings about policies that load but cannot do what their author meant.

Two kinds, both reported with ``file:line`` by ``extauthz policy lint``:

- **never matches**: a value no request can have (``principals: [spiffe://...]``, Istio
  principals drop the scheme; a path without a leading ``/``; a lower-case method), a field
  and its ``not`` form cancelling out, or a token condition with no RequestAuthentication.
- **shadowed**: every request a rule matches is matched first by another rule, so it never
  decides: an earlier rule of the same policy, or a DENY rule covering an ALLOW rule of the
  same workloads.

Shadowing is proved, not guessed: rule A covers rule B only if each check of A is implied
by a check of B on the same attribute (same or wider values), so a warning is never false;
some real shadowing (CIDR containment, CEL) is not detected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .engine import PolicySet
from .model import Action, AuthorizationPolicy, Clause, FieldCheck, Rule, Scope

# Attributes whose values are Istio string patterns: exact, "prefix*", "*suffix", "*".
_PATTERN_FIELDS = frozenset(
    {
        "paths",
        "hosts",
        "methods",
        "principals",
        "requestPrincipals",
        "source.principal",
        "request.auth.principal",
        "request.auth.presenter",
        "request.auth.audiences",
        "connection.sni",
    }
)
_PRINCIPAL_FIELDS = frozenset({"principals", "source.principal"})
_TOKEN_FIELDS = frozenset(
    {
        "requestPrincipals",
        "request.auth.principal",
        "request.auth.presenter",
        "request.auth.audiences",
    }
)


@dataclass(frozen=True, slots=True)
class LintWarning:
    file: str
    line: int
    policy: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.policy}: {self.message}"


def _is_pattern_field(field: str) -> bool:
    return (
        field in _PATTERN_FIELDS
        or field.startswith("request.headers[")
        or field.startswith("request.auth.claims")
    )


def _covers(field: str, wide: str, narrow: str) -> bool:
    """Every value matching pattern ``narrow`` also matches pattern ``wide``."""
    if field == "hosts":
        wide, narrow = wide.lower(), narrow.lower()
    if wide == narrow:
        return True
    if not _is_pattern_field(field) or "{" in wide:
        return False
    if wide == "*":
        return narrow != ""
    if wide.endswith("*"):
        return narrow.startswith(wide[:-1])
    if wide.startswith("*"):
        return not narrow.endswith("*") and narrow.endswith(wide[1:])
    return False


def _implies(narrow: FieldCheck, wide: FieldCheck) -> bool:
    """Does passing ``narrow`` guarantee passing ``wide``?"""
    if narrow.field != wide.field or narrow.negated != wide.negated or not narrow.values:
        return False
    if narrow.field == "cel":
        return narrow.values == wide.values
    if not narrow.negated:  # narrow's values each fall inside one of wide's
        return all(any(_covers(wide.field, w, n) for w in wide.values) for n in narrow.values)
    # not-forms: excluding more (wider patterns) is stronger
    return all(any(_covers(narrow.field, n, w) for n in narrow.values) for w in wide.values)


def _clause_covers(wide: Clause, narrow: Clause) -> bool:
    return all(any(_implies(n, w) for n in narrow.checks) for w in wide.checks)


def _entries_cover(wide: tuple[Clause, ...], narrow: tuple[Clause, ...]) -> bool:
    if not wide:
        return True
    if not narrow:
        return False
    return all(any(_clause_covers(w, n) for w in wide) for n in narrow)


def rule_covers(wide: Rule, narrow: Rule) -> bool:
    """Every request ``narrow`` matches is matched by ``wide``."""
    return (
        _entries_cover(wide.sources, narrow.sources)
        and _entries_cover(wide.operations, narrow.operations)
        and _clause_covers(wide.conditions, narrow.conditions)
    )


def _scope_covers(wide: Scope, narrow: Scope) -> bool:
    """Every request the ``narrow`` scope selects, the ``wide`` one selects too."""
    if wide.namespace is not None and wide.namespace != narrow.namespace:
        return False
    if wide.targets:
        # A route may name a target without labels, or another target: only the same
        # (or fewer) targets are surely covered.
        return (
            narrow.targets is not None and bool(narrow.targets) and narrow.targets <= wide.targets
        )
    if not wide.match_labels:
        return True
    if narrow.targets:
        return False  # selected by target, whatever the labels
    labels = narrow.match_labels or {}
    return all(labels.get(k) == v for k, v in wide.match_labels.items())


def _checks(rule: Rule) -> Iterator[FieldCheck]:
    for clause in (*rule.sources, *rule.operations, rule.conditions):
        yield from clause.checks


def _never(rule: Rule, has_authn: bool) -> Iterator[tuple[int, str]]:
    """(line, why) for each reason this rule's checks can never hold."""
    for check in _checks(rule):
        name = f"not {check.field}" if check.negated else check.field
        for v in check.values:
            if check.field in _PRINCIPAL_FIELDS and v.startswith("spiffe://"):
                yield (
                    check.line,
                    (
                        f"{check.path}: {v!r} never matches: Istio principals drop 'spiffe://' "
                        f"(write {v.removeprefix('spiffe://')!r})"
                    ),
                )
            elif check.field == "paths" and not v.startswith(("/", "*")):
                yield check.line, f"{check.path}: {v!r} never matches: paths start with '/'"
            elif check.field == "methods" and v != v.upper():
                yield (
                    check.line,
                    (
                        f"{check.path}: {v!r} never matches: methods are case-sensitive "
                        f"(write {v.upper()!r})"
                    ),
                )
            elif check.field == "requestPrincipals" and "/" not in v and "*" not in v:
                yield (
                    check.line,
                    (f"{check.path}: {v!r} never matches: request principals are '<iss>/<sub>'"),
                )
        token = check.field in _TOKEN_FIELDS or check.field.startswith("request.auth.claims")
        if token and not check.negated and not has_authn:
            yield (
                check.line,
                (
                    f"{check.path}: {name} needs a verified token, but no RequestAuthentication "
                    "is loaded, so no request has one"
                ),
            )
    for clause in (*rule.sources, *rule.operations, rule.conditions):
        for pos in clause.checks:
            for neg in clause.checks:
                if (
                    not pos.negated
                    and neg.negated
                    and pos.field == neg.field
                    and all(any(_covers(pos.field, n, p) for n in neg.values) for p in pos.values)
                ):
                    yield (
                        neg.line,
                        (
                            f"{clause.path}: {pos.field} and not {neg.field} exclude each other; "
                            "this never matches"
                        ),
                    )


def lint(policies: PolicySet) -> list[LintWarning]:
    """Every warning for a loaded set, in file order."""
    out: list[LintWarning] = []
    has_authn = bool(policies.authn)
    for p in policies.authz:
        for rule in p.rules:
            for line, why in _never(rule, has_authn):
                out.append(LintWarning(p.file, line, p.key, why))
            for earlier in p.rules[: rule.index]:
                if rule_covers(earlier, rule):
                    out.append(
                        LintWarning(
                            p.file,
                            rule.line,
                            p.key,
                            f"{rule.name} is shadowed by {earlier.name} (line {earlier.line}): "
                            "every request it matches, the earlier rule matches first",
                        )
                    )
                    break
        if p.action is Action.ALLOW:
            out.extend(_denied(p, _deny_policies(policies.authz, p)))
    return sorted(out, key=lambda w: (w.file, w.line))


def _deny_policies(
    all_policies: Iterable[AuthorizationPolicy], allow: AuthorizationPolicy
) -> list[AuthorizationPolicy]:
    return [
        d
        for d in all_policies
        if d.action is Action.DENY and not d.dry_run and _scope_covers(d.scope, allow.scope)
    ]


def _denied(allow: AuthorizationPolicy, denies: list[AuthorizationPolicy]) -> Iterator[LintWarning]:
    for rule in allow.rules:
        for d in denies:
            hit = next((r for r in d.rules if rule_covers(r, rule)), None)
            if hit is not None:
                yield LintWarning(
                    allow.file,
                    rule.line,
                    allow.key,
                    f"{rule.name} never allows: DENY policy {d.key} {hit.name} "
                    f"({d.file}:{hit.line}) matches every request it matches",
                )
                break
