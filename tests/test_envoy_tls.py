"""TLS and mTLS between real Envoy sidecars and extauthz: allow and deny over mTLS, sidecars
extauthz must refuse (or that must refuse extauthz), certificate rotation under a live Envoy,
and the documented transport socket validated by Envoy."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from extauthz.devtools.envoy import (
    EnvoyProcess,
    extauthz_tls_socket,
    free_port,
    render_sidecar,
    validate,
)
from extauthz.devtools.mesh import (
    EXTAUTHZ_DNS,
    NAMESPACE,
    SIDECAR_TEMPLATE,
    TRUST_DOMAIN,
    Mesh,
    Workload,
)
from extauthz.devtools.pki import DevCA, write_pki
from extauthz.devtools.upstream import EchoServer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "envoy.md"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Mesh(
        tmp_path_factory.mktemp("mesh-tls"),
        workloads=("frontend", "orders"),
        clients=("intruder",),
        extauthz_tls=True,
    ) as m:
        yield m


def token(mesh: Mesh) -> str:
    return mesh.idp.token("alice", audience="shop", roles=["user"])


def stat(envoy: EnvoyProcess | None, name: str) -> int:
    assert envoy is not None  # a Workload's is optional
    text = envoy.admin_get(f"/stats?filter=^{re.escape(name)}$")
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"no stat {name} in {text!r}")


def sidecar(
    mesh: Mesh,
    name: str,
    extauthz_tls: dict[str, Any] | None,
    tweak: Callable[[dict[str, Any]], None] | None = None,
) -> Extra:
    """Another sidecar in front of an orders-like workload, reaching the mesh's extauthz with
    ``extauthz_tls``; registered in the mesh, which stops it."""
    upstream = EchoServer(name).start()
    port, admin = free_port(), free_port()
    certs = mesh.workdir / "certs"
    config = render_sidecar(
        SIDECAR_TEMPLATE,
        listen_port=port,
        admin_port=admin,
        extauthz_port=mesh.extauthz_port,
        upstream_port=upstream.port,
        certs={
            "ca": certs / "ca.pem",
            "cert": certs / "orders.pem",
            "key": certs / "orders-key.pem",
        },
        context_extensions={"namespace": NAMESPACE, "labels": "app=orders"},
        extauthz_tls=extauthz_tls,
    )
    if tweak is not None:
        tweak(config)
    envoy = EnvoyProcess(config, workdir=mesh.workdir, admin_port=admin)
    mesh.services[name] = Workload(name, mesh.spiffe_id("orders"), port, upstream, envoy)
    envoy.start()
    return Extra(name, upstream, envoy)


class Extra(NamedTuple):
    name: str
    upstream: EchoServer
    envoy: EnvoyProcess


def test_allow_and_deny_over_mtls(mesh: Mesh) -> None:
    orders = mesh.services["orders"]
    allowed = mesh.call("frontend", "orders", "GET", "/orders/42", token=token(mesh))
    assert allowed.status == 200, allowed.body
    assert allowed.json()["headers"]["x-extauthz-spiffe-id"].endswith("/sa/frontend")
    denied = mesh.call("intruder", "orders", "GET", "/orders/42", token=token(mesh))
    assert denied.status == 403
    assert denied.json()["reason"] == "no_allow_policy_matched"  # extauthz's own answer
    assert stat(orders.envoy, "http.inbound.ext_authz.error") == 0
    assert stat(orders.envoy, "http.inbound.ext_authz.ok") >= 1
    assert stat(orders.envoy, "http.inbound.ext_authz.denied") >= 1
    assert stat(orders.envoy, "cluster.extauthz.ssl.handshake") >= 1  # it was TLS


@pytest.mark.parametrize(
    ("client", "san"),
    [("rogue", EXTAUTHZ_DNS), (None, EXTAUTHZ_DNS), ("orders", "impostor.extauthz-system.svc")],
    ids=["client-cert-of-another-ca", "no-client-cert", "extauthz-not-the-expected-san"],
)
def test_a_sidecar_that_cannot_complete_mtls_gets_no_allow(
    mesh: Mesh, client: str | None, san: str
) -> None:
    """extauthz refuses a client certificate its CA did not sign, or none; the sidecar refuses
    an extauthz without the SAN it expects. Either way no Check is answered: Envoy denies
    (failure_mode_allow: false) with status_on_error, and counts an ext_authz error."""
    name = f"orders-{client}-{san.partition('.')[0]}"
    files = mesh.extauthz_tls_files(client)
    assert files is not None
    files["san"] = san
    workload = sidecar(mesh, name, files)
    sent = 3
    for _ in range(sent):
        r = mesh.call("frontend", name, "GET", "/orders/42", token=token(mesh))
        assert r.status == 503, r.body
        assert b"no_allow_policy_matched" not in r.body  # not extauthz's answer
    assert workload.upstream.hits == 0
    assert stat(workload.envoy, "http.inbound.ext_authz.error") == sent
    assert stat(workload.envoy, "http.inbound.ext_authz.ok") == 0
    if client == "orders":  # the sidecar checked extauthz's certificate and said no
        assert stat(workload.envoy, "cluster.extauthz.ssl.fail_verify_san") >= 1


def _connection_per_check(config: dict[str, Any]) -> None:
    """Every Check on a new connection, so every Check is a new handshake."""
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz"]
    (options,) = cluster["typed_extension_protocol_options"].values()
    options["common_http_protocol_options"] = {"max_requests_per_connection": 1}


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_extauthz_certificate_rotation_under_a_live_envoy(mesh: Mesh) -> None:
    workload = sidecar(
        mesh, "orders-rotating", mesh.extauthz_tls_files("orders"), _connection_per_check
    )
    name, certs = workload.name, mesh.workdir / "certs"

    def statuses(n: int = 3) -> list[int]:
        return [
            mesh.call("frontend", name, "GET", "/orders/1", token=token(mesh)).status
            for _ in range(n)
        ]

    def handshakes() -> int:
        return stat(workload.envoy, "cluster.extauthz.ssl.handshake")

    assert statuses() == [200] * 3
    before = handshakes()
    assert before >= 3  # one connection per Check

    # A new certificate of the same CA: picked up at the next handshake.
    mesh.issue_extauthz_cert()
    assert statuses() == [200] * 3
    assert handshakes() == before + 3
    assert mesh.extauthz_log.read_text().count("TLS: certificate reloaded") == 1

    # A certificate without its key (mid-rotation, or a mistake): the last good pair stays.
    other = DevCA.create(TRUST_DOMAIN).issue_cert(common_name="x", dns_names=[EXTAUTHZ_DNS])
    _replace(certs / "extauthz.pem", other.cert_pem)
    assert statuses() == [200] * 3
    assert "keeping the current certificate" in mesh.extauthz_log.read_text()

    # A valid pair from a CA the sidecars do not trust: served at once, so refused at once.
    errors = stat(workload.envoy, "http.inbound.ext_authz.error")
    hits = workload.upstream.hits
    _replace(certs / "extauthz-key.pem", other.key_pem)
    assert statuses() == [503] * 3
    assert stat(workload.envoy, "http.inbound.ext_authz.error") == errors + 3
    assert stat(workload.envoy, "cluster.extauthz.ssl.fail_verify_error") >= 1
    assert workload.upstream.hits == hits

    # Rotated back to a good certificate: recovered, without a restart of either side.
    mesh.issue_extauthz_cert()
    assert statuses() == [200] * 3
    assert mesh.extauthz_log.read_text().count("TLS: certificate reloaded") == 3
    r = mesh.call("frontend", "orders", "GET", "/orders/2", token=token(mesh))
    assert r.status == 200, r.body


def _documented_socket() -> dict[str, Any]:
    text = DOCS.read_text()
    section = text.split("## TLS and mTLS between Envoy and extauthz", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = yaml.safe_load(block)
    assert isinstance(loaded, dict)
    socket: dict[str, Any] = loaded["transport_socket"]
    return socket


def test_the_documented_transport_socket_is_the_tested_one_and_envoy_accepts_it(
    tmp_path: Path,
) -> None:
    certs = write_pki(tmp_path / "certs", "example.org", {"workload": "spiffe://example.org/w"})
    documented = yaml.safe_load(
        yaml.safe_dump(_documented_socket()).replace("/etc/extauthz/certs/", f"{tmp_path}/certs/")
    )
    assert documented == extauthz_tls_socket(
        ca=certs["ca"], san=EXTAUTHZ_DNS, cert=certs["workload"], key=certs["workload-key"]
    )
    config = render_sidecar(
        SIDECAR_TEMPLATE,
        listen_port=free_port(),
        admin_port=free_port(),
        extauthz_port=9191,
        upstream_port=free_port(),
        certs={"ca": certs["ca"], "cert": certs["workload"], "key": certs["workload-key"]},
    )
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz"]
    cluster["transport_socket"] = documented
    path = tmp_path / "sidecar-tls.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    validate(path)


def test_render_sidecar_without_tls_is_unchanged(tmp_path: Path) -> None:
    certs = write_pki(tmp_path / "certs", "example.org", {"workload": "spiffe://example.org/w"})
    kwargs: dict[str, Any] = {
        "listen_port": 1,
        "admin_port": 2,
        "extauthz_port": 3,
        "upstream_port": 4,
        "certs": {"ca": certs["ca"], "cert": certs["workload"], "key": certs["workload-key"]},
    }
    plain = render_sidecar(SIDECAR_TEMPLATE, **kwargs)
    (cluster,) = [c for c in plain["static_resources"]["clusters"] if c["name"] == "extauthz"]
    assert "transport_socket" not in cluster
    with pytest.raises(ValueError, match="cert and key go together"):
        extauthz_tls_socket(ca=certs["ca"], san="x", cert=certs["workload"])
