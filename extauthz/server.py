"""The gRPC transport: Envoy's Authorization service, health and reflection on grpc.aio.

The servicer only converts and delegates: proto → :class:`CheckInput` → Authorizer →
:class:`Decision` → proto, then telemetry. Whatever happens inside, Envoy gets a
CheckResponse; an RPC error would let ``failure_mode_allow`` turn a failure into an allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .admin.recent import DEFAULT_CAPACITY, RecentDecisions
from .authorizer import Authorizer
from .checks import FAILED, CheckRecorder
from .config import DEFAULT_MAX_CONCURRENT_CHECKS
from .decisionlog.log import DecisionLog
from .errors import ConfigError, ExtAuthzError
from .httpserver import HttpCheckServer
from .jwks_server import JwksServer
from .reload import PolicyReloader, ReloadStatus
from .request import CheckInput, from_check_request
from .response import DEFAULT_UPSTREAM_NAMES, UpstreamNames, encode_check_response
from .telemetry import Telemetry
from .tls import ReloadingCredentials

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
POLICY_HEALTH_SERVICE = "extauthz.policy"  # NOT_SERVING while the last reload failed
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Time kept back from Envoy's deadline to send the answer: a late deny is an RPC error.
DEADLINE_MARGIN_SECONDS = 0.02

_LAST_RESORT = encode_check_response(FAILED)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``. ``Check`` answers with the serialized
    CheckResponse (:func:`add_authorization_servicer` sends those bytes as they are)."""

    def __init__(
        self,
        authorizer: Authorizer,
        telemetry: Telemetry,
        recent: RecentDecisions | None = None,
        decision_log: DecisionLog | None = None,
        max_in_flight: int = 0,
        *,
        recorder: CheckRecorder | None = None,
    ) -> None:
        # One recorder per server: with an HTTP listener beside, both count the same checks.
        self.recorder = recorder or CheckRecorder(
            authorizer, telemetry, recent, decision_log, max_in_flight
        )
        self.authorizer = self.recorder.authorizer
        self.telemetry = self.recorder.telemetry

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        telemetry = self.telemetry
        if self.recorder.over_limit():
            return self._shed(request, context)
        # A plain count the in-flight metric observes: the SDK's UpDownCounter.add costs
        # ~10 µs, twice per Check.
        telemetry.in_flight += 1
        try:
            return await self._check(request, context)
        finally:
            telemetry.in_flight -= 1

    async def _check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        start = time.perf_counter_ns()  # for durations
        wall = time.time_ns()  # for the decision log's timestamps
        recorder = self.recorder
        try:
            inp: CheckInput | None = from_check_request(request)
        except ExtAuthzError as exc:
            inp = None
            decision = self.authorizer.refuse(exc)
        except Exception:
            log.exception("cannot read CheckRequest; denying")
            return self._last_resort(None, start, wall, context)
        # The snapshot ``check`` will decide on: no await in between, so no reload either.
        snapshot = recorder.snapshot()
        try:
            if inp is not None:
                decision = await self.authorizer.check_async(inp, wait=_key_wait(self, context))
            response = encode_check_response(decision)
            # On the wall clock for the log's timestamps, measured on the monotonic one.
            decided = wall + time.perf_counter_ns() - start
        except Exception:
            log.exception("cannot build CheckResponse; denying")
            return self._last_resort(inp, start, wall, context)
        # Only spans and the decision log read it; the copy costs ~2 µs per Check.
        metadata = context.invocation_metadata() or () if recorder.wants_metadata else ()
        recorder.finish(decision, inp, snapshot, start, wall, decided, metadata)
        return response

    def _shed(self, request: Any, context: Any) -> bytes:
        """Over the limit: a 503 ``overloaded`` deny at once. Counted, traced and logged."""
        start, wall = time.perf_counter_ns(), time.time_ns()
        inp: CheckInput | None = None
        try:
            # Read only for the log and the span; unreadable, it is shed all the same.
            with contextlib.suppress(ExtAuthzError):
                inp = from_check_request(request)
            decision = self.recorder.shed()
            response = encode_check_response(decision)
        except Exception:
            log.exception("cannot shed a Check; denying")
            return self._last_resort(inp, start, wall, context)
        self.recorder.record_undecided(
            decision, inp, start, wall, context.invocation_metadata() or ()
        )
        return response

    def _last_resort(self, inp: CheckInput | None, start: int, wall: int, context: Any) -> bytes:
        """The answer of last resort, counted, traced and logged as the error it is."""
        self.recorder.record_undecided(
            FAILED, inp, start, wall, context.invocation_metadata() or ()
        )
        return _LAST_RESORT


def _wire(response: Any) -> bytes:
    """Check's answers are already serialized; anything else is a message to serialize."""
    return response if type(response) is bytes else bytes(response.SerializeToString())


def add_authorization_servicer(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """Register Check as the generated code does, but with responses sent as the bytes the
    servicer encoded (no CheckResponse object is built per Check)."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=_wire,
    )
    handlers = {"Check": handler}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers),)
    )
    # As the generated code does; grpc-stubs does not know this method yet.
    server.add_registered_method_handlers(AUTHORIZATION_SERVICE, handlers)  # type: ignore[attr-defined]


def _key_wait(servicer: AuthorizationServicer, context: Any) -> float:
    """How long a Check may wait for an early JWKS refetch: the fetch timeout, within the
    deadline Envoy set for this call."""
    wait = servicer.authorizer.settings.jwks.timeout
    remaining = context.time_remaining()
    if remaining is not None:
        wait = min(wait, remaining - DEADLINE_MARGIN_SECONDS)
    return wait


class Server:
    """One grpc.aio server with Check, health and reflection, and graceful shutdown.

    With ``admin_listen``, a second server on that address serves the admin service
    (:mod:`extauthz.admin.service`), and Check records its last ``recent_decisions``. With
    ``jwks``, the HTTP listener of the minted tokens' key set starts and stops with it. With
    ``decision_log``, Check records every decision there; stop writes it out after draining.
    Beyond ``max_concurrent_checks`` Checks in flight (0: no limit), more are answered at once
    with a 503 ``overloaded`` deny.
    """

    def __init__(
        self,
        authorizer: Authorizer,
        telemetry: Telemetry,
        *,
        listen: str,
        grace: float = 5.0,
        drain_delay: float = 0.0,
        tls: ReloadingCredentials | None = None,
        reload: PolicyReloader | None = None,
        admin_listen: str | None = None,
        recent_decisions: int = DEFAULT_CAPACITY,
        jwks: JwksServer | None = None,
        decision_log: DecisionLog | None = None,
        max_concurrent_checks: int = DEFAULT_MAX_CONCURRENT_CHECKS,
        http_listen: str | None = None,
        http_path_prefix: str = "",
        http_upstream_headers: str | None = None,
    ) -> None:
        if max_concurrent_checks < 0:
            raise ConfigError(
                f"--max-concurrent-checks {max_concurrent_checks}: expected a number >= 0"
            )
        self.max_concurrent_checks = max_concurrent_checks
        self.authorizer = authorizer
        self.jwks = jwks
        self.decision_log = decision_log
        self.telemetry = telemetry
        self.listen = listen
        self.grace = grace
        self.drain_delay = drain_delay
        self.tls = tls  # None: plaintext (localhost, a Unix socket, a private network)
        self.reloader = reload
        # The admin service (explanations, policy status) gets its own listener, never the
        # Check port: it shows request details, so keep it on localhost / a protected network.
        self.admin_listen = admin_listen
        if admin_listen is not None:
            _check_admin_listen(admin_listen, listen)
        self.recent = (
            RecentDecisions(recent_decisions)
            if admin_listen is not None and recent_decisions > 0
            else None
        )
        self.admin_port = 0
        self._admin: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()
        self.recorder = CheckRecorder(
            authorizer, telemetry, self.recent, decision_log, max_concurrent_checks
        )
        # Envoy's http_service beside the gRPC listener: the same checks, a cheaper transport.
        upstream = (  # checked even without --http-listen: a bad flag is an error
            UpstreamNames(http_upstream_headers)
            if http_upstream_headers is not None
            else DEFAULT_UPSTREAM_NAMES
        )
        self.http: HttpCheckServer | None = (
            HttpCheckServer(
                self.recorder, http_listen, path_prefix=http_path_prefix, upstream=upstream
            )
            if http_listen is not None
            else None
        )

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # two servers on one port would split Envoy's load
            ]
        )
        add_authorization_servicer(
            AuthorizationServicer(self.authorizer, self.telemetry, recorder=self.recorder),
            server,
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
            address = _grpc_address(self.listen)
            self.port = (
                server.add_secure_port(address, self.tls.credentials())
                if self.tls is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise ConfigError(f"--listen {self.listen}: cannot bind: {exc}") from exc
        try:
            if self.admin_listen is not None:
                self._admin = self._admin_server(self.admin_listen)
                await self._admin.start()
            if self.jwks is not None:
                self.jwks.start()
            if self.http is not None:
                await self.http.start()
            if self.decision_log is not None:
                self.decision_log.start()
            await server.start()
        except BaseException:
            await self._undo_start(server)
            raise
        for service in ("", AUTHORIZATION_SERVICE, POLICY_HEALTH_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.reloader is not None:
            self.reloader.listeners.append(self._policy_status)
            self._watcher = asyncio.create_task(self.reloader.run(), name="policy-watcher")
        log.info(
            "extauthz listening on %s%s (policy revision %s)",
            self.listen if self.listen.startswith("unix:") else f"port {self.port}",
            "" if self.http is None else f", HTTP on {_shown(self.http.listen, self.http.port)}",
            self.authorizer.policies.revision,
        )

    async def _undo_start(self, server: grpc.aio.Server) -> None:
        """A start that failed half-way: stop whatever had started (each stop is a no-op
        for a part that had not)."""
        await server.stop(None)
        if self.http is not None:
            await self.http.stop(0)
        if self._admin is not None:
            await self._admin.stop(None)
            self._admin = None
        if self.jwks is not None:
            self.jwks.stop()

    def _admin_server(self, listen: str) -> grpc.aio.Server:
        """The admin listener: ``extauthz.admin.v1.Admin``, health and reflection."""
        from .admin.service import ADMIN_SERVICE, AdminServicer, add_admin_service

        admin = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_admin_service(
            AdminServicer(self.authorizer, recent=self.recent, reloader=self.reloader), admin
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, admin)
        reflection.enable_server_reflection(
            (
                ADMIN_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            admin,
        )
        try:
            self.admin_port = admin.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ConfigError(f"--admin-listen {listen}: cannot bind: {exc}") from exc
        log.warning(
            "admin service (decision explanations, request details) listening on %s: "
            "keep it on localhost or a protected network",
            listen if listen.startswith("unix:") else f"port {self.admin_port}",
        )
        return admin

    async def _policy_status(self, status: ReloadStatus) -> None:
        self.telemetry.record_reload(status.ok)
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set(
            POLICY_HEALTH_SERVICE,
            serving if status.ok else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    def request_reload(self) -> None:
        if self.reloader is not None:
            self.reloader.request()
        else:
            log.warning("SIGHUP ignored: no --policies directory to reload")

    async def wait(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Report NOT_SERVING, refuse new RPCs, let in-flight checks finish within ``grace``."""
        if self._server is None:
            return
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self.health.enter_graceful_shutdown()
        if self.drain_delay > 0:
            # Keep answering while NOT_SERVING, until health-checking clients (Envoy, the
            # kubelet) have moved away: gRPC's own shutdown cancels calls that arrive during
            # it (CANCELLED), which Envoy would count as authz errors.
            log.info("draining: NOT_SERVING for %.1f s before closing", self.drain_delay)
            await asyncio.sleep(self.drain_delay)
        stops = [self._server.stop(self.grace)]
        if self._admin is not None:
            stops.append(self._admin.stop(self.grace))
        if self.http is not None:
            stops.append(self.http.stop(self.grace))
        await asyncio.gather(*stops)
        self._admin = None
        self._server = None
        if self.decision_log is not None:
            # After the drain: every Check that was answered is in the queue; write it all.
            await asyncio.to_thread(self.decision_log.close)
        if self.jwks is not None:
            # Last: upstreams may still verify tokens minted for the checks that drained.
            await asyncio.to_thread(self.jwks.stop)
        self.telemetry.shutdown()
        log.info("extauthz stopped")


def _shown(listen: str, port: int) -> str:
    return listen if listen.startswith("unix:") else f"port {port}"


def _check_admin_listen(admin_listen: str, listen: str) -> None:
    if admin_listen == listen and not listen.endswith(":0"):
        raise ConfigError(
            f"--admin-listen {admin_listen}: must differ from --listen (Envoy's port must not "
            "expose the admin service)"
        )
    try:
        _grpc_address(admin_listen)
    except ConfigError:
        raise ConfigError(
            f"--admin-listen {admin_listen!r}: expected HOST:PORT or unix:/path"
        ) from None
    host = admin_listen.rpartition(":")[0].strip("[]")
    if not admin_listen.startswith("unix:") and host not in _LOOPBACK:
        # The admin service has no authentication and shows request details.
        raise ConfigError(
            f"--admin-listen {admin_listen}: only a loopback address (127.0.0.1, [::1], "
            "localhost) or unix:/path; reach it with kubectl port-forward or an SSH tunnel"
        )


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _grpc_address(listen: str) -> str:
    if listen.startswith("unix:"):
        return listen
    _host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT or unix:/path")
    return listen


async def run(server: Server, started: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; SIGHUP reloads the policies.

    ``started`` is called once the server serves (a worker tells its supervisor).
    """
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload)
    # A worker starts with these blocked (workers.STARTUP_BLOCKED): any that arrived while
    # it started are handled now, by the handlers above. A no-op for a single process.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    if started is not None:
        started()
    await server.wait()
