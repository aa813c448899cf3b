"""A local mesh on 127.0.0.1: extauthz, and per workload an echo upstream behind a real Envoy.

Used by the integration tests and by ``extauthz demo``. Every process is a child of the
caller and is stopped by :meth:`Mesh.stop` (also on context exit).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import devcli
from .envoy import EnvoyProcess, Transport, free_port, free_ports, render_sidecar
from .idp import DevIdP
from .pki import DevCA
from .upstream import EchoServer

REPO = Path(__file__).resolve().parents[2]
SIDECAR_TEMPLATE = REPO / "envoy" / "sidecar.yaml"
# The same sidecar asking extauthz's --http-listen over Envoy's http_service.
SIDECAR_HTTP_TEMPLATE = REPO / "envoy" / "sidecar-http.yaml"
SIDECAR_TEMPLATES: dict[Transport, Path] = {"grpc": SIDECAR_TEMPLATE, "http": SIDECAR_HTTP_TEMPLATE}
EXAMPLE_POLICIES = REPO / "policies"
TRUST_DOMAIN = devcli.DEFAULT_TRUST_DOMAIN
NAMESPACE = devcli.DEFAULT_NAMESPACE
ISSUER = devcli.DEFAULT_ISSUER
# The name in extauthz's server certificate that the sidecars check (with extauthz_tls).
EXTAUTHZ_DNS = "extauthz.extauthz-system.svc"
JWKS_FILE = "demo-idp.jwks.json"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Workload:
    name: str
    spiffe_id: str
    port: int = 0
    upstream: EchoServer | None = None
    envoy: EnvoyProcess | None = None


@dataclass
class Mesh:
    """``workloads`` serve behind sidecars; ``clients`` only get an SVID to call with."""

    workdir: Path
    policies: Path = EXAMPLE_POLICIES
    workloads: Sequence[str] = ("frontend", "orders", "payments")
    clients: Sequence[str] = ("intruder",)
    env: Mapping[str, str] = field(default_factory=dict)
    extauthz_args: Sequence[str] = ()
    unix_socket: bool = False  # Envoy reaches extauthz over a Unix socket instead of TCP
    # An OTLP/gRPC collector on 127.0.0.1 for extauthz's and the sidecars' traces and
    # metrics; None: extauthz exports nothing, the sidecars try the template's port.
    collector_port: int | None = None
    # TLS between the sidecars and extauthz: extauthz serves a certificate from the mesh's CA
    # (SANs 127.0.0.1 and EXTAUTHZ_DNS) and requires each sidecar's SVID as client certificate.
    extauthz_tls: bool = False
    idp: DevIdP = field(default_factory=lambda: DevIdP.create(ISSUER))
    # Sidecar listen ports by workload name; a workload left out gets a free port.
    ports: Mapping[str, int] = field(default_factory=dict)
    # Files added to the copy of ``policies`` before extauthz starts: relative path -> YAML.
    extra_policies: Mapping[str, str] = field(default_factory=dict)
    # How the sidecars ask extauthz: gRPC (envoy/sidecar.yaml), or HTTP (envoy/sidecar-http.yaml,
    # extauthz with --http-listen beside its gRPC --listen, which still answers health checks).
    transport: Transport = "grpc"
    # HTTP: Envoy's path_prefix and extauthz's --http-path-prefix ("": none).
    http_path_prefix: str = "/check"
    # extauthz runs `serve --workers N` (N > 1): each sidecar gets one endpoint per worker.
    workers: int = 1
    services: dict[str, Workload] = field(default_factory=dict)
    extauthz_port: int = 0
    http_port: int = 0  # extauthz's --http-listen port (worker 0's), with transport "http"
    _extauthz: subprocess.Popen[bytes] | None = None
    _certs: dict[str, Path] = field(default_factory=dict)
    _ca: DevCA | None = None

    def spiffe_id(self, name: str) -> str:
        return devcli.spiffe_id(TRUST_DOMAIN, NAMESPACE, name)

    @property
    def policy_dir(self) -> Path:
        return self.workdir / "policies"

    @property
    def extauthz_log(self) -> Path:
        return self.workdir / "extauthz.log"

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ca = ca = DevCA.create(TRUST_DOMAIN)
        # The code path of `extauthz certs`: what the README shows is what runs here.
        self._certs = devcli.write_svids(
            self.workdir / "certs",
            [*self.workloads, *self.clients],
            domain=TRUST_DOMAIN,
            namespace=NAMESPACE,
            dns_names=["localhost"],
            ca=ca,
        )
        if self.extauthz_tls:
            if self.unix_socket:
                raise ValueError("extauthz_tls: TLS over the Unix socket is not supported")
            if self.transport == "http":
                raise ValueError("extauthz_tls: extauthz's HTTP listener has no TLS")
            self.issue_extauthz_cert(ca)
        # A caller whose certificate chains to another CA: Envoy must refuse the handshake.
        rogue = DevCA.create(TRUST_DOMAIN).issue_svid(self.spiffe_id("frontend"))
        (self.workdir / "certs" / "rogue.pem").write_bytes(rogue.cert_pem)
        (self.workdir / "certs" / "rogue-key.pem").write_bytes(rogue.key_pem)
        if self.policy_dir.exists():
            shutil.rmtree(self.policy_dir)
        shutil.copytree(self.policies, self.policy_dir)
        devcli.write_jwks(self.idp, self.policy_dir / JWKS_FILE)
        for relative, text in self.extra_policies.items():
            path = self.policy_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.start_extauthz()
        for name in self.workloads:
            self._start_workload(name)

    @property
    def extauthz_target(self) -> str:
        """Where extauthz listens, as ``--listen`` and gRPC clients spell it."""
        if self.unix_socket:
            return f"unix:{self.workdir / 'extauthz.sock'}"
        return f"127.0.0.1:{self.extauthz_port}"

    @property
    def http_target(self) -> str:
        """Where extauthz's HTTP listener is, as ``--http-listen`` spells it."""
        if self.unix_socket:
            return f"unix:{self.workdir / 'extauthz-http.sock'}"
        return f"127.0.0.1:{self.http_port}"

    def worker_targets(self, target: str) -> list[str]:
        """``target`` (as ``--listen`` or ``--http-listen`` spells it) for each worker: itself
        without --workers, else port + i or ``x-i.sock`` (extauthz.workers.numbered)."""
        if self.workers == 1:
            return [target]
        if target.startswith("unix:"):
            path = Path(target.removeprefix("unix:"))
            return [
                f"unix:{path.with_name(f'{path.stem}-{i}{path.suffix}')}"
                for i in range(self.workers)
            ]
        host, _, port = target.rpartition(":")
        return [f"{host}:{int(port) + i}" for i in range(self.workers)]

    @property
    def extauthz_pid(self) -> int | None:
        """The extauthz process (with --workers: the supervisor), while it runs."""
        return self._extauthz.pid if self._extauthz is not None else None

    def issue_extauthz_cert(self, ca: DevCA | None = None) -> None:
        """Write extauthz's server certificate and key from the mesh's CA (again: a rotation,
        picked up at the next handshake); ``ca``: another's, for a certificate sidecars refuse."""
        ca = ca or self._ca
        if ca is None:
            raise RuntimeError("the mesh has no CA before it starts")
        pair = ca.issue_cert(
            common_name="extauthz", dns_names=[EXTAUTHZ_DNS], ip_addresses=["127.0.0.1"]
        )
        certs = self.workdir / "certs"
        # Each file replaced whole, as cert-manager and SPIRE do: never a half-written one.
        for name, data in (("extauthz.pem", pair.cert_pem), ("extauthz-key.pem", pair.key_pem)):
            (certs / f".{name}.tmp").write_bytes(data)
            os.replace(certs / f".{name}.tmp", certs / name)
        self._certs["extauthz"] = certs / "extauthz.pem"
        self._certs["extauthz-key"] = certs / "extauthz-key.pem"

    def _tls_args(self) -> list[str]:
        if not self.extauthz_tls:
            return []
        return [
            "--tls-cert",
            str(self._certs["extauthz"]),
            "--tls-key",
            str(self._certs["extauthz-key"]),
            "--tls-client-ca",
            str(self._certs["ca"]),
        ]

    def extauthz_credentials(self, caller: str) -> grpc.ChannelCredentials | None:
        """gRPC credentials to reach extauthz as ``caller``'s SVID (None: plaintext)."""
        if not self.extauthz_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self._certs["ca"].read_bytes(),
            private_key=self._certs[f"{caller}-key"].read_bytes(),
            certificate_chain=self._certs[caller].read_bytes(),
        )

    def extauthz_tls_files(self, caller: str | None) -> dict[str, Any] | None:
        """``render_sidecar(extauthz_tls=)`` for a sidecar presenting ``caller``'s SVID to
        extauthz (None: no client certificate); None without extauthz_tls."""
        if not self.extauthz_tls:
            return None
        files: dict[str, Any] = {"ca": self._certs["ca"], "san": EXTAUTHZ_DNS}
        if caller is not None:
            certs = self.workdir / "certs"
            files.update(cert=certs / f"{caller}.pem", key=certs / f"{caller}-key.pem")
        return files

    def start_extauthz(self) -> None:
        """Start extauthz (again, after a stop or kill: on the same address Envoy knows)."""
        if self._extauthz is not None:
            raise RuntimeError("extauthz is already running")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers}: expected 1 or more")
        if not self.extauthz_port:
            # --workers N takes N consecutive ports per listener: one block for both.
            self.extauthz_port = free_ports(2 * self.workers) if self.workers > 1 else free_port()
        if self.transport == "http" and not self.http_port:
            self.http_port = self.extauthz_port + self.workers if self.workers > 1 else free_port()
        if self.collector_port is None:
            otel = {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
        else:
            otel = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.collector_port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            }
        env = {**os.environ, **otel, **self.env}
        log = self.extauthz_log.open("wb")
        self._extauthz = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "extauthz",
                "serve",
                "--listen",
                self.extauthz_target,
                "--policies",
                str(self.policy_dir),
                # envoy/sidecar.yaml sets x-forwarded-client-cert itself (SANITIZE_SET).
                "--trust-xfcc",
                *self._tls_args(),
                *self._http_args(),
                *(["--workers", str(self.workers)] if self.workers > 1 else []),
                *self.extauthz_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        # The HTTP listener is bound before the gRPC server reports SERVING.
        for target in self.worker_targets(self.extauthz_target):
            wait_serving(
                target,
                self._extauthz,
                self.extauthz_log,
                credentials=self.extauthz_credentials([*self.workloads, *self.clients][0]),
            )

    def _http_args(self) -> list[str]:
        if self.transport != "http":
            return []
        prefix = ["--http-path-prefix", self.http_path_prefix] if self.http_path_prefix else []
        return ["--http-listen", self.http_target, *prefix]

    def _start_workload(self, name: str) -> None:
        self.add_sidecar(name, port=self.ports.get(name) or 0)

    def add_sidecar(
        self,
        name: str,
        *,
        svid: str | None = None,
        labels: str | None = None,
        upstream: EchoServer | None = None,
        port: int = 0,
        tweak: Callable[[dict[str, Any]], None] | None = None,
    ) -> Workload:
        """Start a sidecar named ``name`` in front of ``upstream`` (a started server; default:
        a new echo server), serving the SVID of workload ``svid`` (default ``name``) and protecting
        ``labels`` (default ``app=<name>``); ``tweak`` edits the rendered config before Envoy
        starts. Registered in :attr:`services`, so :meth:`stop` stops it and :meth:`call`
        reaches it."""
        svid = svid or name
        upstream = upstream or EchoServer(name).start()
        port, admin = port or free_port(), free_port()
        http = self.transport == "http"
        unix = self.http_target if http else self.extauthz_target
        config = render_sidecar(
            SIDECAR_TEMPLATES[self.transport],
            listen_port=port,
            admin_port=admin,
            extauthz_port=None
            if self.unix_socket
            else (self.http_port if http else self.extauthz_port),
            extauthz_unix=unix.removeprefix("unix:") if self.unix_socket else None,
            upstream_port=upstream.port,
            certs={
                "ca": self._certs["ca"],
                "cert": self._certs[svid],
                "key": self._certs[f"{svid}-key"],
            },
            context_extensions={"namespace": NAMESPACE, "labels": labels or f"app={name}"},
            collector_port=self.collector_port,
            service_name=name,
            extauthz_tls=self.extauthz_tls_files(svid),
            extauthz_workers=self.workers,
            http_path_prefix=self.http_path_prefix if http else None,
        )
        if tweak is not None:
            tweak(config)
        envoy = EnvoyProcess(config, workdir=self.workdir, admin_port=admin)
        workload = Workload(name, self.spiffe_id(svid), port, upstream, envoy)
        self.services[name] = workload
        envoy.start()
        return workload

    def kill_extauthz(self) -> None:
        """SIGKILL extauthz: a crash, with no drain."""
        proc, self._extauthz = self._extauthz, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop_extauthz(self, *, timeout: float = 10.0) -> int | None:
        """SIGTERM extauthz and wait for it: returns its exit code."""
        proc, self._extauthz = self._extauthz, None
        if proc is None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> None:
        for w in self.services.values():
            if w.envoy is not None:
                w.envoy.stop()
            if w.upstream is not None:
                w.upstream.stop()
        self.services.clear()
        self.stop_extauthz()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_context(self, caller: str | None) -> ssl.SSLContext:
        """TLS as the workload ``caller`` (None: no client certificate; "rogue": wrong CA)."""
        ctx = ssl.create_default_context(cafile=str(self._certs["ca"]))
        ctx.check_hostname = False  # SVIDs carry a SPIFFE ID, not a DNS name
        if caller is not None:
            certs = self.workdir / "certs"
            ctx.load_cert_chain(certs / f"{caller}.pem", certs / f"{caller}-key.pem")
        return ctx

    def call(
        self,
        caller: str | None,
        target: str,
        method: str = "GET",
        path: str = "/",
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> Response:
        """One HTTPS request from ``caller``'s SVID to ``target``'s sidecar."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1",
            self.services[target].port,
            context=self.client_context(caller),
            timeout=timeout,
        )
        all_headers = {"host": f"{target}.{NAMESPACE}", **(headers or {})}
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=all_headers)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


def wait_serving(
    target: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 20.0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll grpc.health.v1 until extauthz reports SERVING (over TLS with ``credentials``);
    fail fast if it exited."""
    deadline = time.monotonic() + timeout
    channel = (
        grpc.secure_channel(target, credentials)
        if credentials is not None
        else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"extauthz exited with {proc.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"extauthz at {target} not SERVING after {timeout}s")
            time.sleep(0.05)
