"""``extauthz policy test DIR``: run the ``*.test.yaml`` cases next to the policies, like
``opa test``.

A test file holds ``tests:``, a list of cases; each names a request (see
:mod:`extauthz.probe`) and what to expect::

    tests:
      - name: frontend lists orders
        request: {method: GET, path: /api/orders, namespace: shop, labels: app=orders,
                  principal: spiffe://cluster.local/ns/shop/sa/frontend}
        expect: {decision: allow, policy: shop/orders-from-frontend, rule: "rules[0]"}

``expect`` keys: ``decision`` (allow, deny, unauthenticated, error; required), ``reason``,
``status`` (the HTTP status the client would get), ``policy``, ``rule``, ``dryRun`` (allow or
deny: the verdict with dry-run policies enforced), ``audit`` (list of AUDIT policies) and
``headers`` (upstream headers on allow, client headers on deny, compared by value).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .authorizer import Authorizer
from .config import Settings
from .decision import Decision, Outcome
from .errors import ConfigError, PolicyError
from .identity.mint import SigningKey, TokenMinter
from .policy.engine import PolicySet
from .policy.explain import Explanation
from .policy.source import POLICY_SUFFIXES, Node, load_text, walk
from .probe import parse_probe
from .response import to_check_response

_CASE_KEYS = ("name", "request", "expect")
_EXPECT_KEYS = ("decision", "reason", "status", "policy", "rule", "dryRun", "audit", "headers")
_DECISIONS = {
    "allow": Outcome.ALLOW,
    "deny": Outcome.PERMISSION_DENIED,
    "unauthenticated": Outcome.UNAUTHENTICATED,
    "error": Outcome.ERROR,
}


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    line: int
    name: str
    problems: tuple[str, ...]
    explanation: Explanation | None

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class Report:
    results: list[CaseResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # files that could not be read

    @property
    def passed(self) -> bool:
        return not self.errors and bool(self.results) and all(r.passed for r in self.results)


def case_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in walk(directory)
        if p.suffix in POLICY_SUFFIXES and ".test." in p.name and p.is_file()
    )


def _keys(node: Any, allowed: tuple[str, ...], what: str) -> Node:
    if not isinstance(node, Node):
        raise ConfigError(f"{what} must be a mapping")
    for key in node:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{node.file}:{node.line_of(key)}: {what}: unknown field {key!r}{suggestion}"
            )
    return node


def _answer(d: Decision) -> tuple[int, dict[str, str]]:
    """The HTTP status and headers as Envoy gets them: read from the real CheckResponse, so
    a test asserts what the client (deny) or the upstream (allow) would see."""
    resp = to_check_response(d)
    if d.allowed:
        return 200, {h.header.key: h.header.value for h in resp.ok_response.headers}
    denied = resp.denied_response
    return denied.status.code, {h.header.key: h.header.value for h in denied.headers}


def _compare(expect: Node, d: Decision) -> list[str]:
    problems: list[str] = []

    def differ(key: str, want: Any, got: Any) -> None:
        if want != got:
            problems.append(f"line {expect.line_of(key)}: expected {key} {want!r}, got {got!r}")

    wanted = expect.get("decision")
    if wanted not in _DECISIONS:
        raise ConfigError(
            f"{expect.file}:{expect.line_of('decision')}: expect.decision must be one of "
            f"{', '.join(_DECISIONS)}"
        )
    got_decision = next(k for k, v in _DECISIONS.items() if v is d.outcome)
    differ("decision", wanted, got_decision)
    if "reason" in expect:
        differ("reason", expect["reason"], d.reason)
    if "status" in expect:
        differ("status", expect["status"], _answer(d)[0])
    if "policy" in expect:
        differ("policy", expect["policy"], d.policy)
    if "rule" in expect:
        differ("rule", expect["rule"], d.rule)
    if "dryRun" in expect:
        dry = None if d.dry_run_allowed is None else ("allow" if d.dry_run_allowed else "deny")
        differ("dryRun", expect["dryRun"], dry)
    if "audit" in expect:
        differ("audit", list(expect["audit"] or []), list(d.audit))
    if "headers" in expect:
        want_headers = expect["headers"]
        if not isinstance(want_headers, Mapping):
            raise ConfigError(f"{expect.file}:{expect.line_of('headers')}: must be a map")
        got = _answer(d)[1]
        for name, value in want_headers.items():
            actual = got.get(str(name).lower())
            if value is None:  # `x-foo: null` asserts the header is absent
                if actual is not None:
                    problems.append(f"expected no header {name!r}, got {actual!r}")
            elif actual != value:
                problems.append(f"expected header {name!r} = {value!r}, got {actual!r}")
    return problems


def _cases(path: Path, rel: str) -> Iterator[tuple[Node, str]]:
    for doc in load_text(path.read_text(encoding="utf-8"), rel):
        body = _keys(doc.body, ("tests",), "test file")
        cases = body.get("tests")
        if not isinstance(cases, list):
            raise ConfigError(f"{rel}:{body.line}: 'tests' must be a list of cases")
        for i, case in enumerate(cases):
            case = _keys(case, _CASE_KEYS, f"tests[{i}]")
            name = case.get("name")
            yield case, name if isinstance(name, str) and name else f"tests[{i}]"


def run(directory: Path, *, settings: Settings | None = None, match: str | None = None) -> Report:
    """Load the policies of ``directory`` and run every case of its ``*.test.yaml`` files.

    A policy set that does not load raises :class:`~extauthz.errors.PolicySetError`.
    """
    settings = settings or Settings()
    # Rules that mint a token decide as on a server with a signing key: the cases test the
    # policies, not the server's flags (a throwaway key, so no case depends on a real one).
    minter = TokenMinter(SigningKey.generate(), settings.token_issuer)
    authorizer = Authorizer(
        PolicySet.load(directory, root_namespace=settings.root_namespace),
        settings,
        minter=minter,
    )
    wanted = re.compile(match) if match else None
    report = Report()
    for path in case_files(directory):
        rel = str(path)
        try:
            for case, name in _cases(path, rel):
                if wanted and not wanted.search(name):
                    continue
                if "request" not in case or "expect" not in case:
                    raise ConfigError(f"{rel}:{case.line}: {name}: needs request and expect")
                probe = parse_probe(case["request"])
                expect = _keys(case["expect"], _EXPECT_KEYS, f"{name}: expect")
                explanation = authorizer.explain(probe.input, claims=probe.claims)
                problems = _compare(expect, explanation.decision)
                report.results.append(
                    CaseResult(rel, case.line, name, tuple(problems), explanation)
                )
        except (ConfigError, PolicyError) as exc:
            report.errors.append(exc.message)
        except (OSError, UnicodeDecodeError) as exc:
            report.errors.append(f"{rel}: cannot read: {exc}")
    return report
