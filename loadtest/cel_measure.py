"""Measure the two CEL candidates for ``when`` conditions on this machine.

For ``cel-expr-python`` (cel-cpp bindings) and ``common-expression-language`` (Rust
cel-interpreter bindings): import time (fresh interpreter), compile time, evaluation over a
prebuilt activation, evaluation including building the activation from an
:class:`~extauthz.policy.model.Attributes`, and whether the compiler rejects ``request.methd``
and ``1 + "a"``. The request is realistic: 20 headers, an mTLS principal and a 12-claim token.
Results are checked for correctness before anything is timed; times are the best round.

    python -m loadtest.cel_measure [--rounds 7] [--n 5000]

A library that is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from extauthz.identity.jwt import JwtProvider, TokenLocation, VerifiedToken
from extauthz.policy.model import Attributes
from extauthz.request import CheckInput
from loadtest.micro import browser_headers

EXPRESSION = (
    'request.method == "GET" && request.path.startsWith("/api/") && '
    '"admin" in request.auth.claims.groups && source.principal.endsWith("/sa/frontend")'
)
NO_CLAIMS = 'request.method == "GET" && source.principal.endsWith("/sa/frontend")'
TYPO = 'request.methd == "GET"'
TYPE_ERROR = '1 + "a"'

HEADERS = {
    **browser_headers("orders.shop", "GET", "/api/orders/42?expand=items"),
    "authorization": "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
}
CLAIMS = {
    "iss": "https://idp.example",
    "sub": "alice",
    "aud": ["shop"],
    "azp": "web",
    "exp": 1_900_000_000,
    "iat": 1_800_000_000,
    "nbf": 1_800_000_000,
    "jti": "b7e0c1d2",
    "email": "alice@example.com",
    "scope": "openid profile orders:read",
    "groups": ["dev", "admin"],
    "realm_access": {"roles": ["offline_access", "uma_authorization"]},
}


def attributes(*, method: str = "GET", token: bool = True) -> Attributes:
    provider = JwtProvider(issuer="https://idp.example", audiences=frozenset({"shop"}), keys=())
    verified = VerifiedToken(
        issuer="https://idp.example",
        subject="alice",
        audiences=("shop",),
        presenter="web",
        claims=MappingProxyType(dict(CLAIMS)),
        provider=provider,
        location=TokenLocation("header", "authorization", "Bearer "),
        payload_segment="",
    )
    inp = CheckInput(
        method=method,
        host="orders.shop",
        path="/api/orders/42",
        query="expand=items",
        scheme="https",
        protocol="HTTP/1.1",
        headers=MappingProxyType(dict(HEADERS)),
        source_ip="10.1.2.3",
        source_port=41234,
        destination_ip="10.1.2.4",
        destination_port=8443,
    )
    return Attributes(
        inp,
        principal="cluster.local/ns/shop/sa/frontend",
        token=verified if token else None,
        remote_ip="10.1.2.3",
    )


def _per_call_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter_ns() - start) / n / 1000)
    return min(samples)  # the least disturbed round: other processes only ever add time


def _import_ms(module: str, runs: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(runs)
    ]
    return statistics.median(times) * 1000


def _rejects(compile_: Callable[[str], Any], expr: str) -> str:
    try:
        compile_(expr)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0]
        return f"refused ({first[:40]}...)" if len(first) > 40 else f"refused ({first})"
    return "accepted"


# --- cel-expr-python, through extauthz.policy.cel (the real code) ------------------------


def measure_cel_expr_python(n: int, rounds: int) -> dict[str, str]:
    from cel_expr_python import cel  # type: ignore[import-untyped]
    from cel_expr_python.ext import ext_strings  # type: ignore[import-untyped]

    from extauthz.policy.cel import VARIABLES, activation, compile_cel

    def new_env() -> Any:
        return cel.NewEnv(variables=dict(VARIABLES), extensions=[ext_strings.ExtStrings()])

    env_us = _per_call_us(new_env, 5, 3)
    env = new_env()
    raw_compile_us = _per_call_us(lambda: env.compile(EXPRESSION), max(n // 50, 20), rounds)
    compile_us = _per_call_us(
        lambda: compile_cel(EXPRESSION, on_error=False), max(n // 50, 20), rounds
    )
    yes, no_method, no_token = attributes(), attributes(method="POST"), attributes(token=False)
    used = compile_cel(EXPRESSION, on_error=False)  # builds an activation of what it reads
    results = (used(yes), used(no_method), used(no_token))
    if results != (True, False, False):
        raise SystemExit(f"cel-expr-python: wrong results {results}")
    act = activation(yes)
    program = env.compile(EXPRESSION)
    prebuilt_raw = _per_call_us(lambda: program.eval(act).value(), n, rounds)
    prebuilt = compile_cel(EXPRESSION, on_error=False, activation_of=lambda a: act)
    prebuilt_us = _per_call_us(lambda: prebuilt(yes), n, rounds)
    every = compile_cel(EXPRESSION, on_error=False, activation_of=activation)
    all_us = _per_call_us(lambda: every(yes), n, rounds)
    used_us = _per_call_us(lambda: used(yes), n, rounds)
    no_claims = compile_cel(NO_CLAIMS, on_error=False)
    no_claims_us = _per_call_us(lambda: no_claims(yes), n, rounds)
    activation_us = _per_call_us(lambda: activation(yes), n, rounds)
    return {
        "import": f"{_import_ms('cel_expr_python.cel'):.1f} ms",
        "compile": (
            f"{raw_compile_us:.0f} µs checked; compile_cel {compile_us:.0f} µs; env {env_us:.0f} µs"
        ),
        "eval, prebuilt activation": (
            f"{prebuilt_raw:.1f} µs; CelCondition {prebuilt_us:.1f} µs (warm: converted once)"
        ),
        "activation alone, all variables": f"{activation_us:.1f} µs",
        "activation + eval, all variables": f"{all_us:.1f} µs",
        "activation + eval, used variables": f"{used_us:.1f} µs",
        "  same, expression without claims": f"{no_claims_us:.1f} µs",
        "request.methd at compile": _rejects(env.compile, TYPO),
        '1 + "a" at compile': _rejects(env.compile, TYPE_ERROR),
        "true / false / no token": "/".join(str(r).lower() for r in results),
    }


# --- common-expression-language ------------------------------------------------------------


def _nested(a: Attributes) -> dict[str, Any]:
    """The same variables as nested maps, the shape this library wants."""
    inp, token = a.inp, a.token
    principal = a.principal or ""
    return {
        "request": {
            "method": inp.method,
            "host": inp.host,
            "path": inp.path,
            "query": inp.query,
            "headers": dict(inp.headers),
            "scheme": inp.scheme,
            "protocol": inp.protocol,
            "auth": {
                "principal": token.principal if token else "",
                "claims": dict(token.claims) if token else {},
                "audiences": list(token.audiences) if token else [],
                "presenter": token.presenter if token else "",
            },
        },
        "source": {
            "address": inp.source_ip,
            "port": inp.source_port,
            "principal": principal,
            "namespace": principal.split("/ns/")[1].split("/")[0] if "/ns/" in principal else "",
        },
        "destination": {"address": inp.destination_ip, "port": inp.destination_port},
        "connection": {"sni": inp.sni},
    }


def measure_common_expression_language(n: int, rounds: int) -> dict[str, str]:
    import cel

    compile_us = _per_call_us(lambda: cel.compile(EXPRESSION), max(n // 50, 20), rounds)
    program = cel.compile(EXPRESSION)

    def run(a: Attributes) -> bool:
        try:
            return program.execute(_nested(a)) is True
        except Exception:
            return False

    yes, no_method, no_token = attributes(), attributes(method="POST"), attributes(token=False)
    results = (run(yes), run(no_method), run(no_token))
    if results != (True, False, False):
        raise SystemExit(f"common-expression-language: wrong results {results}")
    context = cel.Context(_nested(yes))
    prebuilt = _per_call_us(lambda: program.execute(context), n, rounds)
    small: dict[str, Any] = {
        "request": {
            "method": "GET",
            "path": "/api/orders/42",
            "auth": {"claims": {"groups": ["dev", "admin"]}},
        },
        "source": {"principal": "cluster.local/ns/shop/sa/frontend"},
    }
    prebuilt_small = _per_call_us(lambda: program.execute(small), n, rounds)
    slow_n = max(n // 20, 50)
    all_vars = _per_call_us(lambda: program.execute(_nested(yes)), slow_n, rounds)
    top = set(program.variables())

    def used_only() -> Any:
        return program.execute({k: v for k, v in _nested(yes).items() if k in top})

    used = _per_call_us(used_only, slow_n, rounds)
    context_us = _per_call_us(lambda: cel.Context(_nested(yes)), slow_n, rounds)
    return {
        "import": f"{_import_ms('cel'):.1f} ms",
        "compile": f"{compile_us:.0f} µs (parse only)",
        "eval, prebuilt activation": (
            f"{prebuilt:.1f} µs (Context); {prebuilt_small:.1f} µs (4-field dict)"
        ),
        "activation alone, all variables": f"{context_us:.1f} µs (Context)",
        "activation + eval, all variables": f"{all_vars:.1f} µs (dict)",
        "activation + eval, used variables": f"{used:.1f} µs (dict, top-level names only)",
        "request.methd at compile": _rejects(cel.compile, TYPO),
        '1 + "a" at compile': _rejects(cel.compile, TYPE_ERROR),
        "true / false / no token": "/".join(str(r).lower() for r in results),
    }


CANDIDATES: dict[str, Callable[[int, int], dict[str, str]]] = {
    "cel-expr-python": measure_cel_expr_python,
    "common-expression-language": measure_common_expression_language,
}


def _installed(distribution: str) -> bool:
    # By distribution, not module: xds-protos also ships a top-level ``cel`` package (the CEL
    # protos), so ``import cel`` succeeds without common-expression-language.
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    columns: dict[str, dict[str, str]] = {}
    for name, measure in CANDIDATES.items():
        if not _installed(name):
            print(f"{name}: not installed (pip install {name}); skipped")
            continue
        columns[name] = measure(args.n, args.rounds)
    if not columns:
        raise SystemExit("neither candidate is installed")
    rows = list(next(iter(columns.values())))
    width = max(len(r) for r in rows)
    widths = {c: max(len(c), *(len(v) for v in columns[c].values())) for c in columns}
    print(f"{'':<{width}}  " + "  ".join(f"{c:<{widths[c]}}" for c in columns))
    for row in rows:
        print(
            f"{row:<{width}}  "
            + "  ".join(f"{columns[c].get(row, '-'):<{widths[c]}}" for c in columns)
        )
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"(best of {args.rounds} rounds; import: median of 5 fresh interpreters)")
    print(f"(expression: {EXPRESSION})")
    print(f"({machine})")


if __name__ == "__main__":
    main()
