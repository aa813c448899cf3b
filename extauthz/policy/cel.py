"""CEL ``when`` conditions: compiled and type-checked at load, evaluated per request.

Library: ``cel-expr-python`` (Google's cel-expr/cel-python, Python bindings of cel-cpp).

Both candidates were measured with ``python -m loadtest.cel_measure`` (CPython 3.11.7,
x86_64, this repo's 2-core machine while other jobs kept both cores busy, so best of 15
rounds). Expression: ``request.method == "GET" && request.path.startsWith("/api/") &&
"admin" in request.auth.claims.groups && source.principal.endsWith("/sa/frontend")`` over a
request with 20 headers, an mTLS principal and a 12-claim token:

=================================  ==========================  ============================
                                   cel-expr-python 0.1.3       common-expression-language
                                                               0.10.0
=================================  ==========================  ============================
import                             2.2 ms                      165-205 ms (its ``__init__``
                                                               imports its CLI: typer, rich,
                                                               pydantic, prompt-toolkit)
compile one expression             148 µs (type-checked);      75 µs (parse only)
                                   ``compile_cel`` 196 µs;
                                   environment 46 µs, once
eval, prebuilt activation          3.9 µs (``CelCondition``    6.1 µs (prebuilt ``Context``);
                                   4.2 µs); values already     31 µs with a 4-field dict
                                   converted by earlier evals
activation from Attributes + eval  33 µs (all 18 variables);   200-210 µs (a dict converts
                                   23 µs (the 4 it reads);     every header and claim on
                                   8.4 µs (without claims)     every call)
``request.methd``                  refused at compile          accepted; KeyError per request
``1 + "a"``                        refused at compile          accepted; TypeError per request
=================================  ==========================  ============================

The field notes (2 µs vs 15 µs) hold for warm evaluation only; the per-request figure is the
"activation + eval" row, because each request is a new activation whose variables the library
converts on first use (the claims map deeply, ~10 µs for the token above).

cel-expr-python is chosen because (1) its compiler type-checks against declared variables,
so a misspelt attribute or a type error is a load-time error with a position, not a
request-time error that silently becomes ``on_error``; (2) it is cel-cpp, the CEL
implementation Envoy itself runs, so the semantics (error absorption in ``&&``/``||``,
heterogeneous numeric equality, string functions) are Envoy's; (3) it is several times
cheaper per request once the activation is included; (4) it has no runtime dependencies,
is Apache-2.0, and has manylinux wheels for CPython 3.11-3.14 on x86_64 and aarch64
(neither candidate has musllinux wheels). Against it: it is young (0.1.x, three releases)
and has no ``py.typed`` marker, so calls into it are kept in this module behind typed
functions and the dependency is pinned below 0.2.

The environment mirrors Envoy's attribute names (see :data:`VARIABLES`), declared as dotted
variables so that the type checker knows each one: ``request.headers`` is
``map(string, string)`` with lower-case keys, ``request.auth.claims`` is
``map(string, dyn)``, ports are ``int``, everything else is a ``string`` that is empty when
absent. Differences from Envoy, all deliberate: ``request.path`` is the path without the
query (Istio's meaning; the query is ``request.query``), ``source.address`` and
``destination.address`` are the IP without the port, ``source.principal`` is Istio's form
(``cluster.local/ns/x/sa/y``, no ``spiffe://``), and ``source.namespace`` (Istio's) and
``request.auth.*`` (the verified JWT) exist. The strings extension (``split``,
``lowerAscii``, ``replace``...) is enabled, e.g. for the space-separated ``scope`` claim.

Limits: ``source.namespace`` is :attr:`SpiffeId.namespace` (the first ``/ns/<x>/``), where
Istio's ``namespaces`` field matches any occurrence; write
``source.principal.matches(".*/ns/x/.*")`` for that reading. An invalid regular expression
in ``matches`` is an evaluation error, not a load error. A header name with an upper-case
letter is refused at load only when written literally (``request.headers["X-A"]``,
``"X-A" in request.headers``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Protocol

from cel_expr_python import cel as _cel  # type: ignore[import-untyped]
from cel_expr_python.ext import ext_strings as _ext_strings  # type: ignore[import-untyped]

from ..identity.spiffe import SpiffeId
from .match import BadValue
from .model import Attributes

# --- the environment --------------------------------------------------------------------

_T: Any = _cel.Type
_STRING_MAP: Any = _T.Map(_T.STRING, _T.STRING)

#: Every variable a CEL condition may use, with its CEL type.
VARIABLES: Mapping[str, Any] = {
    "request.method": _T.STRING,
    "request.host": _T.STRING,
    "request.path": _T.STRING,
    "request.query": _T.STRING,
    "request.headers": _STRING_MAP,
    "request.scheme": _T.STRING,
    "request.protocol": _T.STRING,
    "source.address": _T.STRING,
    "source.port": _T.INT,
    "source.principal": _T.STRING,
    "source.namespace": _T.STRING,
    "destination.address": _T.STRING,
    "destination.port": _T.INT,
    "connection.sni": _T.STRING,
    "request.auth.principal": _T.STRING,
    "request.auth.claims": _T.Map(_T.STRING, _T.DYN),
    "request.auth.audiences": _T.List(_T.STRING),
    "request.auth.presenter": _T.STRING,
}

# The standard library plus the strings extension (split, lowerAscii, replace, join...),
# e.g. for the space-separated ``scope`` claim: "orders:read" in c.scope.split(" ").
_ENV: Any = _cel.NewEnv(variables=dict(VARIABLES), extensions=[_ext_strings.ExtStrings()])


class CelCompiler(Protocol):
    """The seam :func:`compile_cel` compiles through (a ``cel_expr_python`` ``Env``)."""

    def compile(self, expression: str) -> Any: ...


# An opaque cel_expr_python Activation: build it with activation(), hand it back to eval.
Activation = object


# --- activation: the per-request variables ----------------------------------------------

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_dict(m: Mapping[str, Any]) -> dict[str, Any]:
    """A real dict (the library refuses other mappings); a mappingproxy copies in C."""
    if type(m) is dict:
        return m
    if type(m) is MappingProxyType:
        copy = m.copy()
        if type(copy) is dict:
            return copy
    return dict(m)


def _plain(value: Any) -> Any:
    """A JSON-ish value as the types the library accepts: dict, list, 64-bit int...

    Verified claims are JSON, so this is a walk that copies only containers; it runs only
    when a condition reads ``request.auth.claims``.
    """
    t = type(value)
    if t is str or t is bool or t is float or value is None:
        return value
    if t is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        # CEL ints are 64-bit; a larger JSON number is a double, as in Envoy's Struct.
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if t is dict or t is MappingProxyType or isinstance(value, Mapping):
        return {k if type(k) is str else str(k): _plain(v) for k, v in value.items()}
    if t is list or t is tuple or isinstance(value, set | frozenset):
        return [v if type(v) is str else _plain(v) for v in value]
    return value  # bytes are CEL bytes; anything else is an evaluation error when read


def _headers(a: Attributes) -> dict[str, str]:
    return _as_dict(a.inp.headers)


@lru_cache(maxsize=1024)
def _namespace_of(principal: str) -> str:
    trust_domain, slash, path = principal.partition("/")
    return SpiffeId(trust_domain, "/" + path).namespace if slash else ""


def _namespace(a: Attributes) -> str:
    return _namespace_of(a.principal) if a.principal else ""


def _claims(a: Attributes) -> dict[str, Any]:
    return _plain(a.token.claims) if a.token else {}


_GETTERS: Mapping[str, Callable[[Attributes], Any]] = {
    "request.method": lambda a: a.inp.method,
    "request.host": lambda a: a.inp.host,
    "request.path": lambda a: a.inp.path,
    "request.query": lambda a: a.inp.query,
    "request.headers": _headers,
    "request.scheme": lambda a: a.inp.scheme,
    "request.protocol": lambda a: a.inp.protocol,
    "source.address": lambda a: a.inp.source_ip,
    "source.port": lambda a: a.inp.source_port,
    "source.principal": lambda a: a.principal or "",
    "source.namespace": _namespace,
    "destination.address": lambda a: a.inp.destination_ip,
    "destination.port": lambda a: a.inp.destination_port,
    "connection.sni": lambda a: a.inp.sni,
    "request.auth.principal": lambda a: a.token.principal if a.token else "",
    "request.auth.claims": _claims,
    "request.auth.audiences": lambda a: list(a.token.audiences) if a.token else [],
    "request.auth.presenter": lambda a: a.token.presenter if a.token else "",
}
assert _GETTERS.keys() == VARIABLES.keys()


def activation(attrs: Attributes, names: Collection[str] | None = None) -> Activation:
    """The CEL variables of one request, for any number of :class:`CelCondition` calls.

    ``names`` limits it to those variables (the union of the conditions' ``variables``), so
    a request does not pay for headers or claims no condition reads; a variable left out is
    an evaluation error (``on_error``) for a condition that does read it. The library
    converts a variable to CEL on its first use in the activation (a map deeply: ~10 µs for a
    typical token's claims), so an unread variable costs only its getter.
    """
    if names is None:
        return _ENV.Activation({name: get(attrs) for name, get in _GETTERS.items()})
    return _ENV.Activation({name: _GETTERS[name](attrs) for name in names})


# --- compiling --------------------------------------------------------------------------

_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_STATUS_SUFFIX = re.compile(r"\s*\[[A-Z_]+\]\s*$")
_UNDECLARED = re.compile(r"undeclared reference to '([^']+)'")
# A header name with an upper-case letter can never be present (keys are lower-case).
_UPPER_HEADER = (
    re.compile(r"""request\.headers\s*\[\s*(["'])([^"']*[A-Z][^"']*)\1\s*\]"""),
    re.compile(r"""(["'])([^"']*[A-Z][^"']*)\1\s+in\s+request\.headers\b"""),
)


def _error_text(exc: Exception) -> str:
    """The library's message without its status decoration, positions kept (line:column)."""
    text = _STATUS_SUFFIX.sub("", _STATUS_PREFIX.sub("", str(exc).strip()))
    text = text.replace("ERROR: <input>:", "").replace(" (in container '')", "")
    for name in dict.fromkeys(_UNDECLARED.findall(text)):
        hint = difflib.get_close_matches(name, list(VARIABLES), n=1)
        if hint:
            text = text.replace(
                f"reference to '{name}'", f"reference to '{name}' (did you mean '{hint[0]}'?)"
            )
    return text


def _type_name(t: Any) -> str:
    return str(t.name()).lower()


def _variables(program: Any) -> frozenset[str]:
    """The declared variables the checked expression refers to (a superset, never fewer).

    The serialized CheckedExpr's reference map names every variable it resolved; a string
    literal spelling a variable name only adds that variable, which is harmless.
    """
    serialized = bytes(program.serialize())
    return frozenset(n for n in VARIABLES if n.encode() in serialized)


@dataclass(frozen=True, slots=True)
class CelCondition:
    """One compiled CEL expression: call it with a request's :class:`Attributes`.

    Any evaluation error (a missing map key or header, no token, a wrong type at run time,
    a result that is not a bool) answers ``on_error``; it never raises.
    """

    expression: str
    on_error: bool
    variables: frozenset[str]
    _program: Any = field(repr=False)
    _activation_of: Callable[[Attributes], Activation] = field(repr=False)

    def __call__(self, attrs: Attributes) -> bool:
        try:
            value = self._program.eval(self._activation_of(attrs)).value()
        except Exception:
            return self.on_error
        if value is True or value is False:
            return value
        return self.on_error

    def explain(self, attrs: Attributes) -> str:
        """``true``, ``false`` or why the result was ``on_error``: for traces and debugging."""
        try:
            result = self._program.eval(self._activation_of(attrs))
        except Exception as exc:
            return f"error: {exc}"
        value = result.value()
        if value is True or value is False:
            return str(value).lower()
        if result.type() == _T.ERROR:
            return f"error: {value}"
        return f"error: result is {_type_name(result.type())}, not bool"


def compile_cel(
    expr: str,
    *,
    on_error: bool,
    activation_of: Callable[[Attributes], Activation] | None = None,
    compiler: CelCompiler | None = None,
) -> CelCondition:
    """Parse and type-check ``expr`` now; raise :class:`BadValue` if it cannot be a condition.

    ``on_error`` is what an evaluation error answers: pass True for DENY policies and False
    for ALLOW so that both fail closed. ``activation_of`` gets the request's variables; pass
    a per-request cache of :func:`activation` (built with the union of the conditions'
    ``variables``) when several conditions run on one request. By default each call builds
    one with just this condition's variables. ``compiler`` is a seam for tests.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise BadValue("a CEL condition must be a non-empty string")
    for pattern in _UPPER_HEADER:
        upper = pattern.search(expr)
        if upper:
            quote, name = upper.group(1), upper.group(2)
            raise BadValue(
                f"request.headers keys are lower-case: write {quote}{name.lower()}{quote}, "
                f"not {quote}{name}{quote}"
            )
    try:
        program = (compiler or _ENV).compile(expr)
    except Exception as exc:
        raise BadValue(f"CEL expression does not compile: {_error_text(exc)}") from None
    result_type = program.return_type()
    if not (result_type == _T.BOOL or result_type == _T.DYN):
        raise BadValue(
            f"a CEL condition must evaluate to a bool, this one is {_type_name(result_type)}"
        )
    variables = _variables(program)
    if activation_of is None:

        def own_variables(a: Attributes) -> Activation:
            return activation(a, variables)

        activation_of = own_variables
    return CelCondition(expr, on_error, variables, program, activation_of)
