"""What tracing and metrics cost: Check throughput through the real gRPC server.

One ``extauthz serve`` process per configuration, all started once and measured in
interleaved rounds (so a noisy neighbour slows every configuration alike), each round
sending ``--n`` Checks from ``--concurrency`` concurrent callers over one HTTP/2 channel, as
Envoy does. Every Check carries a ``traceparent`` in its gRPC metadata, as Envoy's does with
tracing on; the sampled flag is set on all of them unless the configuration says otherwise.
Spans and metrics go to a local OTLP collector (or, for "collector down", to a closed port).
The medians are reported, with the server's CPU time per Check (from /proc), which a busy
machine disturbs less than throughput.

    python -m loadtest.tracing_cost [--rounds 7] [--n 4000] [--concurrency 16] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from extauthz.devtools.collector import Collector
from extauthz.devtools.envoy import free_port
from extauthz.devtools.mesh import EXAMPLE_POLICIES, wait_serving
from loadtest.micro import _request

CHECK = "/envoy.service.auth.v3.Authorization/Check"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@dataclass(frozen=True)
class Config:
    name: str
    env: Mapping[str, str]
    sampled: float = 1.0  # share of Checks whose traceparent says "sampled" (Envoy's choice)
    dead_collector: bool = False
    args: tuple[str, ...] = ()


CONFIGS = (
    Config("tracing off", {"OTEL_TRACES_EXPORTER": "none"}),
    Config("100% sampling (always_on)", {"OTEL_TRACES_SAMPLER": "always_on"}),
    Config("default sampler, Envoy samples 100%", {}),
    Config("default sampler, Envoy samples 1%", {}, sampled=0.01),
    Config(
        "100% sampling, collector down", {"OTEL_TRACES_SAMPLER": "always_on"}, dead_collector=True
    ),
    Config(
        "metrics only (OTLP)", {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "otlp"}
    ),
    Config(
        "100% sampling + metrics (OTLP, Prometheus)",
        {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_METRICS_EXPORTER": "otlp"},
        args=("--metrics-listen", "127.0.0.1:0"),
    ),
)
OFF, DEAD = CONFIGS[0], CONFIGS[4]
BASE_ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    # The spans of a round's end are exported within --settle, so their CPU is the round's.
    "OTEL_BSP_SCHEDULE_DELAY": "1000",
}
SETTLE = 1.3  # seconds after a round before its CPU time is read


@dataclass
class Server:
    config: Config
    port: int
    proc: subprocess.Popen[bytes]
    metadata: list[tuple[tuple[str, str], ...]]
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """CPU time of the server's threads so far, to the ns (/proc/PID/stat counts in
        10 ms ticks, 5 µs per Check over a round of 2000)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            # A thread that ended meanwhile: its time is lost to both readings.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9


def _metadata(sampled: float, n: int, rng: random.Random) -> list[tuple[tuple[str, str], ...]]:
    out = []
    for i in range(n):
        flags = "01" if rng.random() < sampled else "00"
        span = f"{i + 1:016x}"
        out.append((("traceparent", f"00-{TRACE_ID}-{span}-{flags}"),))
    return out


def start(
    config: Config,
    policies: Path,
    endpoint: str,
    n: int,
    log: Path,
    env: Mapping[str, str],
    *,
    module: str = "extauthz",  # or loadtest.uvloop_serve
) -> Server:
    port = free_port()
    full = {
        **os.environ,
        **BASE_ENV,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        **env,
        **config.env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--policies",
                str(policies),
                "--namespace",
                "shop",
                "--reload-interval",
                "0",
                *config.args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full,
        )
    wait_serving(f"127.0.0.1:{port}", proc, log)
    return Server(config, port, proc, _metadata(config.sampled, n, random.Random(7)))  # noqa: S311 (not a secret)


async def drive(
    server: Server, request: bytes, n: int, concurrency: int, settle: float = SETTLE
) -> tuple[float, float]:
    """Send ``n`` Checks; (Checks per second, server CPU µs per Check)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = channel.unary_unary(CHECK)  # bytes in, bytes out: keep the caller cheap
        for _ in range(50):  # warm the connection and the server's workload cache
            await check(request, metadata=server.metadata[0], timeout=5)
        per_caller = n // concurrency
        metadata = server.metadata

        async def caller(offset: int) -> None:
            for i in range(offset, offset + per_caller):
                await check(request, metadata=metadata[i], timeout=5)

        cpu = server.cpu_seconds()
        start = time.perf_counter()
        await asyncio.gather(*(caller(c * per_caller) for c in range(concurrency)))
        elapsed = time.perf_counter() - start
        await asyncio.sleep(settle)
        cpu = server.cpu_seconds() - cpu
    done = per_caller * concurrency
    return done / elapsed, cpu / done * 1e6


@dataclass(frozen=True)
class Result:
    name: str
    checks_per_second: float
    vs_off: float  # throughput relative to tracing off
    cpu_us: float  # server CPU per Check
    cpu_vs_off: float
    rounds_per_second: tuple[float, ...]
    rounds_cpu_us: tuple[float, ...]


def measure(
    configs: Sequence[Config],
    *,
    rounds: int,
    n: int,
    concurrency: int,
    env: Mapping[str, str],
    settle: float = SETTLE,
) -> list[Result]:
    """Interleaved rounds over ``configs`` (the first is the baseline); medians."""
    request = _request("orders", "payments", "POST", "/payments/charge", None)
    with tempfile.TemporaryDirectory() as tmp, Collector(keep=False) as collector:
        policies = Path(tmp) / "policies"
        shutil.copytree(EXAMPLE_POLICIES, policies)
        dead = f"http://127.0.0.1:{free_port()}"
        servers = []
        try:
            for i, config in enumerate(configs):
                endpoint = dead if config.dead_collector else collector.endpoint
                log = Path(tmp) / f"server-{i}.log"
                servers.append(start(config, policies, endpoint, n, log, env))
            for server in servers:  # warm-up, not recorded: caches, a first export queue
                asyncio.run(drive(server, request, n, concurrency, 0))
            for r in range(rounds):
                # Rotate the order too: the first of a round must not always be the same one.
                for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
                    rate, cpu = asyncio.run(drive(server, request, n, concurrency, settle))
                    server.rates.append(rate)
                    server.cpu_us.append(cpu)
        finally:
            for server in servers:
                server.proc.terminate()
            for server in servers:
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
    base_rate = statistics.median(servers[0].rates)
    base_cpu = statistics.median(servers[0].cpu_us)
    results = []
    for server in servers:
        rate, cpu = statistics.median(server.rates), statistics.median(server.cpu_us)
        results.append(
            Result(
                server.config.name,
                rate,
                rate / base_rate,
                cpu,
                cpu / base_cpu,
                tuple(server.rates),
                tuple(server.cpu_us),
            )
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=4000, help="Checks per configuration and round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--settle",
        type=float,
        default=SETTLE,
        help="seconds after a round before the server's CPU time is read (its last export)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    results = measure(
        CONFIGS,
        rounds=args.rounds,
        n=args.n,
        concurrency=args.concurrency,
        env={},
        settle=args.settle,
    )
    print(
        f"Check throughput through the gRPC server, median of {args.rounds} interleaved "
        f"rounds x {args.n} Checks, {args.concurrency} concurrent callers\n"
    )
    print(f"{'configuration':<40} {'checks/s':>9} {'vs off':>7} {'CPU µs':>7} {'vs off':>7}")
    for r in results:
        print(
            f"{r.name:<40} {r.checks_per_second:>9.0f} {r.vs_off - 1:>+7.1%} "
            f"{r.cpu_us:>7.1f} {r.cpu_vs_off - 1:>+7.1%}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "rounds": args.rounds,
                    "n": args.n,
                    "concurrency": args.concurrency,
                    "results": [r.__dict__ for r in results],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
