"""Per-decision Python time: CheckRequest bytes → decode → decide → encode → bytes.

No gRPC and no network: this is the part of a Check that is extauthz's own code (the gRPC
runtime adds ~130 µs of CPU per call on a 2-core machine, see shared field notes). Requests
are realistic: an mTLS principal, ~20 headers, and for the JWT cases an ES256 Bearer token
against the example policies, once as a hot token (a verified-token cache hit) and once with
the cache off (a full ES256 verification on every call).

    python -m loadtest.micro [--rounds 7] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from extauthz.authorizer import Authorizer
from extauthz.devtools.idp import DevIdP
from extauthz.devtools.mesh import EXAMPLE_POLICIES, ISSUER, JWKS_FILE
from extauthz.policy.engine import PolicySet
from extauthz.request import from_check_request
from extauthz.response import encode_check_response


def browser_headers(authority: str, method: str, path: str) -> dict[str, str]:
    """The 20 headers a browser request carries through Envoy (shared by the benchmarks)."""
    return {
        ":authority": authority,
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "user-agent": "Mozilla/5.0 (X11; Linux x86_64) bench",
        "accept": "application/json",
        "accept-encoding": "gzip, deflate, br",
        "accept-language": "en-GB,en;q=0.9",
        "x-request-id": "7d9c8f3e-1b2a-4c5d-9e8f-0a1b2c3d4e5f",
        "x-forwarded-proto": "https",
        "x-forwarded-for": "10.1.2.3",
        "x-envoy-expected-rq-timeout-ms": "15000",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "content-type": "application/json",
        "cache-control": "no-cache",
        "x-b3-sampled": "1",
        "cookie": "session=abc123; theme=dark",
        "origin": "https://shop.example",
        "referer": "https://shop.example/cart",
    }


def _request(principal: str, app: str, method: str, path: str, token: str | None) -> bytes:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.principal = f"spiffe://demo.local/ns/shop/sa/{principal}"
    a.source.address.socket_address.address = "10.1.2.3"
    a.source.address.socket_address.port_value = 41234
    a.destination.address.socket_address.address = "10.1.2.4"
    a.destination.address.socket_address.port_value = 8443
    a.context_extensions["namespace"] = "shop"
    a.context_extensions["labels"] = f"app={app}"
    http = a.request.http
    http.method, http.host, http.path, http.protocol = method, f"{app}.shop", path, "HTTP/1.1"
    headers = browser_headers(f"{app}.shop", method, path)
    if token:
        headers["authorization"] = f"Bearer {token}"
    http.headers.update(headers)
    return req.SerializeToString()


def _once(authorizer: Authorizer, raw: bytes) -> bytes:
    req = external_auth_pb2.CheckRequest.FromString(raw)
    decision = authorizer.check(from_check_request(req))
    return encode_check_response(decision)


def _measure(fn: Callable[[], object], n: int, rounds: int) -> list[float]:
    per_call: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter_ns() - start) / n / 1000)
    return per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    idp = DevIdP.create(ISSUER)
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        shutil.copytree(EXAMPLE_POLICIES, policies)
        (policies / JWKS_FILE).write_text(idp.jwks())
        authorizer = Authorizer(PolicySet.load(policies))
        cold = Authorizer(PolicySet.load(policies))
    # The token cache of the orders workload's verifier, off: every call verifies.
    cold.policies.for_workload("shop", "app=orders").verifier.cache.max_entries = 0
    token = idp.token("alice", audience="shop", ttl=3600)
    # name -> (request, expected CheckResponse.status.code): a case that answers otherwise
    # would time the wrong path, so it stops the run.
    cases: dict[str, tuple[Authorizer, bytes, int]] = {
        "allow, no token (orders -> payments)": (
            authorizer,
            _request("orders", "payments", "POST", "/payments/charge", None),
            0,
        ),
        "deny, no token (frontend -> payments)": (
            authorizer,
            _request("frontend", "payments", "POST", "/payments/charge", None),
            7,
        ),
        "allow, ES256 JWT, token cache hit (frontend -> orders)": (
            authorizer,
            _request("frontend", "orders", "GET", "/orders/42?expand=items", token),
            0,
        ),
        "allow, ES256 JWT verified, cache off": (
            cold,
            _request("frontend", "orders", "GET", "/orders/42?expand=items", token),
            0,
        ),
    }
    results = {}
    print(f"{'case':<55} {'median µs':>10} {'min µs':>8}")
    for name, (auth, raw, expected) in cases.items():
        code = external_auth_pb2.CheckResponse.FromString(_once(auth, raw)).status.code
        if code != expected:
            raise SystemExit(f"{name}: expected status {expected}, got {code}")
        samples = _measure(lambda a=auth, raw=raw: _once(a, raw), args.n, args.rounds)
        results[name] = {"median_us": statistics.median(samples), "min_us": min(samples)}
        print(f"{name:<55} {statistics.median(samples):>10.1f} {min(samples):>8.1f}")
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"({args.rounds} rounds x {args.n} calls; {machine})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
