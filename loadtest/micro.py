"""Per-decision Python time: CheckRequest bytes → decode → decide → encode → bytes.

Issue 8's measure: the part of a Check that is extauthz's own code, with no gRPC and no
network. Requests are realistic: an mTLS principal (SPIFFE), 20 browser headers, the example
policies, and for the JWT cases an ES256 Bearer token, once hot (a verified-token cache hit)
and once with the cache off (a full ES256 verification on every call).

Then, per stage, what each adds to the cached-token decision: each row times the pipeline up
to that stage on fresh objects (decode a new message every call, as the server does) and
reports the difference to the row before, so the rows add up to the whole.

``HTTP transport`` rows time the same cases as Envoy's ``http_service`` sends them (``serve
--http-listen``): the request's bytes fed to the listener's connection (httptools), decided,
encoded and recorded (metrics on, no exporter), the answer written to a transport that only
keeps it.

With ``--grpc``, the same requests through a real ``extauthz serve`` (tracing and metrics
off, as ``loadtest.tracing_cost`` measures it): the server's CPU time per Check, of which
the per-decision time above is extauthz's share and the rest is the gRPC runtime's (its
C core, the asyncio loop, grpc.aio's Python layer). ``--uvloop`` adds the same server on
uvloop.

    python -m loadtest.micro [--rounds 7] [--n 2000] [--grpc] [--uvloop] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
from envoy.service.auth.v3 import external_auth_pb2

from extauthz.authorizer import Authorizer
from extauthz.checks import CheckRecorder
from extauthz.decision import Decision
from extauthz.devtools.idp import DevIdP
from extauthz.devtools.mesh import EXAMPLE_POLICIES, ISSUER, JWKS_FILE
from extauthz.httpserver import HttpCheckServer, _Connection, _headers
from extauthz.identity import peer as peer_identity
from extauthz.policy.engine import PolicySet
from extauthz.policy.model import Attributes
from extauthz.request import PEER_HEADER, CheckInput, from_check_request, from_http
from extauthz.response import encode_check_response, encode_http_response
from extauthz.telemetry import Telemetry

CACHED = "allow, ES256 JWT, token cache hit (frontend -> orders)"
AFRESH = "the same, decided afresh (Authorizer(remember=False))"
NO_TOKEN = "allow, no token (orders -> payments)"  # noqa: S105 (a case name)


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
    """What the server does per Check, minus gRPC and telemetry."""
    req = external_auth_pb2.CheckRequest.FromString(raw)
    return encode_check_response(authorizer.check(from_check_request(req)))


def http_request(principal: str, app: str, method: str, path: str, token: str | None) -> bytes:
    """The request Envoy's ``http_service`` sends for :func:`_request`'s (as
    ``envoy/sidecar-http.yaml`` configures it)."""
    headers = {k: v for k, v in browser_headers(f"{app}.shop", method, path).items() if k[0] != ":"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    headers["content-length"] = "0"
    headers[PEER_HEADER] = (
        f"namespace=shop;labels=app={app};src=10.1.2.3:41234;dst=10.1.2.4:8443;"
        f"uri=spiffe://demo.local/ns/shop/sa/{principal}"
    )
    lines = [f"{method} {path} HTTP/1.1", f"host: {app}.shop"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _KeptTransport:
    """A transport that keeps the last answer written (an asyncio.Transport's few methods
    the listener calls)."""

    last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def http_connection(authorizer: Authorizer) -> tuple[Callable[[bytes], None], _KeptTransport]:
    """One listener connection (``feed(request bytes)``) and what it answers."""
    server = HttpCheckServer(CheckRecorder(authorizer, Telemetry(None)), "127.0.0.1:0")
    conn = _Connection(server)
    transport = _KeptTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn.data_received, transport


def _measure(fn: Callable[[], object], n: int, rounds: int) -> list[float]:
    per_call: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        per_call.append((time.perf_counter_ns() - start) / n / 1000)
    return per_call


def _stages(authorizer: Authorizer, raw: bytes) -> list[tuple[str, Callable[[], object]]]:
    """Cumulative pipelines: each one stage longer than the one before."""
    decode = external_auth_pb2.CheckRequest.FromString
    settings = authorizer.settings
    check = authorizer.check

    def identity() -> object:
        inp = from_check_request(decode(raw))
        workload = authorizer.policies.for_workload(*authorizer.workload(inp))
        peer = peer_identity.resolve(inp, trust_xfcc=settings.trust_xfcc)
        return inp, workload, peer, workload.verifier.verify(inp)

    def policy() -> object:
        inp, workload, peer, token = identity()  # type: ignore[misc]
        attrs = Attributes(
            inp,
            principal=peer.principal if peer else None,
            token=token,
            trusted_hops=settings.xff_trusted_hops,
        )
        return workload.evaluate(attrs)

    decide = (
        "decision (the rest of Authorizer.check)",
        lambda: check(from_check_request(decode(raw))),
    )
    if authorizer.remember:  # the policies are not evaluated: the decision is found
        decide = ("decision (a remembered one: key, lookup, new id)", decide[1])
    return [
        ("decode (CheckRequest.FromString)", lambda: decode(raw)),
        ("request model (from_check_request)", lambda: from_check_request(decode(raw))),
        ("identity (workload, peer, token cache hit)", identity),
        *([] if authorizer.remember else [("policy (Attributes, evaluate)", policy)]),
        decide,
        ("encode (encode_check_response)", lambda: _once(authorizer, raw)),
    ]


class _Collect:
    """httptools' callbacks, collecting as the listener's connection does."""

    url = b""
    names: list[bytes]
    values: list[bytes]

    def on_message_begin(self) -> None:
        self.names, self.values = [], []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)


def _http_stages(authorizer: Authorizer, raw: bytes) -> list[tuple[str, Callable[[], object]]]:
    """The HTTP transport's cumulative pipelines, as :func:`_stages` for gRPC."""
    collect = _Collect()
    parser = httptools.HttpRequestParser(collect)
    telemetry = Telemetry(None)

    def parse() -> object:
        parser.feed_data(raw)
        return collect

    def headers() -> dict[str, str]:
        parse()
        found = _headers(collect.names, collect.values)
        assert found is not None
        return found

    def model() -> CheckInput:
        return from_http("GET", collect.url.decode(), headers())

    def decide() -> Decision:
        return authorizer.check_now(model())[0]

    def encode() -> bytes:
        return encode_http_response(decide())

    def record() -> bytes:
        start = time.perf_counter_ns()
        decision = decide()
        answer = encode_http_response(decision)
        telemetry.record(decision, None, start)
        return answer

    feed, _ = http_connection(authorizer)
    return [
        ("parse (httptools, the callbacks collect)", parse),
        ("headers (decoded, lower-cased, one dict)", headers),
        ("request model (from_http)", model),
        ("decision (Authorizer.check_now)", decide),
        ("encode (encode_http_response)", encode),
        ("metrics (Telemetry.record)", record),
        ("the listener's own (handle, write, in-flight count)", lambda: feed(raw)),
    ]


def _grpc(
    cases: dict[str, bytes], policies: Path, rounds: int, n: int, uvloop: bool
) -> dict[str, dict[str, float]]:
    """Server CPU µs per Check, interleaved rounds: ``extauthz serve`` (tracing and metrics
    off) and ``loadtest.bare_grpc`` (the runtime alone), on asyncio and optionally uvloop."""
    import os
    import subprocess
    import sys

    from extauthz.devtools.envoy import free_port
    from extauthz.devtools.mesh import wait_serving
    from loadtest import tracing_cost

    loops = ("asyncio", "uvloop") if uvloop else ("asyncio",)
    env = {
        **os.environ,
        **tracing_cost.BASE_ENV,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing is exported
    }
    out: dict[str, dict[str, float]] = {}
    servers: list[tracing_cost.Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for loop in loops:
                for what in ("extauthz serve", "bare grpc.aio"):
                    port = free_port()
                    if what == "bare grpc.aio":
                        argv = ["-m", "loadtest.bare_grpc", str(port)]
                        argv += ["--uvloop"] if loop == "uvloop" else []
                    else:
                        module = "loadtest.uvloop_serve" if loop == "uvloop" else "extauthz"
                        argv = ["-m", module, "serve", "--listen", f"127.0.0.1:{port}"]
                        argv += ["--policies", str(policies), "--reload-interval", "0"]
                    log = Path(tmp) / f"{what}-{loop}.log"
                    with log.open("wb") as sink:
                        proc = subprocess.Popen(
                            [sys.executable, *argv], stdout=sink, stderr=subprocess.STDOUT, env=env
                        )
                    config = tracing_cost.Config(f"{what}, {loop}", {})
                    servers.append(tracing_cost.Server(config, port, proc, [()] * n))
                    wait_serving(f"127.0.0.1:{port}", proc, log)
            for name, raw in cases.items():
                samples: dict[str, list[float]] = {s.config.name: [] for s in servers}
                for server in servers:  # warm-up
                    asyncio.run(tracing_cost.drive(server, raw, n, 16, 0.2))
                for r in range(rounds):
                    for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                        _, cpu = asyncio.run(tracing_cost.drive(server, raw, n, 16, 0.3))
                        samples[server.config.name].append(cpu)
                for variant, values in samples.items():
                    out[f"{name} [{variant}]"] = {
                        "median_us": statistics.median(values),
                        "min_us": min(values),
                    }
        finally:
            for server in servers:
                server.proc.terminate()
            for server in servers:
                server.proc.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--grpc", action="store_true", help="also the server CPU per Check")
    ap.add_argument("--uvloop", action="store_true", help="with --grpc: also on uvloop")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    idp = DevIdP.create(ISSUER)
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        shutil.copytree(EXAMPLE_POLICIES, policies)
        (policies / JWKS_FILE).write_text(idp.jwks())
        authorizer = Authorizer(PolicySet.load(policies))
        afresh = Authorizer(PolicySet.load(policies), remember=False)
        cold = Authorizer(PolicySet.load(policies), remember=False)
        # The token cache of the orders workload's verifier, off: every call verifies.
        cold.policies.for_workload("shop", "app=orders").verifier.cache.max_entries = 0
        token = idp.token("alice", audience="shop", ttl=3600)
        hit = _request("frontend", "orders", "GET", "/orders/42?expand=items", token)
        no_token = _request("orders", "payments", "POST", "/payments/charge", None)
        # name -> (request, expected CheckResponse.status.code): a case that answers
        # otherwise would time the wrong path, so it stops the run.
        cases: dict[str, tuple[Authorizer, bytes, int]] = {
            NO_TOKEN: (authorizer, no_token, 0),
            "deny, no token (frontend -> payments)": (
                authorizer,
                _request("frontend", "payments", "POST", "/payments/charge", None),
                7,
            ),
            CACHED: (authorizer, hit, 0),
            AFRESH: (afresh, hit, 0),
            "allow, ES256 JWT verified, cache off": (cold, hit, 0),
        }
        results: dict[str, Any] = {}
        print(f"{'case':<55} {'median µs':>10} {'min µs':>8}")
        http_cases = {
            f"HTTP transport: {CACHED}": (
                authorizer,
                http_request("frontend", "orders", "GET", "/orders/42?expand=items", token),
            ),
            f"HTTP transport: {NO_TOKEN}": (
                authorizer,
                http_request("orders", "payments", "POST", "/payments/charge", None),
            ),
        }
        for name, (auth, raw, expected) in cases.items():
            code = external_auth_pb2.CheckResponse.FromString(_once(auth, raw)).status.code
            if code != expected:
                raise SystemExit(f"{name}: expected status {expected}, got {code}")
            samples = _measure(lambda a=auth, raw=raw: _once(a, raw), args.n, args.rounds)
            results[name] = {"median_us": statistics.median(samples), "min_us": min(samples)}
            print(f"{name:<55} {statistics.median(samples):>10.1f} {min(samples):>8.1f}")
        for name, (auth, request) in http_cases.items():
            feed, answered = http_connection(auth)
            feed(request)
            if not answered.last.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"{name}: expected a 200, got {answered.last[:40]!r}")
            samples = _measure(lambda f=feed, r=request: f(r), args.n, args.rounds)
            results[name] = {"median_us": statistics.median(samples), "min_us": min(samples)}
            print(f"{name:<55} {statistics.median(samples):>10.1f} {min(samples):>8.1f}")
        http_hit = http_cases[f"HTTP transport: {CACHED}"][1]
        for name, pipelines in (
            (CACHED, _stages(authorizer, hit)),
            (AFRESH, _stages(afresh, hit)),
            (f"HTTP transport: {CACHED}", _http_stages(authorizer, http_hit)),
        ):
            print(f"\nwhere the time of '{name}' goes (median µs, each stage's own):")
            timings: dict[str, list[float]] = {label: [] for label, _ in pipelines}
            for _ in range(args.rounds):  # interleaved: a busy neighbour slows all alike
                for label, fn in pipelines:
                    timings[label] += _measure(fn, args.n, 1)
            stages: dict[str, float] = {}
            before = 0.0
            for label, samples in timings.items():
                upto = statistics.median(samples)
                stages[label] = upto - before
                print(f"  {label:<53} {upto - before:>10.1f}")
                before = upto
            results[f"stages ({name})"] = stages
        if args.grpc:
            print("\nthrough gRPC: server CPU µs per Check (16 callers, 1 channel, tracing off)")
            print("(bare grpc.aio: a server answering constant bytes, the runtime's own cost)")
            grpc_cases = {CACHED: hit, NO_TOKEN: no_token}
            found = _grpc(grpc_cases, policies, args.rounds, args.n, args.uvloop)
            for name, value in found.items():
                print(f"  {name:<63} {value['median_us']:>10.1f} {value['min_us']:>8.1f}")
            results["grpc server CPU per Check"] = found
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"({args.rounds} rounds x {args.n} calls; {machine})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
