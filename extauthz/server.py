"""The gRPC transport: Envoy's Authorization service, health and reflection on grpc.aio.

The servicer only converts and delegates: proto → :class:`CheckInput` → Authorizer →
:class:`Decision` → proto, then telemetry. Whatever happens inside, Envoy gets a
CheckResponse; an RPC error would let ``failure_mode_allow`` turn a failure into an allow.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .authorizer import Authorizer
from .decision import Decision, Outcome
from .errors import ConfigError, ExtAuthzError
from .request import CheckInput, from_check_request
from .response import to_check_response
from .telemetry import Telemetry

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# Built at import: the answer of last resort must not itself be able to fail.
_LAST_RESORT = to_check_response(
    Decision(Outcome.ERROR, "internal_error", "the authorization server failed to decide", "")
)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``."""

    def __init__(self, authorizer: Authorizer, telemetry: Telemetry) -> None:
        self.authorizer = authorizer
        self.telemetry = telemetry

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        start = time.time_ns()
        try:
            inp: CheckInput | None = from_check_request(request)
        except ExtAuthzError as exc:
            inp = None
            decision = self.authorizer.refuse(exc)
        except Exception:
            log.exception("cannot read CheckRequest; denying")
            return _LAST_RESORT
        try:
            if inp is not None:
                decision = self.authorizer.check(inp)
            response = to_check_response(decision)
        except Exception:
            log.exception("cannot build CheckResponse; denying")
            return _LAST_RESORT
        try:
            self.telemetry.record(decision, inp, start, context.invocation_metadata() or ())
        except Exception:
            log.exception("telemetry failed for decision %s", decision.decision_id)
        return response


class Server:
    """One grpc.aio server with Check, health and reflection, and graceful shutdown."""

    def __init__(
        self, authorizer: Authorizer, telemetry: Telemetry, *, listen: str, grace: float = 5.0
    ) -> None:
        self.authorizer = authorizer
        self.telemetry = telemetry
        self.listen = listen
        self.grace = grace
        self.health = HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # two servers on one port would split Envoy's load
            ]
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(self.authorizer, self.telemetry), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                AUTHORIZATION_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(_grpc_address(self.listen))
        except RuntimeError as exc:
            raise ConfigError(f"--listen {self.listen}: cannot bind: {exc}") from exc
        await server.start()
        for service in ("", AUTHORIZATION_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info(
            "extauthz listening on %s (policy revision %s)",
            self.listen if self.listen.startswith("unix:") else f"port {self.port}",
            self.authorizer.policies.revision,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new RPCs, let in-flight checks finish within ``grace``."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.grace)
        self._server = None
        self.telemetry.shutdown()
        log.info("extauthz stopped")


def _grpc_address(listen: str) -> str:
    if listen.startswith("unix:"):
        return listen
    _host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT or unix:/path")
    return listen


async def run(server: Server) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    await server.wait()
