"""Deployment: envoy/front-proxy.yaml, an edge Envoy in front of several extauthz replicas."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.devtools.envoy import (
    dump_config,
    free_port,
    load_config,
    render_front_proxy,
    validate,
)
from extauthz.devtools.pki import write_pki
from extauthz.duration import parse_duration
from extauthz.policy.engine import PolicySet
from extauthz.server import AUTHORIZATION_SERVICE, POLICY_HEALTH_SERVICE

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
FRONT_PROXY = REPO / "envoy" / "front-proxy.yaml"

# What grpc.health.v1 answers for on the check port (extauthz/server.py, Server.start).
SERVED_HEALTH_SERVICES = {"", AUTHORIZATION_SERVICE, POLICY_HEALTH_SERVICE}


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
