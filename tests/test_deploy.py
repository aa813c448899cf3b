"""Deployment: the Kubernetes and Istio manifests under deploy/, and envoy/front-proxy.yaml.

The manifests are checked for what a cluster would only tell us at run time: flags extauthz
really has, ports and names that agree across resources, probes on health services extauthz
really serves, policies that load. The front proxy is validated by the real Envoy and run
against two extauthz replicas, one of which is stopped under load.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz import __version__, policytest
from extauthz.authorizer import Authorizer
from extauthz.cli import parser
from extauthz.config import Settings
from extauthz.decision import Outcome
from extauthz.devtools.envoy import (
    EnvoyProcess,
    dump_config,
    free_port,
    load_config,
    render_front_proxy,
    validate,
)
from extauthz.devtools.kube import policy_configmap, policy_configmap_files
from extauthz.devtools.mesh import wait_serving
from extauthz.devtools.pki import write_pki
from extauthz.devtools.upstream import EchoServer
from extauthz.duration import parse_duration
from extauthz.policy.engine import PolicySet
from extauthz.policy.lint import lint
from extauthz.reload import PolicyReloader, fingerprint
from extauthz.request import CheckInput
from extauthz.server import AUTHORIZATION_SERVICE, POLICY_HEALTH_SERVICE, Server
from extauthz.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
POLICIES = REPO / "policies"
FRONT_PROXY = REPO / "envoy" / "front-proxy.yaml"

# What grpc.health.v1 answers for on the check port (extauthz/server.py, Server.start).
SERVED_HEALTH_SERVICES = {"", AUTHORIZATION_SERVICE, POLICY_HEALTH_SERVICE}
KNOWN_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("install.istio.io/v1alpha1", "IstioOperator"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.istio.io/v1", "DestinationRule"),
}
# Every field of Istio's MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider
# (istio/api mesh/v1alpha1/config.proto): anything else is a typo Istio would not apply.
ISTIO_GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
}
ISTIO_NAMESPACE_OF_EXTAUTHZ = "extauthz-system"  # where docs/deploy.md applies deploy/kubernetes


# --- loading ------------------------------------------------------------------------------


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            out.append((path, doc))
    return out


MANIFESTS = _manifests()


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in MANIFESTS
        if d["kind"] == kind and (name is None or d.get("metadata", {}).get("name") == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _all(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in MANIFESTS if d["kind"] == kind]


DEPLOYMENT = _one("Deployment", "extauthz")
POD = DEPLOYMENT["spec"]["template"]
(CONTAINER,) = POD["spec"]["containers"]


def _serve_args() -> Any:
    """The container's command line, parsed by extauthz's own argument parser."""
    assert CONTAINER["command"] == ["extauthz"]
    return parser().parse_args(CONTAINER["args"])


def _container_port(name_or_number: str | int) -> int:
    for port in CONTAINER["ports"]:
        if name_or_number in (port["name"], port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"the container has no port {name_or_number!r}")


def _configmap_tree(directory: Path) -> Path:
    """Write the shipped ConfigMap's files as the kubelet would mount them (flat)."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, text in _one("ConfigMap", "extauthz-policies")["data"].items():
        (directory / key).write_text(text)
    return directory


# --- every manifest -----------------------------------------------------------------------


def test_every_manifest_is_a_known_kind_with_a_name() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for _, d in MANIFESTS}
    assert kinds <= KNOWN_KINDS, kinds - KNOWN_KINDS
    for path, doc in MANIFESTS:
        if doc["kind"] in {"Kustomization", "IstioOperator"}:
            continue
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path


def test_kubernetes_manifests_are_namespace_agnostic_and_all_in_the_kustomization() -> None:
    kube = DEPLOY / "kubernetes"
    for path, doc in MANIFESTS:
        if path.parent == kube:
            assert "namespace" not in doc.get("metadata", {}), f"{path} names a namespace"
    kustomization = _one("Kustomization")
    assert "namespace" not in kustomization
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in kube.glob("*.yaml")} - {"kustomization.yaml"}


# --- Deployment ---------------------------------------------------------------------------


def test_deployment_runs_real_serve_flags_on_the_ports_and_files_it_declares() -> None:
    args = _serve_args()
    assert args.command == "serve"
    host, _, port = args.listen.rpartition(":")
    assert host == "0.0.0.0"  # the Service and the kubelet reach the pod IP
    assert int(port) == _container_port("grpc") == 9191

    # --policies is where the ConfigMap is mounted, whole (no items: see test below).
    (mount,) = (m for m in CONTAINER["volumeMounts"] if m["mountPath"] == str(args.policies))
    assert mount["readOnly"] is True
    (volume,) = (v for v in POD["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == _one("ConfigMap", "extauthz-policies")["metadata"]["name"]
    assert "items" not in volume["configMap"]

    assert args.reload_interval > 0  # ConfigMap updates are picked up without a restart
    # Behind Istio sidecars (APPEND_FORWARD) any mesh workload could put its own element
    # first in x-forwarded-client-cert: the shipped Deployment must not trust it.
    assert args.trust_xfcc is False
    assert args.xff_trusted_hops == 0
    # preStop + drain + final span flush fit in the termination grace period.
    pre_stop = CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + args.grace + 3 < POD["spec"]["terminationGracePeriodSeconds"]
    assert CONTAINER["image"].rpartition(":")[2] == __version__


def test_probes_ask_health_services_extauthz_serves() -> None:
    probes = {k: CONTAINER[k]["grpc"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, grpc_probe in probes.items():
        assert grpc_probe["port"] == _container_port("grpc"), kind
        assert grpc_probe["service"] in SERVED_HEALTH_SERVICES, kind
        # A failed policy reload must not unready every replica at once.
        assert grpc_probe["service"] != POLICY_HEALTH_SERVICE, kind
    assert probes["readinessProbe"]["service"] == AUTHORIZATION_SERVICE
    assert probes["startupProbe"]["service"] == AUTHORIZATION_SERVICE


async def test_the_probed_health_services_report_serving_in_process() -> None:
    server = Server(Authorizer(PolicySet.empty()), Telemetry(None), listen="127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = CONTAINER[kind]["grpc"]["service"]
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, kind
    finally:
        await server.stop()


def test_pod_runs_non_root_read_only_without_api_access() -> None:
    pod_sc = POD["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = CONTAINER["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert POD["spec"]["automountServiceAccountToken"] is False
    assert POD["spec"]["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    # Python writes nowhere but /tmp (an emptyDir) and keeps no bytecode cache.
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert any(m["mountPath"] == "/tmp" for m in CONTAINER["volumeMounts"])
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_replicas_are_spread_and_selected_by_the_pod_labels() -> None:
    labels = POD["metadata"]["labels"]
    selector = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert DEPLOYMENT["spec"]["replicas"] >= 2
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (anti,) = POD["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    for spread in POD["spec"]["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"] == selector


# --- Service, PDB, HPA --------------------------------------------------------------------


def test_services_select_the_pods_and_reach_the_grpc_port() -> None:
    labels = POD["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in _all("Service")}
    assert set(services) == {"extauthz", "extauthz-headless"}
    assert services["extauthz-headless"]["spec"]["clusterIP"] == "None"
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= labels.items()
        (port,) = svc["spec"]["ports"]
        assert port["port"] == 9191
        assert _container_port(port["targetPort"]) == _container_port("grpc")
        assert port["appProtocol"] == "grpc"
        assert port["name"] == "grpc"


def test_pdb_keeps_one_replica_of_these_pods() -> None:
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= POD["metadata"]["labels"].items()


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": DEPLOYMENT["apiVersion"],
        "kind": "Deployment",
        "name": DEPLOYMENT["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] == DEPLOYMENT["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # minAvailable 1 leaves at least one replica a drain may move.
    assert hpa["spec"]["minReplicas"] > _one("PodDisruptionBudget")["spec"]["minAvailable"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in CONTAINER["resources"]["requests"]  # Utilization is relative to it


# --- ConfigMap ----------------------------------------------------------------------------


def test_configmap_is_generated_from_the_policies_directory() -> None:
    shipped = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    assert shipped == policy_configmap(policy_configmap_files(POLICIES)), (
        "deploy/kubernetes/configmap.yaml is stale: "
        "python -m extauthz.devtools.kube policies/ > deploy/kubernetes/configmap.yaml"
    )


def test_configmap_policies_load_lint_clean_and_pass_the_policy_tests(tmp_path: Path) -> None:
    tree = _configmap_tree(tmp_path / "policies")
    loaded = PolicySet.load(tree)
    original = PolicySet.load(POLICIES)
    assert not loaded.source.warnings
    assert lint(loaded) == []
    assert sorted(p.key for p in loaded.authz) == sorted(p.key for p in original.authz)
    assert sorted(p.key for p in loaded.authn) == sorted(p.key for p in original.authn)
    # The repository's policy tests pass against the ConfigMap's copy, too.
    for case_file in POLICIES.rglob("*.test.yaml"):
        shutil.copy(case_file, tree / case_file.name)
    report = policytest.run(tree)
    assert report.results
    assert report.passed, [r.problems for r in report.results if not r.passed]


def _kubelet_volume(root: Path, files: Mapping[str, str], version: str) -> None:
    """The layout the kubelet writes a ConfigMap volume in: a timestamped directory, the
    ``..data`` symlink to it (swapped atomically on update), and one symlink per key."""
    data = root / f"..{version}"
    for key, text in files.items():
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        (data / key).write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")
    for top in {Path(key).parts[0] for key in files}:
        link = root / top
        if not link.is_symlink():
            link.symlink_to(Path("..data") / top)


async def test_a_configmap_update_reloads_through_the_kubelet_symlink_swap(tmp_path: Path) -> None:
    files = dict(_one("ConfigMap", "extauthz-policies")["data"])
    root = tmp_path / "volume"
    root.mkdir()
    _kubelet_volume(root, files, "2026_01_01_00_00_00.1")
    authorizer = Authorizer(PolicySet.load(root), Settings())
    reloader = PolicyReloader(authorizer, root, root_namespace="istio-system")
    frontend_charges = CheckInput(
        method="POST",
        path="/payments/charge",
        source_principal="spiffe://demo.local/ns/shop/sa/frontend",
        context_extensions={"namespace": "shop", "labels": "app=payments"},
    )
    assert authorizer.check(frontend_charges).reason == "no_allow_policy_matched"

    before = fingerprint(root, ())
    files["shop.payments.yaml"] = files["shop.payments.yaml"].replace(
        "principals: [demo.local/ns/shop/sa/orders]",
        "principals: [demo.local/ns/shop/sa/orders, demo.local/ns/shop/sa/frontend]",
    )
    _kubelet_volume(root, files, "2026_01_01_00_01_00.2")
    assert fingerprint(root, ()) != before
    status = await reloader.reload()
    assert status.ok
    assert status.reloads == 1
    assert authorizer.check(frontend_charges).outcome is Outcome.ALLOW


def _flat_volume(tmp_path: Path, files: dict[str, str]) -> Path:
    flat = tmp_path / "flat"
    flat.mkdir()
    _kubelet_volume(flat, files, "2026_01_01_00_00_00.1")
    return flat


def test_subdirectory_items_load_through_the_symlinked_directories(tmp_path: Path) -> None:
    # What `items: [{key: shop.orders.yaml, path: shop/orders.yaml}]` produces: `shop` is a
    # symlink into `..data`. The loader follows it (it once skipped it silently).
    root = tmp_path / "volume"
    root.mkdir()
    files = _one("ConfigMap", "extauthz-policies")["data"]
    nested = {
        (k.replace("shop.", "shop/", 1) if k.startswith("shop.") else k): v
        for k, v in files.items()
    }
    _kubelet_volume(root, nested, "2026_01_01_00_00_00.1")
    assert (root / "shop").is_symlink()
    flat = PolicySet.load(_flat_volume(tmp_path, files))
    assert {p.key for p in PolicySet.load(root).authz} == {p.key for p in flat.authz} != set()
    assert not any("/" in key for key in files)  # the shipped keys are flat


# --- Istio --------------------------------------------------------------------------------


def _istio_provider() -> dict[str, Any]:
    (provider,) = _one("IstioOperator")["spec"]["meshConfig"]["extensionProviders"]
    return provider  # type: ignore[no-any-return]


def test_istio_provider_uses_only_istio_fields_and_reaches_the_service() -> None:
    provider = _istio_provider()
    grpc_provider = provider["envoyExtAuthzGrpc"]
    assert set(grpc_provider) <= ISTIO_GRPC_PROVIDER_FIELDS, set(grpc_provider)
    service = _one("Service", "extauthz")
    assert (
        grpc_provider["service"]
        == f"{service['metadata']['name']}.{ISTIO_NAMESPACE_OF_EXTAUTHZ}.svc.cluster.local"
    )
    assert grpc_provider["port"] == service["spec"]["ports"][0]["port"]
    assert grpc_provider["failOpen"] is False
    assert grpc_provider["statusOnError"] == "503"
    assert 0 < parse_duration(grpc_provider["timeout"]) <= 1


def test_custom_policy_names_the_mesh_provider() -> None:
    policy = _one("AuthorizationPolicy", "ext-authz")
    assert policy["apiVersion"] == "security.istio.io/v1"
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == _istio_provider()["name"]
    assert policy["spec"]["rules"] == [{}]


def test_istio_destination_rule_ejects_failing_replicas_of_the_provider_service() -> None:
    rule = _one("DestinationRule", "extauthz")
    assert rule["spec"]["host"] == _istio_provider()["envoyExtAuthzGrpc"]["service"]
    assert rule["metadata"]["namespace"] == ISTIO_NAMESPACE_OF_EXTAUTHZ
    outlier = rule["spec"]["trafficPolicy"]["outlierDetection"]
    assert outlier["consecutiveGatewayErrors"] > 0
    assert outlier["maxEjectionPercent"] <= 50


NAMESPACE_WIDE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-callers, namespace: shop}
spec:
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/orders]}}]
"""


def _istio_check(
    caller: str, *, destination: str = "payments", td: str = "cluster.local"
) -> CheckInput:
    """What an Istio sidecar sends: principals from its mTLS, no context_extensions."""
    return CheckInput(
        method="POST",
        path="/payments/charge",
        source_principal=f"spiffe://{td}/ns/shop/sa/{caller}",
        destination_principal=f"spiffe://{td}/ns/shop/sa/{destination}" if destination else "",
    )


def test_under_istio_the_workload_is_found_as_docs_deploy_md_says(tmp_path: Path) -> None:
    """docs/deploy.md's claim, against Authorizer._workload: no context_extensions, so the
    namespace is --namespace, else the destination principal's; labels only from --labels."""
    (tmp_path / "p.yaml").write_text(NAMESPACE_WIDE)
    namespace_wide = PolicySet.load(tmp_path)

    # Namespace-wide policies work from the destination principal alone.
    authz = Authorizer(namespace_wide, Settings())
    assert authz.check(_istio_check("orders")).outcome is Outcome.ALLOW
    assert authz.check(_istio_check("frontend")).reason == "no_allow_policy_matched"
    # No destination principal (e.g. plain-text traffic) and no --namespace: refused.
    assert authz.check(_istio_check("frontend", destination="")).reason == "workload_unknown"
    # --namespace comes *before* the destination principal: one extauthz per namespace.
    elsewhere = Authorizer(namespace_wide, Settings(workload_namespace="elsewhere"))
    assert elsewhere.check(_istio_check("frontend")).outcome is Outcome.ALLOW

    # Label-selecting policies (the shipped examples) need labels, which Istio cannot send.
    examples = PolicySet.load(_configmap_tree(tmp_path / "examples"))
    orders = _istio_check("orders", td="demo.local")
    assert Authorizer(examples, Settings()).check(orders).reason == "workload_unknown"
    with_labels = Authorizer(examples, Settings(workload_labels="app=payments"))
    decision = with_labels.check(orders)
    assert decision.outcome is Outcome.ALLOW
    assert decision.policy == "shop/payments"


# --- envoy/front-proxy.yaml ---------------------------------------------------------------


def _walk(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in _walk(v, key)
        ]
    if isinstance(node, list):
        return [x for item in node for x in _walk(item, key)]
    return []


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_front_proxy_fails_closed_and_names_the_workload_on_every_route() -> None:
    config = load_config(FRONT_PROXY)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (hcm,) = (t for t in _walk(config, "typed_config") if "forward_client_cert_details" in t)
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    assert hcm["use_remote_address"] is True
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True

    (authz,) = (f["typed_config"] for f in hcm["http_filters"] if "ext_authz" in f["name"])
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["include_peer_certificate"] is True
    assert "with_request_body" not in authz
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz"
    timeout = parse_duration(authz["grpc_service"]["timeout"])
    assert 0 < timeout <= 0.5
    # Envoy turns the retry back-off's max_interval into the per-try timeout too; shorter
    # than the check's timeout, it cuts off slow but healthy replicas.
    retry = authz["grpc_service"]["retry_policy"]
    assert parse_duration(retry["retry_back_off"]["max_interval"]) >= timeout
    assert {"connect-failure", "reset"} <= set(retry["retry_on"].split(","))

    clusters = _clusters(config)
    routes = _walk(config, "routes")[0]
    targets = {r["route"]["cluster"] for r in routes}
    assert len(targets) == 2
    assert targets <= clusters.keys()
    selected = {
        f"app={v}"
        for p in PolicySet.load(POLICIES).authz
        for v in (p.scope.match_labels or {}).values()
    }
    for route in routes:
        per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
        ext = per_route["check_settings"]["context_extensions"]
        assert ext["namespace"] == "shop"
        assert ext["labels"] in selected  # a workload the example policies know


def test_front_proxy_balances_and_health_checks_several_extauthz_replicas() -> None:
    extauthz = _clusters(load_config(FRONT_PROXY))["extauthz"]
    endpoints = [lb for g in extauthz["load_assignment"]["endpoints"] for lb in g["lb_endpoints"]]
    assert len(endpoints) >= 2
    assert extauthz["lb_policy"] == "ROUND_ROBIN"
    options = extauthz["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(options)
    (check,) = extauthz["health_checks"]
    assert check["grpc_health_check"]["service_name"] == AUTHORIZATION_SERVICE
    assert check["grpc_health_check"]["service_name"] in SERVED_HEALTH_SERVICES
    assert parse_duration(check["interval"]) <= 2
    outlier = extauthz["outlier_detection"]
    assert outlier["consecutive_gateway_failure"] > 0
    assert outlier["enforcing_consecutive_gateway_failure"] == 100
    assert outlier["max_ejection_percent"] <= 50


@pytest.fixture
def edge_certs(tmp_path: Path) -> dict[str, Path]:
    return write_pki(
        tmp_path / "certs",
        "demo.local",
        {
            "edge": "spiffe://demo.local/ns/edge/sa/front-proxy",
            "orders": "spiffe://demo.local/ns/shop/sa/orders",
            "frontend": "spiffe://demo.local/ns/shop/sa/frontend",
        },
    )


def _render(pki: Mapping[str, Path], /, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "listen_port": free_port(),
        "admin_port": free_port(),
        "extauthz_ports": [free_port(), free_port()],
        "upstream_ports": {"frontend": free_port(), "payments": free_port()},
        "certs": {"ca": pki["ca"], "cert": pki["edge"], "key": pki["edge-key"]},
    }
    kwargs.update(overrides)
    return render_front_proxy(FRONT_PROXY, **kwargs)


def test_front_proxy_validates_with_real_envoy(tmp_path: Path, edge_certs: dict[str, Path]) -> None:
    # As shipped, with the certificate files it names (edge.pem, edge-key.pem, ca.pem).
    shipped = FRONT_PROXY.read_text().replace("/etc/extauthz/certs/", f"{edge_certs['ca'].parent}/")
    validate(dump_config(yaml.safe_load(shipped), tmp_path / "shipped.yaml"))

    config = _render(edge_certs, extauthz_ports=[1111, 2222, 3333])
    assert {s["address"] for s in _walk(config, "socket_address")} == {"127.0.0.1"}
    assert "/etc/extauthz" not in yaml.safe_dump(config)
    endpoints = _clusters(config)["extauthz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        1111,
        2222,
        3333,
    ]
    validate(dump_config(config, tmp_path / "front-proxy.yaml"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"extauthz_ports": []}, "at least one"),
        ({"upstream_ports": {"frontend": 1}}, r"no port for cluster\(s\) \['payments'\]"),
        ({"upstream_ports": {"frontend": 1, "payments": 2, "orders": 3}}, "orders"),
        ({"certs": {}}, "missing"),
    ],
)
def test_render_front_proxy_rejects_bad_arguments(
    edge_certs: dict[str, Path], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _render(edge_certs, **overrides)


# --- live: two extauthz replicas behind the front proxy -----------------------------------


@dataclass
class Replica:
    """One `extauthz serve` process, started with the Deployment's own arguments."""

    port: int
    policies: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = list(CONTAINER["args"])
        args[args.index("--listen") + 1] = f"127.0.0.1:{self.port}"
        args[args.index("--policies") + 1] = str(self.policies)
        env = {**os.environ, **{e["name"]: e["value"] for e in CONTAINER["env"]}}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "extauthz", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        wait_serving(f"127.0.0.1:{self.port}", self.proc, self.log)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


@dataclass
class Edge:
    port: int
    certs: Mapping[str, Path]
    envoy: EnvoyProcess

    def call(
        self,
        caller: str | None,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(caller), timeout=5
        )
        try:
            conn.request(method, path, headers={"host": "shop.example", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def context(self, caller: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs["ca"]))
        ctx.check_hostname = False  # the edge's certificate names a SPIFFE ID, not a host
        if caller is not None:
            ctx.load_cert_chain(self.certs[caller], self.certs[f"{caller}-key"])
        return ctx

    def hosts(self) -> dict[int, dict[str, str]]:
        """Per extauthz replica (by port): Envoy's host stats and health flags."""
        out: dict[int, dict[str, str]] = {}
        for line in self.envoy.admin_get("/clusters").splitlines():
            # extauthz::127.0.0.1:9191::rq_total::12 (cluster-wide lines have no address)
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "extauthz" and parts[1].startswith("127.0.0.1:"):
                out.setdefault(int(parts[1].rpartition(":")[2]), {})[parts[2]] = parts[3]
        return out

    def checks(self) -> dict[int, int]:
        return {port: int(s["rq_total"]) for port, s in self.hosts().items()}

    def diagnosis(self) -> str:
        """Envoy's view of the checks, for assertion messages."""
        stats = [
            line
            for line in self.envoy.admin_get("/stats?filter=extauthz|ext_authz").splitlines()
            if not line.endswith(": 0")
        ]
        flags = {port: h["health_flags"] for port, h in self.hosts().items()}
        return f"{flags}\n" + "\n".join(stats) + f"\n{self.envoy.log_tail(10)}"

    def counter(self, name: str) -> int:
        for line in self.envoy.admin_get(f"/stats?filter=^{re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no counter {name}")

    def wait_health(self, port: int, healthy: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.hosts()[port]["health_flags"] == "healthy") != healthy:
            assert time.monotonic() < deadline, f"{port}: {self.hosts()[port]}"
            time.sleep(0.05)


@dataclass
class Load:
    """Requests from `orders` (allowed) in a loop on one kept-alive connection."""

    edge: Edge
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        ctx = self.edge.context("orders")
        conn: http.client.HTTPSConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(
                        "127.0.0.1", self.edge.port, context=ctx, timeout=5
                    )
                conn.request("POST", "/payments/charge", headers={"content-length": "0"})
                resp = conn.getresponse()
                resp.read()
                self.statuses.append(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    @property
    def errors(self) -> int:
        return sum(s != 200 for s in self.statuses) + len(self.failures)


@pytest.fixture
def edge(tmp_path: Path, edge_certs: dict[str, Path]) -> Iterator[tuple[Edge, list[Replica]]]:
    policies = _configmap_tree(tmp_path / "policies")  # the ConfigMap's policies, as mounted
    replicas = [Replica(free_port(), policies, tmp_path / f"extauthz-{i}.log") for i in range(2)]
    upstreams = {name: EchoServer(name).start() for name in ("frontend", "payments")}
    listen, admin = free_port(), free_port()
    config = _render(
        edge_certs,
        listen_port=listen,
        admin_port=admin,
        extauthz_ports=[r.port for r in replicas],
        upstream_ports={name: u.port for name, u in upstreams.items()},
    )
    envoy = EnvoyProcess(config, workdir=tmp_path, admin_port=admin)
    try:
        for replica in replicas:
            replica.start()
        envoy.start()
        yield Edge(listen, edge_certs, envoy), replicas
    finally:
        envoy.stop()
        for replica in replicas:
            replica.stop(signal.SIGKILL)
        for upstream in upstreams.values():
            upstream.stop()


# caller (None: no client certificate), method, path, extra headers -> status, reason
EDGE_CASES = [
    ("orders", "POST", "/payments/charge", {}, 200, ""),
    ("frontend", "POST", "/payments/charge", {}, 403, "no_allow_policy_matched"),
    (None, "POST", "/payments/charge", {}, 403, "no_allow_policy_matched"),
    ("orders", "POST", "/payments/charge", {"x-amount": "20000"}, 422, ""),
    # SANITIZE_SET: a forged XFCC naming orders does not make frontend orders.
    (
        "frontend",
        "POST",
        "/payments/charge",
        {"x-forwarded-client-cert": "URI=spiffe://demo.local/ns/shop/sa/orders"},
        403,
        "no_allow_policy_matched",
    ),
    (None, "GET", "/", {}, 200, ""),
    ("frontend", "GET", "/catalog", {}, 200, ""),
    ("frontend", "GET", "/admin", {}, 403, "denied_by_policy"),
    # Normalized before the check: these are /admin, so the DENY applies.
    ("frontend", "GET", "//admin", {}, 403, "denied_by_policy"),
    ("frontend", "GET", "/static/../admin", {}, 403, "denied_by_policy"),
    # `x_user` is refused by the edge itself: no second spelling of `x-user` upstream.
    ("frontend", "GET", "/", {"x_user": "admin"}, 400, ""),
]


@dataclass(frozen=True)
class Outage:
    """What clients and Envoy saw while one replica was stopped under load."""

    requests: int  # sent by the load while the replica went away and for 1 s after
    errors: int  # answers other than 200 (503: no replica answered) and connection errors
    retried: int  # checks Envoy retried on the other replica (invisible to clients)
    flagged_after: float  # seconds until Envoy's /clusters showed the replica not healthy


# Stopping one of two replicas under load: at most this many failed client requests (0 in
# every run so far, thanks to the check's retry on the other replica; docs/deploy.md).
MAX_ERRORS_PER_STOP = 2


def _stop_under_load(front: Edge, replica: Replica, sig: signal.Signals) -> Outage:
    retries = front.counter("cluster.extauthz.upstream_rq_retry")
    with Load(front) as load:
        time.sleep(0.5)
        stopped = time.monotonic()
        replica.stop(sig)
        front.wait_health(replica.port, healthy=False)
        flagged = time.monotonic() - stopped
        answered = len(load.statuses)
        time.sleep(1.0)
        assert len(load.statuses) - answered > 20  # still answered, by the other replica
    return Outage(
        len(load.statuses) + len(load.failures),
        load.errors,
        front.counter("cluster.extauthz.upstream_rq_retry") - retries,
        flagged,
    )


def test_two_replicas_behind_the_front_proxy_share_checks_and_survive_a_stop(
    edge: tuple[Edge, list[Replica]],
) -> None:
    front, (a, b) = edge
    for replica in (a, b):  # the Deployment's probes, asked of the real processes
        with grpc.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                request = health_pb2.HealthCheckRequest(service=CONTAINER[kind]["grpc"]["service"])
                assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
    front.wait_health(a.port, healthy=True)
    front.wait_health(b.port, healthy=True)

    # Allowed and denied, as the ConfigMap's policies say, whichever replica answers.
    before = front.checks()
    retries = front.counter("cluster.extauthz.upstream_rq_retry")
    rounds = 5
    for _ in range(rounds):
        for caller, method, path, headers, status, reason in EDGE_CASES:
            got, _, body = front.call(caller, method, path, headers)
            assert got == status, (caller, method, path, got, body, front.diagnosis())
            if reason:
                assert yaml.safe_load(body)["reason"] == reason
            if got == 200 and path.startswith("/payments/"):
                seen = yaml.safe_load(body)["headers"]
                assert seen["x-extauthz-spiffe-id"] == "spiffe://demo.local/ns/shop/sa/orders"
                # Without --trust-xfcc (the Deployment's args) extauthz strips even the
                # edge's own XFCC: x-extauthz-spiffe-id is the upstream's source of truth.
                assert "x-forwarded-client-cert" not in seen
    after = front.checks()
    # One check per request that reaches ext_authz (health checks are not counted here; a
    # retried check is a second one); the 400 is Envoy's own answer, before any check.
    checked = rounds * sum(case[4] != 400 for case in EDGE_CASES)
    retried = front.counter("cluster.extauthz.upstream_rq_retry") - retries
    per_replica = {port: after[port] - before[port] for port in after}
    print(f"\nchecks per replica for {checked} checked requests: {per_replica}")
    assert sum(per_replica.values()) == checked + retried, front.diagnosis()
    assert all(n >= checked * 0.4 for n in per_replica.values()), per_replica  # round robin

    # 1. SIGTERM, as Kubernetes stops a pod: extauthz goes NOT_SERVING, refuses new checks
    # and drains the ones in flight.
    graceful = _stop_under_load(front, a, signal.SIGTERM)
    print(f"SIGTERM a: {graceful}")
    b_only = front.checks()
    assert front.call("orders", "POST", "/payments/charge")[0] == 200, front.diagnosis()
    assert front.checks()[b.port] == b_only[b.port] + 1

    # 2. Back, as the replacement pod: healthy after one passing health check.
    a.start()
    started = time.monotonic()
    front.wait_health(a.port, healthy=True)
    first = front.checks()[a.port]
    while front.checks()[a.port] == first:
        assert time.monotonic() - started < 10, front.diagnosis()
        assert front.call("orders", "POST", "/payments/charge")[0] == 200, front.diagnosis()
    print(f"a back: checked again {time.monotonic() - started:.2f} s after it was serving")
    before = front.checks()
    for _ in range(20):
        assert front.call("orders", "POST", "/payments/charge")[0] == 200, front.diagnosis()
    assert front.checks()[a.port] - before[a.port] >= 8, front.diagnosis()

    # 3. SIGKILL, as a crashed replica: no drain, no NOT_SERVING, connections just die.
    crashed = _stop_under_load(front, b, signal.SIGKILL)
    print(f"SIGKILL b: {crashed}")

    assert graceful.errors <= MAX_ERRORS_PER_STOP, (graceful, front.diagnosis())
    assert crashed.errors <= MAX_ERRORS_PER_STOP, (crashed, front.diagnosis())

    # 4. No replica left: fail closed with 503, never a pass-through.
    a.stop(signal.SIGTERM)
    front.wait_health(a.port, healthy=False)
    status, _, _ = front.call("orders", "POST", "/payments/charge")
    assert status == 503
