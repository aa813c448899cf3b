"""Static checks of ``docker-compose.yml`` against the files it mounts (development only).

No container engine is needed: the compose file is parsed, and what each container listens
on is read from what it runs (``extauthz serve`` flags through extauthz's own parser, the
echo upstream's flags, the mounted Envoy and collector configs, Jaeger's image defaults).
Then every dial (an Envoy cluster endpoint, extauthz's OTLP endpoint, a collector exporter,
the image's health check) must reach a compose service whose network namespace listens on
that port, every bind mount must exist, every file an Envoy config names must be mounted,
and published ports must bind 127.0.0.1. :func:`problems` lists what is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from .. import cli
from . import upstream
from .envoy import _is_ip

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
ANY = frozenset({"0.0.0.0", "::", ""})
# What Jaeger v2's image listens on with its built-in config (JAEGER_LISTEN_HOST=0.0.0.0):
# OTLP gRPC and HTTP, the UI.
JAEGER_LISTENS = ((("0.0.0.0", 4317), "OTLP/gRPC"), (("0.0.0.0", 4318), "OTLP/HTTP"))
JAEGER_UI = (("0.0.0.0", 16686), "UI")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::?-([^}]*))?\}|(\$))")
_OTEL_ENDPOINTS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``$$``, applied to every string."""
    if isinstance(node, str):

        def value(m: re.Match[str]) -> str:
            if m.group(3):
                return "$"
            name, default = m.group(1), m.group(2)
            if env.get(name):
                return env[name]
            if default is None:
                raise ValueError(f"${{{name}}} is not set and has no default")
            return default

        return _VARIABLE.sub(value, node)
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return node


@dataclass(frozen=True)
class Dockerfile:
    """The instructions of the extauthz Dockerfile a compose ``build`` uses."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    healthcheck: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        joined = re.sub(r"\\\n", " ", text)
        found: dict[str, tuple[str, ...]] = {}
        for line in joined.splitlines():
            words = line.strip().split(None, 1)
            if len(words) == 2 and words[0] in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
                args = words[1]
                if words[0] == "HEALTHCHECK":
                    args = args.split(" CMD ", 1)[-1] if " CMD " in args else ""
                found[words[0]] = _exec_form(args.strip())
        return cls(found.get("ENTRYPOINT", ()), found.get("CMD", ()), found.get("HEALTHCHECK", ()))


def _exec_form(text: str) -> tuple[str, ...]:
    if text.startswith("["):
        value = json.loads(text)
        return tuple(str(v) for v in value)
    return ("/bin/sh", "-c", text) if text else ()


@dataclass
class Service:
    name: str
    spec: Mapping[str, Any]
    argv: tuple[str, ...] = ()
    mounts: list[tuple[Path, PurePosixPath]] = field(default_factory=list)
    listens: dict[tuple[str, int], str] = field(default_factory=dict)
    envoy: dict[str, Any] | None = None
    collector: dict[str, Any] | None = None

    @property
    def image(self) -> str:
        return str(self.spec.get("image", ""))

    @property
    def built(self) -> bool:
        return "build" in self.spec

    def host_path(self, container_path: str) -> Path | None:
        """The host file mounted at ``container_path`` (the deepest mount wins), if any."""
        target = PurePosixPath(container_path)
        best: tuple[Path, PurePosixPath] | None = None
        for source, mount in self.mounts:
            if (target == mount or mount in target.parents) and (
                best is None or len(mount.parts) > len(best[1].parts)
            ):
                best = (source, mount)
        if best is None:
            return None
        return best[0].joinpath(*target.relative_to(best[1]).parts)


class Checker:
    """Collects problems while reading one compose project; see :func:`problems`."""

    def __init__(
        self, compose: Mapping[str, Any], *, project_dir: Path, dockerfile: Dockerfile
    ) -> None:
        self.problems: list[str] = []
        self.project_dir = project_dir
        self.dockerfile = dockerfile
        self.services = {
            name: Service(name, spec) for name, spec in (compose.get("services") or {}).items()
        }

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def run(self) -> list[str]:
        self._check_dockerfile()
        for svc in self.services.values():
            self._mounts(svc)
            svc.argv = self._argv(svc)
            self._listens(svc)
        for svc in self.services.values():
            self._references(svc)
            self._published(svc)
            self._dials(svc)
        return self.problems

    def netns(self, svc: Service) -> list[Service]:
        """The services sharing ``svc``'s network namespace (``network_mode: service:X``)."""
        owner = self._owner(svc)
        return [s for s in self.services.values() if self._owner(s) == owner]

    def _owner(self, svc: Service) -> str:
        mode = str(svc.spec.get("network_mode", ""))
        return mode.removeprefix("service:") if mode.startswith("service:") else svc.name

    def _check_dockerfile(self) -> None:
        df = self.dockerfile
        if df.entrypoint != ("extauthz",):
            self.fail(f"Dockerfile: ENTRYPOINT is {list(df.entrypoint)}, expected ['extauthz']")
            return
        args = self._serve_args("Dockerfile CMD", df.cmd)
        if args is None:
            return
        if df.healthcheck[:3] != ("python", "-m", "extauthz.healthcheck"):
            self.fail(f"Dockerfile: HEALTHCHECK {list(df.healthcheck)} does not ask extauthz")
        elif _host_port(df.healthcheck[-1])[1] != _host_port(args.listen)[1]:
            self.fail(
                f"Dockerfile: HEALTHCHECK asks {df.healthcheck[-1]}, "
                f"but CMD listens on {args.listen}"
            )

    def _serve_args(self, where: str, argv: Sequence[str]) -> argparse.Namespace | None:
        """``argv`` after ``extauthz``, parsed by extauthz's own CLI; must be ``serve``."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = cli.parser().parse_args(list(argv))
        except SystemExit:
            self.fail(f"{where}: `extauthz {shlex.join(argv)}` is refused: {err.getvalue()}")
            return None
        if args.command != "serve":
            self.fail(f"{where}: runs `extauthz {args.command}`, not `extauthz serve`")
            return None
        return args

    def _mounts(self, svc: Service) -> None:
        for volume in svc.spec.get("volumes") or []:
            if isinstance(volume, Mapping):
                source, target = str(volume.get("source", "")), str(volume.get("target", ""))
                if volume.get("type", "bind") != "bind":
                    continue
            else:
                parts = str(volume).split(":")
                if len(parts) < 2:
                    self.fail(f"{svc.name}: volume {volume!r} is not SOURCE:TARGET[:MODE]")
                    continue
                source, target = parts[0], parts[1]
            if not source.startswith((".", "/", "~")):
                self.fail(f"{svc.name}: named volume {source!r}: only bind mounts are expected")
                continue
            host = (self.project_dir / Path(source).expanduser()).resolve()
            if not host.exists():
                self.fail(f"{svc.name}: mounts {source} at {target}, which does not exist")
            svc.mounts.append((host, PurePosixPath(target)))

    def _argv(self, svc: Service) -> tuple[str, ...]:
        entrypoint, command = svc.spec.get("entrypoint"), svc.spec.get("command")
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        if isinstance(command, str):
            command = shlex.split(command)
        if svc.built:
            # Docker: overriding the entrypoint drops the image's CMD.
            base = tuple(entrypoint) if entrypoint is not None else self.dockerfile.entrypoint
            if command is not None:
                return base + tuple(command)
            return base + (self.dockerfile.cmd if entrypoint is None else ())
        return tuple(entrypoint or ()) + tuple(command or ())

    def _listens(self, svc: Service) -> None:
        argv = svc.argv
        if svc.built and argv[:1] == ("extauthz",):
            args = self._serve_args(f"{svc.name}: command", argv[1:])
            if args is None:
                return
            for flag in ("listen", "jwks_listen", "metrics_listen", "admin_listen"):
                value = getattr(args, flag, None)
                if value and not str(value).startswith("unix:"):
                    svc.listens[_host_port(str(value))] = f"extauthz --{flag.replace('_', '-')}"
            if args.policies is not None:
                self._mounted_path(svc, str(args.policies), "--policies")
        elif svc.built and argv[:3] == ("python", "-m", "extauthz.devtools.upstream"):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    args = upstream.parser().parse_args(list(argv[3:]))
            except SystemExit:
                self.fail(f"{svc.name}: echo upstream flags refused: {err.getvalue()}")
                return
            svc.listens[("127.0.0.1", args.port)] = f"echo upstream {args.name}"
        elif svc.image.startswith("envoyproxy/envoy:"):
            self._envoy(svc)
        elif svc.image.startswith("otel/opentelemetry-collector"):
            self._collector(svc)
        elif svc.image.startswith("jaegertracing/jaeger:"):
            for addr, what in (*JAEGER_LISTENS, JAEGER_UI):
                svc.listens[addr] = f"jaeger {what}"
        else:
            self.fail(f"{svc.name}: cannot tell what {svc.image or 'it'} listens on")

    def _mounted_path(self, svc: Service, path: str, what: str) -> Path | None:
        host = svc.host_path(path)
        if host is None or not host.exists():
            state = "is not mounted" if host is None else f"is mounted from {host}, missing"
            self.fail(f"{svc.name}: {what} {path} {state}")
            return None
        return host

    def _config_arg(self, svc: Service, flags: Sequence[str]) -> str | None:
        argv = list(svc.argv)
        for i, arg in enumerate(argv):
            for flag in flags:
                if arg == flag and i + 1 < len(argv):
                    return argv[i + 1]
                if arg.startswith(flag + "="):
                    return arg.split("=", 1)[1]
        self.fail(f"{svc.name}: no {'/'.join(flags)} in {shlex.join(argv)}")
        return None

    def _envoy(self, svc: Service) -> None:
        path = self._config_arg(svc, ("-c", "--config-path"))
        host = self._mounted_path(svc, path, "Envoy config") if path else None
        if host is None:
            return
        svc.envoy = yaml.safe_load(host.read_text())
        for sock, what in _envoy_listeners(svc.envoy):
            svc.listens[sock] = what
        for filename in _find_values(svc.envoy, "filename"):
            self._mounted_path(svc, filename, "Envoy config names file")

    def _collector(self, svc: Service) -> None:
        path = self._config_arg(svc, ("--config",))
        host = self._mounted_path(svc, path, "collector config") if path else None
        if host is None:
            return
        svc.collector = yaml.safe_load(host.read_text())
        for name, receiver in (svc.collector.get("receivers") or {}).items():
            protocols = (receiver or {}).get("protocols") or {"": receiver}
            for proto, conf in protocols.items():
                if conf and "endpoint" in conf:
                    what = f"collector receiver {name} {proto}".rstrip()
                    svc.listens[_host_port(str(conf["endpoint"]))] = what

    def _references(self, svc: Service) -> None:
        mode = str(svc.spec.get("network_mode", ""))
        if mode.startswith("service:") and self._owner(svc) not in self.services:
            self.fail(f"{svc.name}: network_mode {mode}: no such service")
        depends = svc.spec.get("depends_on") or []
        for name in depends:
            if name not in self.services:
                self.fail(f"{svc.name}: depends_on {name!r}: no such service")
            elif isinstance(depends, Mapping):
                cond = (depends[name] or {}).get("condition")
                if cond == "service_healthy" and not self._healthcheck(self.services[name]):
                    self.fail(f"{svc.name}: waits for {name} to be healthy; it has no check")
        if svc.collector is not None:
            self._pipelines(svc)

    def _healthcheck(self, svc: Service) -> tuple[str, ...]:
        spec = svc.spec.get("healthcheck")
        if spec is not None:
            if spec.get("disable"):
                return ()
            test = spec.get("test") or ()
            return tuple(test[1:]) if test[:1] == ["CMD"] else tuple(test)
        return self.dockerfile.healthcheck if svc.built else ()

    def _pipelines(self, svc: Service) -> None:
        conf = svc.collector or {}
        pipelines = (conf.get("service") or {}).get("pipelines") or {}
        for pname, pipe in pipelines.items():
            for kind in ("receivers", "processors", "exporters"):
                for component in pipe.get(kind) or []:
                    if component not in (conf.get(kind) or {}):
                        self.fail(
                            f"{svc.name}: pipeline {pname} uses undefined {kind[:-1]} {component}"
                        )
        traces = pipelines.get("traces") or {}
        if not any(r.split("/")[0] == "otlp" for r in traces.get("receivers") or []):
            self.fail(f"{svc.name}: the traces pipeline does not receive OTLP")
        jaegers = {n for n, s in self.services.items() if s.image.startswith("jaegertracing/")}
        exporters = conf.get("exporters") or {}
        to_jaeger = [
            e
            for e in traces.get("exporters") or []
            if e.split("/")[0] in ("otlp", "otlp_grpc", "otlphttp", "otlp_http")
            and _endpoint_host(str((exporters.get(e) or {}).get("endpoint", ""))) in jaegers
        ]
        if not to_jaeger:
            self.fail(
                f"{svc.name}: the traces pipeline exports to no Jaeger service {sorted(jaegers)}"
            )

    def _published(self, svc: Service) -> None:
        for entry in svc.spec.get("ports") or []:
            if isinstance(entry, Mapping):
                host_ip, target = str(entry.get("host_ip", "")), int(entry["target"])
            else:
                parts = str(entry).rsplit(":", 2)
                host_ip = parts[0] if len(parts) == 3 else ""
                target = int(parts[-1].split("/")[0])
            if host_ip != "127.0.0.1":
                self.fail(f"{svc.name}: publishes {entry!r} beyond 127.0.0.1")
            if svc.spec.get("network_mode"):
                self.fail(f"{svc.name}: publishes a port but shares another service's network")
            self._reach(svc, svc, f"{svc.name}:{target}", f"published port {entry!r}")

    def _dials(self, svc: Service) -> None:
        if svc.envoy is not None:
            for cluster, host, port in _envoy_endpoints(svc.envoy):
                self._dial(svc, host, port, f"Envoy cluster {cluster}")
                static = _cluster(svc.envoy, cluster).get("type", "STATIC") == "STATIC"
                if static and not _is_ip(host):
                    self.fail(f"{svc.name}: STATIC cluster {cluster} names host {host!r}")
        env = svc.spec.get("environment") or {}
        if isinstance(env, list):
            env = dict(str(e).split("=", 1) for e in env)
        for var in _OTEL_ENDPOINTS:
            if var in env:
                url = urlsplit(str(env[var]))
                self._dial(svc, url.hostname or "", url.port or 0, var)
        if svc.collector is not None:
            for name, exporter in (svc.collector.get("exporters") or {}).items():
                if endpoint := (exporter or {}).get("endpoint"):
                    host, port = _endpoint_host_port(str(endpoint))
                    self._dial(svc, host, port, f"collector exporter {name}")
        check = self._healthcheck(svc)
        if check[:3] == ("python", "-m", "extauthz.healthcheck"):
            target = next((a for a in check[3:] if not a.startswith("-")), "")
            host, port = _host_port(target)
            self._dial(svc, host, port, "health check")

    def _dial(self, svc: Service, host: str, port: int, what: str) -> None:
        if host in LOOPBACK:
            self._reach(svc, svc, f"{host}:{port}", what, loopback=True)
            return
        target = self.services.get(host)
        if target is None:
            self.fail(f"{svc.name}: {what} dials {host}:{port}: no compose service {host!r}")
        elif target.spec.get("network_mode"):
            self.fail(f"{svc.name}: {what} dials {host}, which has no address of its own")
        else:
            self._reach(svc, target, f"{host}:{port}", what)

    def _reach(
        self, source: Service, target: Service, address: str, what: str, *, loopback: bool = False
    ) -> None:
        """Fail unless a container in ``target``'s network namespace listens on the port."""
        port = _host_port(address)[1]
        addrs = ANY | LOOPBACK if loopback else ANY
        listening = {
            p: w for s in self.netns(target) for (a, p), w in s.listens.items() if a in addrs
        }
        if port not in listening:
            where = "its own network namespace" if loopback else target.name
            have = ", ".join(f"{p} ({w})" for p, w in sorted(listening.items())) or "nothing"
            self.fail(
                f"{source.name}: {what} dials {address}, but nothing in {where} "
                f"listens there (listening: {have})"
            )


def problems(compose: Mapping[str, Any], *, project_dir: Path, dockerfile: str) -> list[str]:
    """Everything wrong with an interpolated compose file and the Dockerfile's text."""
    df = Dockerfile.parse(dockerfile)
    return Checker(compose, project_dir=project_dir, dockerfile=df).run()


def envoy_configs(compose: Mapping[str, Any], *, project_dir: Path) -> dict[str, dict[str, Any]]:
    """Each Envoy service's config with file names mapped to host paths, for ``validate``."""
    checker = Checker(compose, project_dir=project_dir, dockerfile=Dockerfile((), (), ()))
    out: dict[str, dict[str, Any]] = {}
    for svc in checker.services.values():
        if not svc.image.startswith("envoyproxy/envoy:"):
            continue
        checker._mounts(svc)
        svc.argv = checker._argv(svc)
        checker._envoy(svc)
        if svc.envoy is None:
            raise ValueError(f"{svc.name}: {checker.problems}")
        for node in _find_dicts(svc.envoy, "filename"):
            node["filename"] = str(svc.host_path(node["filename"]))
        out[svc.name] = svc.envoy
    return out


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _endpoint_host(endpoint: str) -> str:
    return _endpoint_host_port(endpoint)[0]


def _endpoint_host_port(endpoint: str) -> tuple[str, int]:
    if "://" in endpoint:
        url = urlsplit(endpoint)
        return url.hostname or "", url.port or 0
    return _host_port(endpoint)


def _find_dicts(node: Any, key: str) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if key in node:
            yield node
        for v in node.values():
            yield from _find_dicts(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _find_dicts(item, key)


def _find_values(node: Any, key: str) -> Iterator[str]:
    for d in _find_dicts(node, key):
        yield str(d[key])


def _envoy_listeners(config: Mapping[str, Any]) -> Iterator[tuple[tuple[str, int], str]]:
    admin = (config.get("admin") or {}).get("address", {}).get("socket_address")
    if admin:
        yield (str(admin["address"]), int(admin["port_value"])), "Envoy admin"
    for listener in (config.get("static_resources") or {}).get("listeners") or []:
        sock = listener.get("address", {}).get("socket_address")
        if sock:
            addr = (str(sock["address"]), int(sock["port_value"]))
            yield addr, f"Envoy listener {listener.get('name')}"


def _cluster(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    for cluster in (config.get("static_resources") or {}).get("clusters") or []:
        if cluster.get("name") == name:
            found: dict[str, Any] = cluster
            return found
    raise KeyError(name)


def _envoy_endpoints(config: Mapping[str, Any]) -> Iterator[tuple[str, str, int]]:
    for cluster in (config.get("static_resources") or {}).get("clusters") or []:
        for group in (cluster.get("load_assignment") or {}).get("endpoints") or []:
            for lb in group.get("lb_endpoints") or []:
                sock = lb.get("endpoint", {}).get("address", {}).get("socket_address")
                if sock:
                    yield cluster["name"], str(sock["address"]), int(sock["port_value"])
