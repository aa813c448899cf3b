"""Soak: a real ``extauthz serve`` at a fixed request rate, watching memory and open files.

Every bound extauthz keeps is pushed past its limit on purpose: more distinct tokens than the
verified-token cache holds (10,000), more distinct workloads than the policy memo holds
(4,096), a refused token now and then. A warm-up fills the caches first, so that what is
measured afterwards is growth, not filling: RSS and open file descriptors of the server
process are sampled every few seconds.

    python -m loadtest.soak [--seconds 600] [--rate 400] [--json out.json]

``make soak`` runs the 10-minute version; ``tests/test_soak.py`` a short one in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz.devtools.envoy import free_port
from extauthz.devtools.mesh import wait_serving

ISSUER = "https://idp.soak"
TOKENS = 12_000  # more than the verified-token cache's 10,000
WORKLOADS = 5_000  # more than the policy memo's 4,096

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: idp}
spec:
  jwtRules:
  - issuer: %(issuer)s
    jwks: '%(jwks)s'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: users}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["%(issuer)s/*"]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
"""


def _proc_stats(pid: int) -> tuple[int, int]:
    """RSS in KiB and the number of open file descriptors of ``pid`` (Linux /proc)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _request(token: str, namespace: str) -> Any:
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    http = attrs.request.http
    http.method, http.host, http.path = "GET", "orders", "/api/orders/1"
    http.headers["authorization"] = f"Bearer {token}"
    http.headers["user-agent"] = "soak"
    attrs.source.principal = "spiffe://soak.local/ns/a/sa/client"
    attrs.context_extensions["namespace"] = namespace
    return req


async def _drive(
    target: str, requests: list[Any], rate: float, seconds: float, counts: dict[str, int]
) -> None:
    """Send at ``rate`` per second for ``seconds`` (open loop: late sends are not skipped),
    with at most 128 in flight, as an Envoy's connection pool would: thousands of streams at
    once overflow gRPC's pending-call limits (1000), which cancel the excess."""
    slots = asyncio.Semaphore(128)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        start = time.monotonic()
        pending: set[asyncio.Task[Any]] = set()
        i = 0

        async def one(req: Any) -> None:
            try:
                async with slots:
                    resp = await stub.Check(req, timeout=10)
                key = "allow" if resp.status.code == 0 else f"code_{resp.status.code}"
            except grpc.aio.AioRpcError as exc:
                key = f"rpc_{exc.code().name}"
            counts[key] = counts.get(key, 0) + 1

        while (now := time.monotonic() - start) < seconds:
            due = int(now * rate)
            while i < due:
                task = asyncio.create_task(one(requests[i % len(requests)]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)


def run(seconds: float, rate: float, sample_every: float) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256")
    exp = int(time.time()) + 86_400
    tokens = [
        jwt.encode({"iss": ISSUER, "sub": f"user-{i}", "exp": exp}, key, "ES256", {"kid": "k1"})
        for i in range(TOKENS)
    ]
    tokens.insert(0, "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.bad")  # refused, never cached
    namespaces = [f"ns-{i}" for i in range(WORKLOADS)]
    with tempfile.TemporaryDirectory(prefix="extauthz-soak-") as tmp:
        policies = Path(tmp, "policies")
        policies.mkdir()
        (policies / "p.yaml").write_text(
            POLICIES % {"issuer": ISSUER, "jwks": json.dumps({"keys": [jwk]})}
        )
        target = f"127.0.0.1:{free_port()}"
        log_path = Path(tmp, "extauthz.log")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "extauthz",
                    "serve",
                    "--listen",
                    target,
                    "--policies",
                    str(policies),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"},
            )
        try:
            wait_serving(target, proc, log_path)
            warm_counts: dict[str, int] = {}
            counts: dict[str, int] = {}  # the measured phase only
            # Warm-up: every token and workload once, so the caches are full before measuring.
            warm = [_request(t, namespaces[i % WORKLOADS]) for i, t in enumerate(tokens)]
            asyncio.run(
                _drive(target, warm, rate=2000, seconds=len(warm) / 2000, counts=warm_counts)
            )
            pick = random.Random(11)  # noqa: S311 - the load's shape, not a secret
            requests = [
                _request(pick.choice(tokens), pick.choice(namespaces)) for _ in range(20_000)
            ]
            samples: list[tuple[float, int, int]] = []
            started = time.monotonic()

            async def sampled() -> None:
                driver = asyncio.create_task(_drive(target, requests, rate, seconds, counts))
                while not driver.done():
                    rss, fds = _proc_stats(proc.pid)
                    samples.append((round(time.monotonic() - started, 1), rss, fds))
                    await asyncio.wait({driver}, timeout=sample_every)
                await driver
                rss, fds = _proc_stats(proc.pid)
                samples.append((round(time.monotonic() - started, 1), rss, fds))

            asyncio.run(sampled())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    first, last = samples[0], samples[-1]
    return {
        "seconds": seconds,
        "rate": rate,
        "answers": counts,
        "warm_up_answers": warm_counts,
        "rss_kib_start": first[1],
        "rss_kib_end": last[1],
        "rss_kib_max": max(s[1] for s in samples),
        "fds_start": first[2],
        "fds_end": last[2],
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--rate", type=float, default=400)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = run(args.seconds, args.rate, args.sample_every)
    growth = result["rss_kib_end"] - result["rss_kib_start"]
    print(
        f"{args.seconds:.0f} s at {args.rate:.0f}/s after warm-up: answers {result['answers']}; "
        f"RSS {result['rss_kib_start'] / 1024:.1f} -> {result['rss_kib_end'] / 1024:.1f} MiB "
        f"({growth / 1024:+.1f} MiB, max {result['rss_kib_max'] / 1024:.1f}); "
        f"open files {result['fds_start']} -> {result['fds_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
