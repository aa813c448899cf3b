"""docker-compose.yml, the Dockerfile and the files they mount, checked without a container engine.

``extauthz.devtools.compose`` generates what the compose file mounts into a temporary
directory; ``extauthz.devtools.composecheck`` then follows every mount, host name and port.
The negative table breaks one thing at a time and shows the checker names it. The Envoy
configs go through the real ``envoy --mode validate``, and the policies mounted into the
extauthz container answer as in the local demo for each sidecar's ``context_extensions``.
"""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extauthz import cli, healthcheck
from extauthz.devtools import compose, composecheck
from extauthz.devtools.envoy import dump_config, free_port, validate
from extauthz.devtools.mesh import Mesh
from extauthz.server import AUTHORIZATION_SERVICE

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
WORKLOADS = ("frontend", "orders", "payments")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> compose.Generated:
    return compose.generate(tmp_path_factory.mktemp("compose"))


def _load(outdir: Path) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    loaded: dict[str, Any] = composecheck.interpolate(raw, {compose.DIR_VARIABLE: str(outdir)})
    return loaded


def _problems(project: dict[str, Any], dockerfile: str | None = None) -> list[str]:
    text = DOCKERFILE.read_text() if dockerfile is None else dockerfile
    return composecheck.problems(project, project_dir=REPO, dockerfile=text)


def test_compose_file_hangs_together(generated: compose.Generated) -> None:
    assert _problems(_load(generated.outdir)) == []


def test_compose_names_what_the_generator_writes(generated: compose.Generated) -> None:
    project = _load(generated.outdir)
    services = project["services"]
    assert set(services) == {
        "extauthz",
        "otel-collector",
        "jaeger",
        *WORKLOADS,
        *(f"{w}-envoy" for w in WORKLOADS),
    }
    mounted = {
        Path(str(v).split(":")[0]).resolve()
        for spec in services.values()
        for v in spec.get("volumes", [])
    }
    written = {*generated.envoy.values(), generated.jwks, generated.collector}
    written |= {generated.certs[k] for w in WORKLOADS for k in ("ca", w, f"{w}-key")}
    assert {p.resolve() for p in written} <= mounted
    # No sidecar sees another workload's key.
    for w in WORKLOADS:
        keys = [v for v in services[f"{w}-envoy"]["volumes"] if "-key.pem" in v]
        assert keys == [
            f"{generated.outdir}/certs/{w}-key.pem:/etc/envoy/certs/workload-key.pem:ro"
        ]


def test_every_sidecar_config_passes_envoy_validate(
    generated: compose.Generated, tmp_path: Path
) -> None:
    configs = composecheck.envoy_configs(_load(generated.outdir), project_dir=REPO)
    assert set(configs) == {f"{w}-envoy" for w in WORKLOADS}
    for name, config in configs.items():
        # The clusters dial compose host names: validate resolves no DNS.
        hosts = {
            c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
                "address"
            ]["socket_address"]["address"]
            for c in config["static_resources"]["clusters"]
        }
        assert hosts["extauthz"] == "extauthz"
        validate(dump_config(config, tmp_path / f"{name}.yaml"))


def test_dockerfile_runs_serve_with_flags_extauthz_accepts() -> None:
    df = composecheck.Dockerfile.parse(DOCKERFILE.read_text())
    assert df.entrypoint == ("extauthz",)
    args = cli.parser().parse_args(list(df.cmd))
    assert args.command == "serve"
    assert args.policies == Path("/etc/extauthz/policies")
    probe = healthcheck.parser().parse_args(list(df.healthcheck[3:]))
    assert probe.target.rsplit(":", 1)[1] == args.listen.rsplit(":", 1)[1]
    assert probe.service == AUTHORIZATION_SERVICE


def test_image_repeats_the_opentelemetry_proto_reinstall() -> None:
    makefile = (REPO / "Makefile").read_text()
    dockerfile = DOCKERFILE.read_text()
    step = "--force-reinstall --no-deps"
    assert step in makefile
    assert step in dockerfile
    assert "opentelemetry-proto==" in dockerfile


# (caller, target, method, path, token, exit code of `extauthz check`): a few steps of
# `extauthz demo`'s scenario, decided by the policies the extauthz container mounts.
DEMO_STEPS = [
    ("frontend", "orders", "GET", "/orders/42", "alice", 0),
    ("frontend", "payments", "POST", "/payments/charge", "alice", 2),
    ("orders", "payments", "POST", "/payments/charge", None, 0),
    ("intruder", "orders", "GET", "/orders", "alice", 2),
    ("orders", "frontend", "GET", "/admin", "alice", 2),
    ("orders", "frontend", "GET", "/admin", "admin", 0),
]


@pytest.mark.parametrize(("caller", "target", "method", "path", "token", "code"), DEMO_STEPS)
def test_mounted_policies_answer_as_the_demo(
    generated: compose.Generated,
    tmp_path: Path,
    caller: str,
    target: str,
    method: str,
    path: str,
    token: str | None,
    code: int,
) -> None:
    project = _load(generated.outdir)
    checker = composecheck.Checker(
        project, project_dir=REPO, dockerfile=composecheck.Dockerfile.parse(DOCKERFILE.read_text())
    )
    assert checker.run() == []
    svc = checker.services["extauthz"]
    args = cli.parser().parse_args(list(svc.argv[1:]))
    # The directory as the container sees it: every file under --policies through the mounts.
    view = tmp_path / "policies"
    root = svc.host_path(str(args.policies))
    assert root is not None
    for src in root.rglob("*"):
        if src.is_file():
            rel = src.relative_to(root)
            mounted = svc.host_path(str(Path(args.policies, rel)))
            assert mounted is not None
            (view / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mounted, view / rel)
    assert (view / "demo-idp.jwks.json").read_text() == generated.jwks.read_text()

    sidecar = checker.services[f"{target}-envoy"].envoy
    assert sidecar is not None
    extensions = [
        per_route["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
        for per_route in _walk(sidecar, "typed_per_filter_config")
    ]
    assert len(extensions) == 1
    request: dict[str, Any] = {
        "method": method,
        "host": f"{target}.shop",
        "path": path,
        "principal": compose.spiffe_id(caller),
        **extensions[0],
    }
    if token:
        request["token"] = generated.tokens[token].read_text().strip()
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    flags = [a for a in svc.argv[1:] if a not in ("--decision-log", "-")]
    flags[flags.index("--policies") + 1] = str(view)
    assert cli.main(["check", *flags[1:], str(tmp_path / "request.yaml")]) == code


def _walk(node: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        here = [node[key]] if isinstance(node.get(key), dict) else []
        return here + [x for v in node.values() for x in _walk(v, key)]
    if isinstance(node, list):
        return [x for item in node for x in _walk(item, key)]
    return []


Mutation = Callable[[dict[str, Any], Path], None]


def _rename_service(old: str, new: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        project["services"][new] = project["services"].pop(old)

    return mutate


def _set_arg(service: str, flag: str, value: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        command = project["services"][service]["command"]
        command[command.index(flag) + 1] = value

    return mutate


def _drop_volume(service: str, target: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        volumes = project["services"][service]["volumes"]
        (drop,) = [v for v in volumes if v.split(":")[1] == target]
        volumes.remove(drop)

    return mutate


def _edit_file(relative: str, old: str, new: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        path = outdir / relative
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))

    return mutate


def _set(service: str, key: str, value: Any) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        project["services"][service][key] = value

    return mutate


def _set_env(service: str, name: str, value: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        project["services"][service]["environment"][name] = value

    return mutate


def _delete(relative: str) -> Mutation:
    def mutate(project: dict[str, Any], outdir: Path) -> None:
        (outdir / relative).unlink()

    return mutate


def _collector_exports_to_debug_only(project: dict[str, Any], outdir: Path) -> None:
    path = outdir / "otel-collector.yaml"
    config = yaml.safe_load(path.read_text())
    config["service"]["pipelines"]["traces"]["exporters"] = ["debug"]
    path.write_text(yaml.safe_dump(config))


BROKEN: list[tuple[str, Mutation, str]] = [
    (
        "extauthz renamed in the compose file only",
        _rename_service("extauthz", "authz"),
        "Envoy cluster extauthz dials extauthz:9191: no compose service 'extauthz'",
    ),
    (
        "collector renamed in the compose file only",
        _rename_service("otel-collector", "collector"),
        "OTEL_EXPORTER_OTLP_ENDPOINT dials otel-collector:4317: no compose service",
    ),
    (
        "jaeger renamed in the compose file only",
        _rename_service("jaeger", "traces"),
        "collector exporter otlp_grpc/jaeger dials jaeger:4317: no compose service 'jaeger'",
    ),
    (
        "extauthz listens on another port",
        _set_arg("extauthz", "--listen", "0.0.0.0:9192"),
        "Envoy cluster extauthz dials extauthz:9191, but nothing in extauthz listens there",
    ),
    (
        "a workload listens on another port",
        _set_arg("orders", "--port", "8081"),
        "orders-envoy: Envoy cluster upstream dials 127.0.0.1:8080, but nothing in its own",
    ),
    (
        "one sidecar dials extauthz on another port",
        _edit_file("envoy/payments.yaml", "port_value: 9191", "port_value: 9190"),
        "payments-envoy: Envoy cluster extauthz dials extauthz:9190",
    ),
    (
        "one sidecar's peer cluster dials a missing service",
        _edit_file("envoy/frontend.yaml", "address: orders\n", "address: order\n"),
        "frontend-envoy: Envoy cluster to_orders dials order:8443: no compose service",
    ),
    (
        "the collector listens on another OTLP port",
        _edit_file("otel-collector.yaml", "0.0.0.0:4317", "0.0.0.0:4316"),
        "Envoy cluster otel_collector dials otel-collector:4317, but nothing",
    ),
    (
        "extauthz exports to another collector port",
        _set_env("extauthz", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4319"),
        "OTEL_EXPORTER_OTLP_ENDPOINT dials otel-collector:4319, but nothing",
    ),
    (
        "a sidecar's key is not mounted",
        _drop_volume("orders-envoy", "/etc/envoy/certs/workload-key.pem"),
        "orders-envoy: Envoy config names file /etc/envoy/certs/workload-key.pem is not mounted",
    ),
    (
        "the policies are not mounted",
        _drop_volume("extauthz", "/etc/extauthz/policies"),
        "extauthz: --policies /etc/extauthz/policies is not mounted",
    ),
    (
        "a mounted file was not generated",
        _delete("certs/payments.pem"),
        "payments-envoy: mounts",
    ),
    (
        "the Jaeger UI is published on every interface",
        _set("jaeger", "ports", ["16686:16686"]),
        "jaeger: publishes '16686:16686' beyond 127.0.0.1",
    ),
    (
        "a published port nothing listens on",
        _set("orders", "ports", ["127.0.0.1:8444:8444"]),
        "orders: published port '127.0.0.1:8444:8444' dials orders:8444, but nothing",
    ),
    (
        "an unknown extauthz flag",
        _set("extauthz", "command", ["serve", "--listen", "0.0.0.0:9191", "--no-such-flag"]),
        "unrecognized arguments: --no-such-flag",
    ),
    (
        "extauthz's health check is disabled while the sidecars wait for it",
        _set("extauthz", "healthcheck", {"disable": True}),
        "frontend-envoy: waits for extauthz to be healthy; it has no check",
    ),
    (
        "the traces pipeline bypasses Jaeger",
        _collector_exports_to_debug_only,
        "otel-collector: the traces pipeline exports to no Jaeger service ['jaeger']",
    ),
    (
        "a sidecar in a network namespace that does not exist",
        _set("orders-envoy", "network_mode", "service:order"),
        "orders-envoy: network_mode service:order: no such service",
    ),
]


@pytest.mark.parametrize(
    ("mutation", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_checker_names_what_is_broken(
    generated: compose.Generated, tmp_path: Path, mutation: Mutation, expected: str
) -> None:
    outdir = tmp_path / "gen"
    shutil.copytree(generated.outdir, outdir)
    project = _load(outdir)
    mutation(project, outdir)
    found = _problems(project)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"127.0.0.1:9191"]', '"127.0.0.1:9192"]', "HEALTHCHECK asks 127.0.0.1:9192, but CMD"),
        ('"/etc/extauthz/policies"]', '"/p", "--bogus"]', "unrecognized arguments: --bogus"),
        ('ENTRYPOINT ["extauthz"]', 'ENTRYPOINT ["python"]', "ENTRYPOINT is ['python']"),
    ],
)
def test_checker_names_a_broken_dockerfile(
    generated: compose.Generated, old: str, new: str, expected: str
) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    found = _problems(_load(generated.outdir), text.replace(old, new))
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${D:-./.demo}/x", {}, "./.demo/x"),
        ("${D:-./.demo}/x", {"D": "/tmp/g"}, "/tmp/g/x"),
        ("${D:-./.demo}/x", {"D": ""}, "./.demo/x"),
        ("${D}/x", {"D": "/g"}, "/g/x"),
        ("$$HOME", {}, "$HOME"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert composecheck.interpolate({"a": [text]}, env) == {"a": [expected]}


def test_interpolate_refuses_an_unset_variable_without_default() -> None:
    with pytest.raises(ValueError, match=r"\$\{D\} is not set"):
        composecheck.interpolate("${D}/x", {})


def test_generator_main_prints_the_published_ports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compose.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    project = yaml.safe_load(COMPOSE_FILE.read_text())
    orders = compose.published_port(project, "orders", compose.INBOUND_PORT)
    assert f"https://localhost:{orders}/orders/42" in out
    assert f"export {compose.DIR_VARIABLE}={tmp_path}" in out
    assert (tmp_path / "envoy" / "orders.yaml").is_file()


def test_generator_main_refuses_files_the_compose_file_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("0.0.0.0:9191", "0.0.0.0:9192"))
    assert compose.main([str(tmp_path / "out"), "--compose-file", str(broken)]) == 1
    assert "dials extauthz:9191, but nothing in extauthz listens" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["127.0.0.1:8444:8443", "127.0.0.1:8444:8443/tcp", "8444:8443"])
def test_published_port(entry: str) -> None:
    project = {"services": {"orders": {"ports": [entry]}}}
    assert compose.published_port(project, "orders", 8443) == 8444


def test_outbound_cluster_verifies_the_peer_spiffe_id() -> None:
    config = compose.sidecar_config("frontend")
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert {"to_orders", "to_payments"} <= clusters.keys()
    assert "to_frontend" not in clusters
    tls = clusters["to_orders"]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://demo.local/ns/shop/sa/orders"}}
    ]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == (
        "/etc/envoy/certs/workload.pem"
    )
    listeners = {lsn["name"]: lsn for lsn in config["static_resources"]["listeners"]}
    assert listeners["outbound"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": compose.OUTBOUND_PORT,
    }


# --- the image's health check ---------------------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def health_server() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set(AUTHORIZATION_SERVICE, SERVING)
    servicer.set("", SERVING)
    servicer.set("draining", NOT_SERVING)
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 0, ""),
        (["--service", ""], 0, ""),
        (["--service", "draining"], 1, "(draining): NOT_SERVING"),
        (["--service", "nope"], 1, "(nope): unreachable (NOT_FOUND)"),
    ],
)
def test_healthcheck(
    health_server: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    assert healthcheck.main([health_server, *args]) == code
    assert message in capsys.readouterr().err


def test_healthcheck_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "0.5"]) == 1
    assert "unreachable (" in capsys.readouterr().err


def test_healthcheck_default_service_is_the_servers() -> None:
    assert healthcheck.AUTHORIZATION_SERVICE == AUTHORIZATION_SERVICE


# --- the echo workload's command line --------------------------------------------------


def test_upstream_command_serves_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extauthz.devtools.upstream",
            "--name",
            "orders",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"echo upstream 'orders' on 127.0.0.1:{port}"
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{port}/orders/1", timeout=5
        ) as resp:
            assert json.loads(resp.read())["service"] == "orders"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_generated_sidecars_differ_from_the_demo_only_in_addresses(
    generated: compose.Generated,
) -> None:
    # The demo's rendering with the same ports and files: any other difference (filters,
    # ext_authz settings, context_extensions) would mean two sources of truth.
    from extauthz.devtools.envoy import render_sidecar

    for name in WORKLOADS:
        ours = yaml.safe_load(generated.envoy[name].read_text())
        certs = {k: Path(compose.ENVOY_CERTS, f) for k, f in compose.CONTAINER_CERTS.items()}
        demo = render_sidecar(
            compose.SIDECAR_TEMPLATE,
            listen_port=compose.INBOUND_PORT,
            admin_port=compose.ADMIN_PORT,
            extauthz_port=compose.EXTAUTHZ_PORT,
            upstream_port=compose.UPSTREAM_PORT,
            certs=certs,
            context_extensions={"namespace": "shop", "labels": f"app={name}"},
            collector_port=compose.OTLP_GRPC_PORT,
            service_name=name,
        )
        ours_inbound = copy.deepcopy(ours["static_resources"]["listeners"][0])
        assert ours_inbound["address"]["socket_address"]["address"] == "0.0.0.0"
        ours_inbound["address"]["socket_address"]["address"] = "127.0.0.1"
        assert ours_inbound == demo["static_resources"]["listeners"][0]


# --- render_sidecar's container options ------------------------------------------------


def _render(**overrides: Any) -> dict[str, Any]:
    from extauthz.devtools.envoy import render_sidecar

    kwargs: dict[str, Any] = {
        "listen_port": 8443,
        "admin_port": 9901,
        "extauthz_port": 9191,
        "upstream_port": 8080,
        "certs": {k: Path("/c", k) for k in ("ca", "cert", "key")},
    }
    kwargs.update(overrides)
    return render_sidecar(compose.SIDECAR_TEMPLATE, **kwargs)


def _cluster_address(config: dict[str, Any], name: str) -> tuple[str, str]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    sock = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return cluster["type"], sock["socket_address"]["address"]


@pytest.mark.parametrize(
    ("hosts", "cluster", "expected"),
    [
        (None, "extauthz", ("STATIC", "127.0.0.1")),
        ({"extauthz": "extauthz"}, "extauthz", ("STRICT_DNS", "extauthz")),
        ({"extauthz": "10.0.0.5"}, "extauthz", ("STATIC", "10.0.0.5")),
        ({"otel_collector": "otel-collector"}, "otel_collector", ("STRICT_DNS", "otel-collector")),
        ({"otel_collector": "otel-collector"}, "upstream", ("STATIC", "127.0.0.1")),
    ],
)
def test_render_sidecar_hosts(
    hosts: dict[str, str] | None, cluster: str, expected: tuple[str, str]
) -> None:
    assert _cluster_address(_render(hosts=hosts), cluster) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hosts": {"nope": "x"}}, "no static cluster named 'nope'"),
        (
            {"hosts": {"extauthz": "x"}, "extauthz_port": None, "extauthz_unix": "@s"},
            "hosts\\['extauthz'\\] names a TCP host",
        ),
    ],
)
def test_render_sidecar_hosts_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _render(**overrides)


@pytest.mark.parametrize(
    ("kwargs", "address"), [({}, "127.0.0.1"), ({"listen_address": "0.0.0.0"}, "0.0.0.0")]
)
def test_render_sidecar_listen_address(kwargs: dict[str, Any], address: str) -> None:
    (inbound,) = [
        lsn
        for lsn in _render(**kwargs)["static_resources"]["listeners"]
        if lsn["name"] == "inbound"
    ]
    assert inbound["address"]["socket_address"]["address"] == address


# --- the outbound listener, live on 127.0.0.1 ------------------------------------------


@dataclass
class Outbound:
    mesh: Mesh
    port: int


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbound]:
    """frontend's sidecar with only its outbound in use, in front of the demo's orders.

    ``payments`` is deliberately pointed at orders' sidecar: the SAN check must refuse it.
    """
    from extauthz.devtools.envoy import EnvoyProcess, render_sidecar

    workdir = tmp_path_factory.mktemp("outbound")
    with Mesh(workdir, workloads=("orders",), clients=("frontend",)) as mesh:
        certs = {
            "ca": workdir / "certs" / "ca.pem",
            "cert": workdir / "certs" / "frontend.pem",
            "key": workdir / "certs" / "frontend-key.pem",
        }
        admin, port = free_port(), free_port()
        config = render_sidecar(
            compose.SIDECAR_TEMPLATE,
            listen_port=free_port(),
            admin_port=admin,
            extauthz_port=mesh.extauthz_port,
            upstream_port=free_port(),
            certs=certs,
        )
        orders = ("127.0.0.1", mesh.services["orders"].port)
        compose.add_outbound(
            config, peers={"orders": orders, "payments": orders}, certs=certs, port=port
        )
        with EnvoyProcess(config, workdir=workdir, admin_port=admin):
            yield Outbound(mesh, port)


@pytest.mark.parametrize(
    ("host", "with_token", "status"),
    [
        ("orders.shop", True, 200),
        ("orders", True, 200),
        ("orders.shop:15001", True, 200),
        ("orders.shop", False, 403),  # orders' inbound ext_authz still decides
        ("payments.shop", True, 503),  # the server is not payments: handshake refused
        ("intruder.shop", True, 404),  # no route
    ],
)
def test_outbound_originates_mtls_with_the_workload_svid(
    outbound: Outbound, host: str, with_token: bool, status: int
) -> None:
    upstream = outbound.mesh.services["orders"].upstream
    assert upstream is not None
    before = upstream.hits
    headers = {"host": host}
    if with_token:
        headers["authorization"] = "Bearer " + outbound.mesh.idp.token("alice", audience="shop")
    conn = http.client.HTTPConnection("127.0.0.1", outbound.port, timeout=5)
    try:
        conn.request("GET", "/orders/42", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == status, body
    assert upstream.hits == before + (status == 200)
    if status == 200:
        seen = json.loads(body)
        assert seen["service"] == "orders"
        assert seen["headers"]["x-extauthz-spiffe-id"] == compose.spiffe_id("frontend")
