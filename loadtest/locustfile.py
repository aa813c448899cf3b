"""Locust users for extauthz (run headless by ``python -m loadtest.locust_run``).

- ``CheckUser`` calls ``Authorization/Check`` over gRPC directly, with the CheckRequest Envoy
  would send for the realistic workload: the mTLS principal, a Bearer RS256 JWT and the 20
  headers of a browser request (``loadtest.micro.browser_headers``).
- ``EnvoyUser`` sends that HTTP request through a real Envoy (and its mTLS front Envoy).

Configured by the environment ``locust_run`` sets: ``EXTAUTHZ_TARGET`` (``HOST:PORT``, or
several comma-separated, one per worker: each user takes the next, round robin),
``BENCH_PATH`` and ``BENCH_HEADERS`` (JSON; the ``authorization`` header carries the token);
``--host`` is the Envoy URL. Locust is the load *shape* here (users, ramp-up, a live view);
wrk is the meter (``loadtest.bench``): on 2 cores, locust's own CPU caps what it can send.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from locust import HttpUser, User, constant, task

from loadtest.bench_setup import CALLER, SERVER
from loadtest.micro import browser_headers

# grpcio blocks the whole gevent hub unless told to cooperate.
grpc_gevent.init_gevent()

PATH = os.environ.get("BENCH_PATH", "/api/v1/res19/item")
HEADERS: dict[str, str] = json.loads(os.environ.get("BENCH_HEADERS", "{}"))


def check_request(path: str = PATH, headers: dict[str, str] | None = None) -> Any:
    """The CheckRequest of the realistic workload, as Envoy builds it."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.principal = CALLER
    a.source.address.socket_address.address = "127.0.0.1"
    a.source.address.socket_address.port_value = 41234
    a.destination.principal = SERVER
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 8443
    http = a.request.http
    http.method, http.host, http.path, http.protocol = "GET", "orders.shop", path, "HTTP/1.1"
    http.headers.update(browser_headers("orders.shop", "GET", path))
    http.headers.update(HEADERS if headers is None else headers)
    return req


_user_numbers = itertools.count()  # spreads CheckUsers over the workers' addresses


class CheckUser(User):
    """Check over gRPC, one channel per user; a deny counts as a failure."""

    wait_time = constant(0)

    def on_start(self) -> None:
        targets = os.environ.get("EXTAUTHZ_TARGET", "127.0.0.1:9191").split(",")
        self.channel = grpc.insecure_channel(targets[next(_user_numbers) % len(targets)])
        # Connect before the first timed call: its latency is not the connection's.
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        self.request = check_request()

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def check(self) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            response = self.stub.Check(self.request, timeout=5)
            length = response.ByteSize()
            if response.status.code != 0:
                error = RuntimeError(f"denied: {response.denied_response.body[:200]}")
        except grpc.RpcError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name="Check",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=error,
            context={},
        )


class EnvoyUser(HttpUser):
    """GET through Envoy (ext_authz → extauthz); anything but 200 is a failure."""

    wait_time = constant(0)

    @task
    def get(self) -> None:
        self.client.get(PATH, headers=HEADERS, name="GET via Envoy")
