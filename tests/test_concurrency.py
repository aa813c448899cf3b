"""The limit on concurrent checks: beyond ``--max-concurrent-checks``, more Checks are shed at
once with a 503 ``overloaded`` deny (a CheckResponse, never an RPC error), counted and logged;
the limit frees up as held checks finish. In-process, then through a real Envoy, whose
circuit breakers on the extauthz cluster are the limit in front of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
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
