"""The limit on concurrent checks: beyond ``--max-concurrent-checks``, more Checks are shed at
once with a 503 ``overloaded`` deny (a CheckResponse, never an RPC error), counted and logged;
the limit frees up as held checks finish. In-process, then through a real Envoy, whose
circuit breakers on the extauthz cluster are the limit in front of it."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.cli import _settings, parser
from extauthz.config import DEFAULT_MAX_CONCURRENT_CHECKS, Settings
from extauthz.decision import Decision
from extauthz.decisionlog.log import DecisionLog
from extauthz.devtools.envoy import EnvoyProcess, _find_key, free_port, render_sidecar
from extauthz.devtools.mesh import SIDECAR_TEMPLATE as SIDECAR
from extauthz.devtools.pki import write_pki
from extauthz.devtools.upstream import EchoServer
from extauthz.errors import ConfigError
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.server import Server
from extauthz.telemetry import Telemetry

LIMIT = 8
FLOOD = 300  # far beyond the limit; each is a separate call on one HTTP/2 connection
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-ok, namespace: shop}
spec:
  rules:
    - to: [{operation: {paths: ["/ok/*"]}}]
"""


class HoldingAuthorizer(Authorizer):
    """Decides only when released: every Check waits where a slow decision would (an
    unknown ``kid``'s JWKS refetch), so the number in flight is the test's to set."""

    def __init__(self, policies: PolicySet) -> None:
        super().__init__(policies, Settings(workload_namespace="shop"))
        self.held = 0
        self.release = asyncio.Event()

    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        self.held += 1
        try:
            await self.release.wait()
        finally:
            self.held -= 1
        return self.check(inp)


class MemorySink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


@dataclass
class Limited:
    server: Server
    authorizer: HoldingAuthorizer
    reader: InMemoryMetricReader
    sink: MemorySink


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Limited]:
    (tmp_path / "p.yaml").write_text(POLICY)
    authorizer = HoldingAuthorizer(PolicySet.load(tmp_path))
    reader = InMemoryMetricReader()
    sink = MemorySink()
    server = Server(
        authorizer,
        Telemetry(None, MeterProvider(metric_readers=[reader])),
        listen="127.0.0.1:0",
        decision_log=DecisionLog(sink),
        max_concurrent_checks=LIMIT,
    )
    await server.start()
    try:
        yield Limited(server, authorizer, reader, sink)
    finally:
        authorizer.release.set()
        await server.stop()


def check_request(path: str) -> Any:
    req = external_auth_pb2.CheckRequest()
    req.attributes.source.principal = "spiffe://td/ns/shop/sa/frontend"
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.shop", path
    return req


@dataclass(frozen=True)
class Answer:
    path: str
    allowed: bool
    status: int  # what the client gets
    reason: str
    headers: dict[str, str]


async def ask(stub: Any, path: str) -> Answer:
    """One Check; an RPC error raises and fails the test."""
    resp = await stub.Check(check_request(path), timeout=30)
    if resp.status.code == 0:
        return Answer(path, True, 200, "", {})
    denied = resp.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    return Answer(path, False, denied.status.code, json.loads(denied.body)["reason"], headers)


async def until(condition: Any, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def path_of(i: int) -> str:
    # Half may be allowed by the policy: a shed one among them would be a wrong allow.
    return f"/ok/{i}" if i % 2 == 0 else f"/no/{i}"


async def test_a_flood_beyond_the_limit_is_shed_with_a_deny_and_the_limit_frees_up(
    limited: Limited,
) -> None:
    authorizer = limited.authorizer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.server.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        calls = [asyncio.ensure_future(ask(stub, path_of(i))) for i in range(FLOOD)]
        # The limit's worth are held; every other call is answered without waiting for them.
        await until(
            lambda: authorizer.held == LIMIT and sum(c.done() for c in calls) == FLOOD - LIMIT,
            "LIMIT held, the rest answered",
        )
        shed_at = {i for i, c in enumerate(calls) if c.done()}
        assert authorizer.held == LIMIT  # no more admitted while the limit is full
        authorizer.release.set()
        answers = await asyncio.gather(*calls)  # every call a CheckResponse: no RPC error

        shed = [a for i, a in enumerate(answers) if i in shed_at]
        decided = [a for i, a in enumerate(answers) if i not in shed_at]
        assert len(decided) == LIMIT
        for a in decided:  # the policy's answer, right for its path
            assert a.allowed == a.path.startswith("/ok/"), a
        for a in shed:
            assert (a.allowed, a.status, a.reason) == (False, 503, "overloaded"), a
            assert a.headers["retry-after"] == "1"
            assert len(a.headers["x-extauthz-decision-id"]) == 32

        # Free again: sequential checks, then a burst of exactly the limit, all decided.
        after = [await ask(stub, path_of(i)) for i in range(4)]
        after += await asyncio.gather(*(ask(stub, path_of(i)) for i in range(LIMIT)))
        for a in after:
            assert a.reason != "overloaded"
            assert a.allowed == a.path.startswith("/ok/"), a

    await limited.server.stop()
    counted = points(limited.reader, "extauthz.decisions")
    assert counted[frozenset({("result", "error"), ("reason", "overloaded")})] == len(shed)
    assert sum(counted.values()) == FLOOD + len(after)
    records = [json.loads(line) for line in limited.sink.lines]
    assert len(records) == FLOOD + len(after)
    overloaded = [r for r in records if r["reason"] == "overloaded"]
    assert len(overloaded) == len(shed)
    for r in overloaded:
        assert (r["outcome"], r["http_status"]) == ("OUTCOME_ERROR", 503)
        assert r["request"]["path"].startswith(("/ok/", "/no/"))  # who was shed


async def test_an_unreadable_request_over_the_limit_is_shed_too(limited: Limited) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.server.port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        held = [asyncio.ensure_future(ask(stub, "/ok/1")) for _ in range(LIMIT)]
        await until(lambda: limited.authorizer.held == LIMIT, "LIMIT held")
        resp = await stub.Check(external_auth_pb2.CheckRequest(), timeout=10)
        assert resp.denied_response.status.code == 503
        assert json.loads(resp.denied_response.body)["reason"] == "overloaded"
        limited.authorizer.release.set()
        assert all(a.allowed for a in await asyncio.gather(*held))


async def test_no_limit_admits_them_all(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    authorizer = HoldingAuthorizer(PolicySet.load(tmp_path))
    server = Server(authorizer, Telemetry(None), listen="127.0.0.1:0", max_concurrent_checks=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            calls = [asyncio.ensure_future(ask(stub, path_of(i))) for i in range(100)]
            await until(lambda: authorizer.held == 100, "all held")
            authorizer.release.set()
            for a in await asyncio.gather(*calls):
                assert a.allowed == a.path.startswith("/ok/"), a
    finally:
        authorizer.release.set()
        await server.stop()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], DEFAULT_MAX_CONCURRENT_CHECKS),
        (["--max-concurrent-checks", "50"], 50),
        (["--max-concurrent-checks", "0"], 0),
    ],
)
def test_the_flag(argv: list[str], expected: int) -> None:
    args = parser().parse_args(["serve", *argv])
    assert _settings(args).max_concurrent_checks == expected


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_bad_flag_values_stop_the_parser(value: str) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--max-concurrent-checks", value])


def test_a_negative_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--max-concurrent-checks -1"):
        Server(
            Authorizer(PolicySet.empty()), Telemetry(None), listen="x:1", max_concurrent_checks=-1
        )


# --- through a real Envoy ------------------------------------------------------------------

ENVOY_FLOOD = 40
ENVOY_LIMIT = 4


@dataclass
class Sidecar:
    envoy: EnvoyProcess
    upstream: EchoServer
    port: int
    context: ssl.SSLContext

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=30)
        try:
            conn.request("GET", path, headers={"host": "orders.shop"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stat(self, name: str) -> int:
        text = self.envoy.admin_get(f"/stats?filter=^{re.escape(name)}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name} in {text!r}")


@contextmanager
def sidecar(workdir: Path, extauthz_port: int, max_requests: int | None) -> Iterator[Sidecar]:
    """envoy/sidecar.yaml in front of an echo upstream, with time for held checks (10 s
    instead of 0.25 s) and, with ``max_requests``, a circuit breaker on the extauthz cluster."""
    certs = write_pki(workdir / "certs", "td", {"orders": "spiffe://td/ns/shop/sa/orders"})
    config = render_sidecar(
        SIDECAR,
        listen_port=(port := free_port()),
        admin_port=(admin := free_port()),
        extauthz_port=extauthz_port,
        upstream_port=(upstream := EchoServer("orders").start()).port,
        certs={"ca": certs["ca"], "cert": certs["orders"], "key": certs["orders-key"]},
        context_extensions={"namespace": "shop", "labels": "app=orders"},
    )
    for authz in _find_key(config, "grpc_service"):
        if authz.get("envoy_grpc", {}).get("cluster_name") == "extauthz":
            authz["timeout"] = "10s"
    if max_requests is not None:
        (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz"]
        cluster["circuit_breakers"] = {
            "thresholds": [{"max_requests": max_requests, "max_pending_requests": max_requests}]
        }
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.check_hostname = False
    context.load_cert_chain(certs["orders"], certs["orders-key"])
    envoy = EnvoyProcess(config, workdir=workdir, admin_port=admin)
    try:
        envoy.start()
        yield Sidecar(envoy, upstream, port, context)
    finally:
        envoy.stop()
        upstream.stop()


@pytest.mark.parametrize(
    ("limit", "breaker"),
    [(ENVOY_LIMIT, None), (0, ENVOY_LIMIT)],
    ids=["extauthz-sheds", "envoy-circuit-breaker"],
)
async def test_a_flood_through_envoy_gets_no_allow_beyond_the_limit(
    tmp_path: Path, limit: int, breaker: int | None
) -> None:
    """extauthz's limit answers Envoy with a deny (its 503 body, Envoy's ext_authz error
    counter still 0); Envoy's circuit breaker refuses the call itself (an ext_authz error,
    answered with status_on_error: which ``failure_mode_allow: true`` would turn into allows).
    """
    (tmp_path / "p.yaml").write_text(POLICY)
    authorizer = HoldingAuthorizer(PolicySet.load(tmp_path))
    server = Server(authorizer, Telemetry(None), listen="127.0.0.1:0", max_concurrent_checks=limit)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        with (
            sidecar(tmp_path / "envoy", server.port, breaker) as envoy,
            ThreadPoolExecutor(ENVOY_FLOOD) as pool,
        ):
            calls = [loop.run_in_executor(pool, envoy.get, path_of(i)) for i in range(ENVOY_FLOOD)]
            await until(
                lambda: sum(c.done() for c in calls) == ENVOY_FLOOD - ENVOY_LIMIT,
                "all but the limit's worth answered",
            )
            assert authorizer.held == ENVOY_LIMIT
            refused_at = {i for i, c in enumerate(calls) if c.done()}
            authorizer.release.set()
            answers = await asyncio.gather(*calls)
            after = [await loop.run_in_executor(pool, envoy.get, "/ok/after")]
            checks = {
                result: envoy.stat(f"http.inbound.ext_authz.{result}")
                for result in ("ok", "denied", "error")
            }
            # The breaker refuses with either threshold: max_requests (active overflow) or,
            # while the first connection to extauthz is still being made and the checks
            # queue for it, max_pending_requests (pending overflow: a 5th check then).
            overflow = {
                kind: envoy.stat(f"cluster.extauthz.upstream_rq_{kind}_overflow")
                for kind in ("active", "pending")
            }
            hits = envoy.upstream.hits
    finally:
        authorizer.release.set()
        await server.stop()

    allowed = 0
    for i, (status, body) in enumerate(answers):
        if i in refused_at:
            assert status == 503
            if breaker is None:
                assert json.loads(body)["reason"] == "overloaded"
        else:  # held, then decided by the policy
            assert status == (200 if path_of(i).startswith("/ok/") else 403), i
            allowed += status == 200
    assert after[0][0] == 200
    assert hits == allowed + 1  # only the policy's allows reached the workload
    # Envoy counted every check once, and an allow only for the policy's allows.
    assert sum(checks.values()) == ENVOY_FLOOD + 1
    assert checks["ok"] == allowed + 1
    if breaker is None:
        assert checks["error"] == 0
        assert overflow == {"active": 0, "pending": 0}
    else:  # every refusal is the breaker's, counted as an ext_authz error, none allowed
        assert len(refused_at) == ENVOY_FLOOD - ENVOY_LIMIT
        assert checks["error"] == sum(overflow.values()) == len(refused_at), overflow
