"""Compiled policies and the per-request attribute view they are evaluated against.

Everything here is built once at load time by :mod:`extauthz.policy.compile` and is immutable;
a reload builds a new set and swaps it in whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..decision import DenyResponse, Header
from ..identity.jwt import JwtProvider, VerifiedToken
from ..identity.mint import TokenSpec
from ..request import CheckInput, client_ip
from .match import IPAddress, parse_ip


class Action(Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


_UNSET: Any = object()


class Attributes:
    """What a policy can ask about one request, each value computed at most once.

    ``None`` means the attribute is absent (no mTLS peer, no token), which no positive match
    accepts and every ``not`` form does, exactly as Istio's generated Envoy RBAC behaves.
    ``remote_ip`` is Istio's ``remote.ip`` as text; without it, it is the client address
    behind ``trusted_hops`` proxies, worked out only if a policy asks. Slots and hand-made
    lazy values instead of ``functools.cached_property``, which takes a lock per first read.
    """

    __slots__ = (
        "_destination_ip",
        "_port",
        "_remote_ip",
        "_remote_ip_text",
        "_request_principal",
        "_source_ip",
        "_trusted_hops",
        "inp",
        "principal",
        "token",
    )

    def __init__(
        self,
        inp: CheckInput,
        *,
        principal: str | None,
        token: VerifiedToken | None,
        remote_ip: str | None = None,
        trusted_hops: int = 0,
    ) -> None:
        self.inp = inp
        self.principal = principal
        self.token = token
        self._remote_ip_text = remote_ip
        self._trusted_hops = trusted_hops
        # The lazy values start as _UNSET; set here only the one nearly every JWT rule reads.
        self._request_principal: Any = _UNSET

    @property
    def headers(self) -> Mapping[str, str]:
        return self.inp.headers

    @property
    def request_principal(self) -> tuple[str, str] | None:
        value = self._request_principal
        if value is _UNSET:
            token = self.token
            value = self._request_principal = (token.issuer, token.subject) if token else None
        return value  # type: ignore[no-any-return]

    @property
    def claims(self) -> Mapping[str, Any] | None:
        return self.token.claims if self.token else None

    @property
    def source_ip(self) -> IPAddress | None:
        value = getattr(self, "_source_ip", _UNSET)  # a slot never set: computed on first read
        if value is _UNSET:
            value = self._source_ip = parse_ip(self.inp.source_ip)
        return value  # type: ignore[no-any-return]

    @property
    def remote_ip(self) -> IPAddress | None:
        value = getattr(self, "_remote_ip", _UNSET)  # a slot never set: computed on first read
        if value is _UNSET:
            text = self._remote_ip_text
            if text is None:
                text = client_ip(self.inp, self._trusted_hops)
            value = self._remote_ip = parse_ip(text)
        return value  # type: ignore[no-any-return]

    @property
    def destination_ip(self) -> IPAddress | None:
        value = getattr(self, "_destination_ip", _UNSET)  # a slot never set: computed on first read
        if value is _UNSET:
            value = self._destination_ip = parse_ip(self.inp.destination_ip)
        return value  # type: ignore[no-any-return]

    @property
    def port(self) -> str | None:
        value = getattr(self, "_port", _UNSET)  # a slot never set: computed on first read
        if value is _UNSET:
            port = self.inp.destination_port
            value = self._port = str(port) if port else None
        return value  # type: ignore[no-any-return]


Test = Callable[[Attributes], bool]
Getter = Callable[[Attributes], Any]


def _absent(attrs: Attributes) -> Any:
    return None


def _always(attrs: Attributes) -> bool:
    return True


def _never(attrs: Attributes) -> bool:
    return False


def every(tests: tuple[Test, ...]) -> Test:
    """AND of ``tests`` as one function: a call per test, no generator (~0.3 µs each)."""
    if not tests:
        return _always
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda a: first(a) and second(a)

    def all_of(attrs: Attributes) -> bool:
        for test in tests:  # noqa: SIM110 (all() over a generator costs more)
            if not test(attrs):
                return False
        return True

    return all_of


def either(tests: tuple[Test, ...]) -> Test:
    """OR of ``tests`` as one function (none: nothing matches, as ``any(())``)."""
    if not tests:
        return _never
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda a: first(a) or second(a)

    def any_of(attrs: Attributes) -> bool:
        for test in tests:  # noqa: SIM110 (any() over a generator costs more)
            if test(attrs):
                return True
        return False

    return any_of


@dataclass(frozen=True, slots=True)
class FieldCheck:
    """One field of a source, operation or condition, e.g. ``from[0].source.principals``.

    ``test`` is all a decision runs. ``field``, ``values`` and ``negated`` (the policy's words,
    with ``notX`` stored as ``x`` negated) let the index, the linter and explanations reason
    about the check; ``get`` reads the request value an explanation shows.
    """

    path: str
    line: int
    test: Test
    field: str = ""
    values: tuple[str, ...] = ()
    negated: bool = False
    get: Getter = _absent


@dataclass(frozen=True, slots=True)
class Clause:
    """One ``source``, ``operation`` or ``when`` entry: all of its field checks must hold."""

    path: str
    checks: tuple[FieldCheck, ...]
    # all() of the checks as one function, built here so that evaluation calls no generator
    test: Test = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "test", every(tuple(c.test for c in self.checks)))

    def holds(self, attrs: Attributes) -> bool:
        return self.test(attrs)


@dataclass(frozen=True, slots=True)
class Rule:
    """``from`` entries OR'ed, ``to`` entries OR'ed, ``when`` conditions AND'ed; all AND'ed.

    ``headers`` and ``token`` (``extauthz.io`` extensions, ALLOW only): the headers and the
    minted token that go upstream when this rule allows.
    """

    index: int
    line: int
    sources: tuple[Clause, ...]
    operations: tuple[Clause, ...]
    conditions: Clause
    headers: tuple[Header, ...] = ()
    token: TokenSpec | None = None
    name: str = field(init=False, compare=False)
    # The whole rule as one function of nested and/or closures, built at load.
    test: Test = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"rules[{self.index}]")
        parts = []
        if self.sources:
            parts.append(either(tuple(c.test for c in self.sources)))
        if self.operations:
            parts.append(either(tuple(c.test for c in self.operations)))
        if self.conditions.checks:
            parts.append(self.conditions.test)
        object.__setattr__(self, "test", every(tuple(parts)))

    def matches(self, attrs: Attributes) -> bool:
        return self.test(attrs)


Target = tuple[str, str]  # ("Service" | "Gateway", name)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which workloads a resource applies to: namespace (None = every one), and either a
    label selector or ``targetRefs`` (Services/ServiceEntries and Gateways, by name)."""

    namespace: str | None
    match_labels: Mapping[str, str] | None
    targets: frozenset[Target] | None = None

    def applies_to(
        self,
        namespace: str | None,
        labels: Mapping[str, str] | None,
        targets: frozenset[Target] = frozenset(),
    ) -> bool:
        if self.namespace is not None and self.namespace != namespace:
            return False
        if self.targets:
            return bool(self.targets & targets)
        if not self.match_labels:
            return True
        return labels is not None and all(labels.get(k) == v for k, v in self.match_labels.items())


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str | None
    scope: Scope
    action: Action
    rules: tuple[Rule, ...]
    dry_run: bool
    file: str
    line: int
    deny_response: DenyResponse | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def first_match(self, attrs: Attributes) -> Rule | None:
        for rule in self.rules:
            if rule.test(attrs):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    name: str
    namespace: str | None
    scope: Scope
    providers: tuple[JwtProvider, ...]
    file: str
    line: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True)
class PolicySource:
    """What one load read: for logs, health and the policy revision."""

    files: tuple[str, ...]
    revision: str
    warnings: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()  # other files read (jwksUri): a reload watches them
