"""CEL ``when`` conditions: the attribute environment, compile errors and fail-closed errors."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from cel_expr_python import cel as celib  # type: ignore[import-untyped]

from extauthz.identity.jwt import JwtProvider, TokenLocation, VerifiedToken
from extauthz.policy.cel import VARIABLES, Activation, activation, compile_cel
from extauthz.policy.match import BadValue
from extauthz.policy.model import Attributes, Clause, FieldCheck
from extauthz.request import CheckInput

CLAIMS: dict[str, Any] = {
    "iss": "https://idp.example",
    "sub": "alice",
    "aud": ["shop", "admin-ui"],
    "azp": "web",
    "exp": 1_900_000_000,
    "ratio": 0.5,
    "email": "alice@example.com",
    "email_verified": True,
    "scope": "openid orders:read orders:write",
    "groups": ["dev", "admin"],
    "realm_access": {"roles": ["offline_access", "ops"]},
    "org": {"team": {"name": "payments", "ids": [7, 9]}},
    "nothing": None,
}


def token(claims: dict[str, Any] | None = None) -> VerifiedToken:
    return VerifiedToken(
        issuer="https://idp.example",
        subject="alice",
        audiences=("shop", "admin-ui"),
        presenter="web",
        claims=MappingProxyType(CLAIMS if claims is None else claims),
        provider=JwtProvider(issuer="https://idp.example", audiences=frozenset(), keys=()),
        location=TokenLocation("header", "authorization", "Bearer "),
        payload_segment="",
    )


def attrs(
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    principal: str | None = "cluster.local/ns/ns2/sa/client",
    tok: VerifiedToken | None = None,
    with_token: bool = True,
) -> Attributes:
    inp = CheckInput(
        method=method,
        host="orders.shop",
        path="/api/orders/42",
        query="expand=items",
        scheme="https",
        protocol="HTTP/1.1",
        headers=MappingProxyType(
            {"x-tenant": "acme", "user-agent": "curl/8"} if headers is None else headers
        ),
        source_ip="10.0.0.1",
        source_port=41234,
        destination_ip="10.0.0.2",
        destination_port=8443,
        sni="orders.shop",
    )
    return Attributes(
        inp,
        principal=principal,
        token=(tok or token()) if with_token else None,
        remote_ip="10.0.0.1",
    )


ATTRS: dict[str, Attributes] = {
    "full": attrs(),
    "post": attrs(method="POST"),
    "no_token": attrs(with_token=False),
    "no_peer": attrs(principal=None),
    "no_headers": attrs(headers={}),
}

CASES: list[tuple[str, str, bool]] = [
    # request
    ('request.method == "GET"', "full", True),
    ('request.method == "GET"', "post", False),
    ('request.method in ["GET", "HEAD"]', "full", True),
    ('request.host == "orders.shop"', "full", True),
    ('request.path == "/api/orders/42"', "full", True),  # no query in the path
    ('request.path.startsWith("/api/") && request.path.endsWith("/42")', "full", True),
    ('request.path.matches("^/api/orders/[0-9]+$")', "full", True),
    ('request.query == "expand=items"', "full", True),
    ('request.scheme == "https" && request.protocol == "HTTP/1.1"', "full", True),
    ('request.headers["x-tenant"] == "acme"', "full", True),
    ('"x-tenant" in request.headers', "full", True),
    ('"x-tenant" in request.headers', "no_headers", False),
    ("size(request.headers) == 0", "no_headers", True),
    # source, destination, connection
    ('source.address == "10.0.0.1" && source.port == 41234', "full", True),
    ('destination.address == "10.0.0.2" && destination.port == 8443', "full", True),
    ("destination.port in [80, 443]", "full", False),
    ('source.principal == "cluster.local/ns/ns2/sa/client"', "full", True),
    ('source.principal.endsWith("/sa/client")', "full", True),
    ('source.principal == ""', "no_peer", True),
    ('source.namespace == "ns2"', "full", True),
    ('source.namespace == ""', "no_peer", True),
    ('connection.sni == "orders.shop"', "full", True),
    # request.auth
    ('request.auth.principal == "https://idp.example/alice"', "full", True),
    ('request.auth.principal == ""', "no_token", True),
    ('"shop" in request.auth.audiences', "full", True),
    ("size(request.auth.audiences) == 0", "no_token", True),
    ('request.auth.presenter == "web"', "full", True),
    ('request.auth.presenter == ""', "no_token", True),
    # claims: scalars, lists, nested maps
    ('"admin" in request.auth.claims.groups', "full", True),
    ('"root" in request.auth.claims.groups', "full", False),
    ('request.auth.claims["email"] == "alice@example.com"', "full", True),
    ("request.auth.claims.email_verified", "full", True),
    ("request.auth.claims.email_verified == true", "full", True),
    ("request.auth.claims.exp > 1800000000", "full", True),
    ("request.auth.claims.ratio == 0.5 && request.auth.claims.ratio < 1", "full", True),
    ("request.auth.claims.nothing == null", "full", True),
    ('request.auth.claims.realm_access.roles.exists(r, r == "ops")', "full", True),
    ('request.auth.claims.org.team.name == "payments"', "full", True),
    ('request.auth.claims["org"]["team"]["name"] == "payments"', "full", True),
    ("9 in request.auth.claims.org.team.ids", "full", True),
    ('"orders:read" in request.auth.claims.scope.split(" ")', "full", True),
    ('"orders" in request.auth.claims.scope.split(" ")', "full", False),
    ("has(request.auth.claims.groups)", "full", True),
    ("has(request.auth.claims.groups)", "no_token", False),
    ("has(request.auth.claims.org.team.name)", "full", True),
    ("!has(request.auth.claims.org.missing)", "full", True),
    ("size(request.auth.claims) == 0", "no_token", True),
    # CEL absorbs an error when the other side of || / && decides
    ('request.auth.claims.missing == "x" || request.method == "GET"', "full", True),
    ('request.auth.claims.missing == "x" && request.method == "POST"', "full", False),
    # a realistic combination
    (
        'request.method == "GET" && request.path.startsWith("/api/") && '
        '"admin" in request.auth.claims.groups && source.principal.endsWith("/sa/client")',
        "full",
        True,
    ),
]


@pytest.mark.parametrize(("expr", "which", "expected"), CASES)
def test_expression_table(expr: str, which: str, expected: bool) -> None:
    for on_error in (False, True):  # none of these errors: on_error must not matter
        condition = compile_cel(expr, on_error=on_error)
        assert condition(ATTRS[which]) is expected, condition.explain(ATTRS[which])
        assert condition.explain(ATTRS[which]) == str(expected).lower()


@pytest.mark.parametrize("which", sorted(ATTRS))
@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_every_variable_is_bound_with_its_declared_type(name: str, which: str) -> None:
    # Evaluating `x == x` errors if x is unbound or its value does not have the declared type.
    assert compile_cel(f"{name} == {name}", on_error=False).explain(ATTRS[which]) == "true"


# --- compile errors -----------------------------------------------------------------------

COMPILE_ERRORS: list[tuple[str, list[str]]] = [
    (
        'request.methd == "GET"',
        [
            "does not compile",
            "1:8: undeclared reference to 'request.methd'",
            "did you mean 'request.method'?",
            '| request.methd == "GET"',
            "| .......^",
        ],
    ),
    ('requst.path == "/"', ["undeclared reference to 'requst.path'", "'request.path'"]),
    ("request == 1", ["undeclared reference to 'request'"]),
    ('remote.ip == "1.2.3.4"', ["undeclared reference to 'remote.ip'"]),
    ('1 + "a"', ["1:3: found no matching overload for '_+_' applied to '(int, string)'"]),
    ("request.path == 1", ["no matching overload for '_==_' applied to '(string, int)'"]),
    ('source.port == "8080"', ["'_==_' applied to '(int, string)'"]),
    ("request.method ==", ["1:18: Syntax error"]),
    ('request.method == "GET" &&', ["Syntax error"]),
    ("request.headers[", ["Syntax error"]),
    ("request.method", ["must evaluate to a bool", "string"]),
    ("source.port + 1", ["must evaluate to a bool", "int"]),
    ("request.headers", ["must evaluate to a bool", "map"]),
    ("request.auth.audiences", ["must evaluate to a bool", "list"]),
    ('request.headers["X-Tenant"] == "acme"', ["lower-case", 'write "x-tenant", not "X-Tenant"']),
    ("request.headers['User-Agent'] == 'x'", ["lower-case", "write 'user-agent'"]),
    ('"X-Tenant" in request.headers', ["lower-case", 'write "x-tenant"']),
    ("", ["non-empty"]),
    ("   ", ["non-empty"]),
]


@pytest.mark.parametrize(("expr", "fragments"), COMPILE_ERRORS)
def test_compile_errors(expr: str, fragments: list[str]) -> None:
    with pytest.raises(BadValue) as info:
        compile_cel(expr, on_error=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "INVALID_ARGUMENT" not in message
    assert "<input>" not in message


def test_every_error_is_reported_with_its_position() -> None:
    with pytest.raises(BadValue) as info:
        compile_cel('reqest.method == "x" && sourc.port == 1', on_error=False)
    message = str(info.value)
    assert "1:7: undeclared reference to 'reqest.method'" in message
    assert "1:30: undeclared reference to 'sourc.port' (did you mean 'source.port'?)" in message


def test_a_dyn_result_compiles_and_must_be_a_bool_at_run_time() -> None:
    # A claim is dyn: the checker cannot know, so the value is checked per request.
    assert compile_cel("request.auth.claims.email_verified", on_error=False)(ATTRS["full"])
    email = compile_cel("request.auth.claims.email", on_error=False)
    assert email(ATTRS["full"]) is False
    assert compile_cel("request.auth.claims.email", on_error=True)(ATTRS["full"]) is True
    assert email.explain(ATTRS["full"]) == "error: result is string, not bool"


# --- evaluation errors answer on_error ----------------------------------------------------

ERRORS: list[tuple[str, str, str]] = [
    # (expression, attributes, what the error is about)
    ('request.headers["x-missing"] == "a"', "full", "x-missing"),
    ('request.headers["x-tenant"] == "acme"', "no_headers", "x-tenant"),
    ('"admin" in request.auth.claims.groups', "no_token", "groups"),
    ('request.auth.claims.org.team.missing == "x"', "full", "missing"),
    ('request.auth.claims.email.startsWith("a")', "no_token", "email"),
    ("request.auth.claims.email > 3", "full", "overload"),  # string > int at run time
    ('request.auth.claims.groups[5] == "x"', "full", "index"),
    ('request.path.matches("(")', "full", "regular expression"),
]


@pytest.mark.parametrize(("expr", "which", "about"), ERRORS)
@pytest.mark.parametrize("on_error", [False, True])
def test_evaluation_errors_answer_on_error(
    expr: str, which: str, about: str, on_error: bool
) -> None:
    condition = compile_cel(expr, on_error=on_error)
    assert condition(ATTRS[which]) is on_error
    # Negating does not flip an error: a DENY written with `!` still fails closed.
    assert compile_cel(f"!({expr})", on_error=on_error)(ATTRS[which]) is on_error
    explanation = condition.explain(ATTRS[which])
    assert explanation.startswith("error: ")
    assert about in explanation.lower()


def test_missing_claims_deny_for_deny_and_do_not_allow_for_allow() -> None:
    expr = 'request.auth.claims.role != "admin"'  # "anyone but admins": an error is not "not admin"
    deny = compile_cel(expr, on_error=True)
    allow = compile_cel(expr, on_error=False)
    assert deny(ATTRS["no_token"]) is True
    assert allow(ATTRS["no_token"]) is False


# --- claim values the library would refuse as they come -----------------------------------


def test_claim_values_are_made_cel_values() -> None:
    claims: dict[str, Any] = {
        "big": 2**70,  # beyond int64: a double, as in Envoy's Struct
        "huge": 10**400,  # beyond double: infinity, not an error for every other claim
        "tup": ("a", "b"),
        "nested": MappingProxyType({"inner": ("x",), 3: "three"}),
        "set": frozenset({"only"}),
        "ok": "yes",
    }
    a = attrs(tok=token(claims))
    for expr in [
        "request.auth.claims.big > 1.0e21",
        'request.auth.claims.huge == double("inf")',
        '"b" in request.auth.claims.tup',
        '"x" in request.auth.claims.nested.inner',
        'request.auth.claims.nested["3"] == "three"',
        'request.auth.claims.set == ["only"]',
        'request.auth.claims.ok == "yes"',
    ]:
        assert compile_cel(expr, on_error=False)(a), expr


# --- variables, activations and no per-request compiling ----------------------------------


def test_variables_lists_what_the_expression_reads() -> None:
    condition = compile_cel(
        'request.method == "GET" && "admin" in request.auth.claims.groups', on_error=False
    )
    assert condition.variables == {"request.method", "request.auth.claims"}
    assert compile_cel("true", on_error=False).variables == frozenset()


def test_a_shared_activation_serves_several_conditions() -> None:
    first = compile_cel('request.headers["x-tenant"] == "acme"', on_error=False)
    second = compile_cel('source.namespace == "ns2"', on_error=False)
    cache: dict[int, Activation] = {}
    names = first.variables | second.variables

    def cached(a: Attributes) -> Activation:
        if id(a) not in cache:
            cache[id(a)] = activation(a, names)
        return cache[id(a)]

    shared = [
        compile_cel(c.expression, on_error=False, activation_of=cached) for c in (first, second)
    ]
    a = attrs()
    assert all(c(a) for c in shared)
    assert len(cache) == 1


def test_a_variable_left_out_of_the_activation_answers_on_error() -> None:
    partial = activation(ATTRS["full"], {"request.method"})
    for on_error in (False, True):
        condition = compile_cel(
            'source.namespace == "ns2"', on_error=on_error, activation_of=lambda a: partial
        )
        assert condition(ATTRS["full"]) is on_error


def test_an_activation_that_fails_answers_on_error() -> None:
    def broken(a: Attributes) -> Activation:
        raise RuntimeError("bug")

    for on_error in (False, True):
        condition = compile_cel("true", on_error=on_error, activation_of=broken)
        assert condition(ATTRS["full"]) is on_error
        assert condition.explain(ATTRS["full"]) == "error: bug"


class CountingCompiler:
    """A real environment behind the compile seam, counting what goes through it."""

    def __init__(self) -> None:
        self.env = celib.NewEnv(variables=dict(VARIABLES))
        self.calls: list[str] = []

    def compile(self, expression: str) -> Any:
        self.calls.append(expression)
        return self.env.compile(expression)


def test_nothing_is_compiled_per_request() -> None:
    compiler = CountingCompiler()
    built: list[Attributes] = []

    def counting_activation(a: Attributes) -> Activation:
        built.append(a)
        return activation(a)

    expr = 'request.method == "GET" && "admin" in request.auth.claims.groups'
    condition = compile_cel(
        expr, on_error=False, activation_of=counting_activation, compiler=compiler
    )
    assert compiler.calls == [expr]
    requests = [attrs(method=m) for m in ("GET", "POST")] * 500
    results = [condition(a) for a in requests]
    assert results == [True, False] * 500
    assert compiler.calls == [expr]  # still only the load-time compile
    assert len(built) == len(requests)


def test_compile_errors_come_through_the_seam() -> None:
    compiler = CountingCompiler()
    with pytest.raises(BadValue, match="undeclared reference"):
        compile_cel("request.nope", on_error=False, compiler=compiler)
    assert compiler.calls == ["request.nope"]


def test_the_condition_is_a_policy_test() -> None:
    test: Callable[[Attributes], bool] = compile_cel('request.method == "GET"', on_error=False)
    clause = Clause("rules[0].when", (FieldCheck("rules[0].when[0]", 1, test),))
    assert clause.holds(ATTRS["full"])
    assert not clause.holds(ATTRS["post"])
