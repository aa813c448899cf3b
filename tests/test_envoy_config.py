"""The shipped sidecar config, the dev PKI, and the Envoy process harness."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from extauthz.devtools.envoy import (
    EXTAUTHZ_CLUSTERS,
    EnvoyProcess,
    dump_config,
    find_envoy,
    free_port,
    load_config,
    render_sidecar,
    sidecar_transport,
    validate,
)
from extauthz.devtools.pki import DevCA, write_pki

SIDECAR = Path(__file__).resolve().parents[1] / "envoy" / "sidecar.yaml"
# Every sidecar template: ext_authz over gRPC, and over Envoy's http_service.
SIDECARS = [SIDECAR, SIDECAR.with_name("sidecar-http.yaml")]
TRUST_DOMAIN = "example.org"
ORDERS_ID = "spiffe://example.org/ns/shop/sa/orders"


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    written = write_pki(tmp_path / "certs", TRUST_DOMAIN, {"workload": ORDERS_ID})
    return {"ca": written["ca"], "cert": written["workload"], "key": written["workload-key"]}


def _render(
    certs: dict[str, Path], /, template: Path = SIDECAR, **overrides: Any
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "listen_port": free_port(),
        "admin_port": free_port(),
        "extauthz_port": 9191,
        "upstream_port": free_port(),
        "certs": certs,
    }
    kwargs.update(overrides)
    return render_sidecar(template, **kwargs)


def _walk(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in _walk(v, key)
        ]
    if isinstance(node, list):
        return [x for item in node for x in _walk(item, key)]
    return []


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == name)
    return cluster  # type: ignore[no-any-return]


def _ext_authz(config: dict[str, Any]) -> dict[str, Any]:
    (ext_authz,) = (f for f in _walk(config, "http_filters")[0] if "ext_authz" in f["name"])
    return ext_authz["typed_config"]  # type: ignore[no-any-return]


def _workload_fields(config: dict[str, Any], template: Path) -> dict[str, str]:
    """What tells extauthz the workload: a route's context_extensions over gRPC, the fields
    of x-extauthz-peer in front of Envoy's own (src, dst, uri) over HTTP."""
    if sidecar_transport(config, template) == "grpc":
        (ext,) = _walk(config, "context_extensions")
        return ext  # type: ignore[no-any-return]
    (peer,) = _walk(config, "headers_to_add")[0]
    assert peer["key"] == "x-extauthz-peer"
    head, _, uri = peer["value"].partition(";src=")
    assert uri.endswith(";uri=%DOWNSTREAM_PEER_URI_SAN%")
    return dict(field.partition("=")[::2] for field in head.split(";"))


# --- the shipped sidecar ------------------------------------------------------------------


@pytest.mark.parametrize("template", SIDECARS, ids=lambda p: p.name)
def test_shipped_sidecar_keeps_fail_closed_mtls_settings(template: Path) -> None:
    # These are the security-relevant choices; a silent edit to any of them is a regression.
    config = load_config(template)
    authz = _ext_authz(config)
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    if sidecar_transport(config, template) == "grpc":
        assert authz["include_peer_certificate"] is True
        assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz"
    else:  # the identity travels in x-extauthz-peer: tests/test_envoy_http.py
        assert authz["http_service"]["server_uri"]["cluster"] == "extauthz_http"
        assert _workload_fields(config, template)["namespace"] == "shop"
    (tls,) = _walk(config, "require_client_certificate")
    assert tls is True
    (hcm,) = (h for h in _walk(config, "typed_config") if "forward_client_cert_details" in h)
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.parametrize("template", SIDECARS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "context_extensions", [None, {"namespace": "payments", "labels": "app=ledger,tier=db"}]
)
def test_shipped_sidecar_validates_with_dev_certs(
    tmp_path: Path,
    certs: dict[str, Path],
    context_extensions: dict[str, str] | None,
    template: Path,
) -> None:
    config = _render(certs, template, context_extensions=context_extensions)

    assert {s["address"] for s in _walk(config, "socket_address")} == {"127.0.0.1"}
    assert "/etc/extauthz" not in yaml.safe_dump(config)
    assert _workload_fields(config, template) == (
        context_extensions or {"namespace": "shop", "labels": "app=orders"}
    )
    validate(dump_config(config, tmp_path / "sidecar.yaml"))


@pytest.mark.parametrize("template", SIDECARS, ids=lambda p: p.name)
@pytest.mark.parametrize("where", ["file", "abstract"])
def test_render_unix_socket_uses_pipe_and_validates(
    tmp_path: Path, certs: dict[str, Path], where: str, template: Path
) -> None:
    path = str(tmp_path / "authz.sock") if where == "file" else "@extauthz-test"
    config = _render(certs, template, extauthz_port=None, extauthz_unix=path)

    cluster = _cluster(config, EXTAUTHZ_CLUSTERS[sidecar_transport(config, template)])
    (lb,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"] == {"pipe": {"path": path}}
    validate(dump_config(config, tmp_path / "sidecar.yaml"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"extauthz_unix": "/tmp/a.sock"}, "exactly one"),
        ({"extauthz_port": None}, "exactly one"),
        ({"extauthz_port": None, "extauthz_unix": "/tmp/" + "x" * 120}, "unix socket path"),
        ({"certs": {"ca": Path("ca.pem")}}, "missing"),
    ],
)
@pytest.mark.parametrize("template", SIDECARS, ids=lambda p: p.name)
def test_render_rejects_bad_arguments(
    certs: dict[str, Path], overrides: dict[str, Any], message: str, template: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        _render(certs, template, **overrides)


@pytest.mark.parametrize("template", SIDECARS, ids=lambda p: p.name)
@pytest.mark.parametrize(("kind", "name"), [("clusters", "upstream"), ("listeners", "inbound")])
def test_render_names_what_the_template_lacks(
    tmp_path: Path, certs: dict[str, Path], kind: str, name: str, template: Path
) -> None:
    config = load_config(template)
    resources = config["static_resources"]
    resources[kind] = [r for r in resources[kind] if r["name"] != name]
    template = dump_config(config, tmp_path / "template.yaml")
    with pytest.raises(ValueError, match=repr(name)):
        render_sidecar(
            template,
            listen_port=1,
            admin_port=2,
            extauthz_port=3,
            upstream_port=4,
            certs=certs,
        )


def test_validate_reports_envoy_error(tmp_path: Path, certs: dict[str, Path]) -> None:
    config = _render(certs, certs={**certs, "ca": tmp_path / "missing-ca.pem"})
    with pytest.raises(RuntimeError, match=r"missing-ca\.pem"):
        validate(dump_config(config, tmp_path / "sidecar.yaml"))


# --- dev PKI ------------------------------------------------------------------------------


def test_svid_is_a_spiffe_conformant_leaf_chaining_to_the_ca() -> None:
    ca = DevCA.create(TRUST_DOMAIN)
    pair = ca.issue_svid(ORDERS_ID, dns_names=["orders.shop.svc"])
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ORDERS_ID]
    assert san.get_values_for_type(x509.DNSName) == ["orders.shop.svc"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == ca_cert.subject

    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    leaf_key = cert.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
    assert leaf_key.curve.name == "secp256r1"


def test_svid_from_another_ca_does_not_verify() -> None:
    ours, theirs = DevCA.create(TRUST_DOMAIN), DevCA.create(TRUST_DOMAIN)
    cert = x509.load_pem_x509_certificate(theirs.issue_svid(ORDERS_ID).cert_pem)
    with pytest.raises(InvalidSignature):
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ours.cert_pem))


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://other.org/ns/shop/sa/orders",  # foreign trust domain
        "https://example.org/ns/shop",
        "spiffe://example.org/ns//orders",
        "spiffe://example.org/ns/../orders",
        "spiffe://example.org/ns/shop/",
        "spiffe://Example.org/ns/shop",
        "spiffe://example.org:8443/ns/shop",
        "spiffe://example.org/ns/shop?x=1",
    ],
)
def test_issue_svid_rejects_non_conforming_ids(spiffe_id: str) -> None:
    with pytest.raises(ValueError, match=r"SPIFFE ID|trust domain"):
        DevCA.create(TRUST_DOMAIN).issue_svid(spiffe_id)


def test_long_spiffe_id_gets_empty_subject_and_critical_san() -> None:
    long_id = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/" + "a" * 80
    cert = x509.load_pem_x509_certificate(DevCA.create(TRUST_DOMAIN).issue_svid(long_id).cert_pem)
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


@pytest.mark.parametrize(
    "uris", [["https://example.org/orders"], [ORDERS_ID, "spiffe://example.org/ns/shop/sa/x"]]
)
def test_issue_cert_allows_non_svid_uri_sans(uris: list[str]) -> None:
    pair = DevCA.create(TRUST_DOMAIN).issue_cert(common_name="odd", uris=uris)
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == uris


def test_write_pki_writes_certs_and_private_keys(tmp_path: Path) -> None:
    workloads = {"web": "spiffe://example.org/ns/shop/sa/web", "orders": ORDERS_ID}
    paths = write_pki(tmp_path / "pki", TRUST_DOMAIN, workloads)

    assert set(paths) == {"ca", "web", "web-key", "orders", "orders-key"}
    assert paths["ca"] == tmp_path / "pki" / "ca.pem"
    assert all(p.is_file() for p in paths.values())
    for name in workloads:
        assert stat.S_IMODE(paths[f"{name}-key"].stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in paths[f"{name}-key"].read_bytes()
        cert = x509.load_pem_x509_certificate(paths[name].read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(paths["ca"].read_bytes()))
    assert not list((tmp_path / "pki").glob("ca-key*"))


@pytest.mark.parametrize("name", ["ca", "../escape", "a/b", ""])
def test_write_pki_rejects_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="workload name"):
        write_pki(tmp_path, TRUST_DOMAIN, {name: ORDERS_ID})


# --- Envoy process harness ----------------------------------------------------------------


def test_find_envoy_honours_envoy_bin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENVOY_BIN", str(tmp_path / "nope"))
    with pytest.raises(RuntimeError, match="ENVOY_BIN"):
        find_envoy()
    monkeypatch.delenv("ENVOY_BIN")
    assert os.access(find_envoy(), os.X_OK)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_two_envoys_start_serve_admin_and_stop(tmp_path: Path, certs: dict[str, Path]) -> None:
    # Two at once, sharing a workdir: proves base-id/hot-restart and file names don't collide.
    ports = [(free_port(), free_port()) for _ in range(2)]
    envoys = [
        EnvoyProcess(
            _render(certs, listen_port=listen, admin_port=admin),
            workdir=tmp_path / "envoy",
            admin_port=admin,
        )
        for listen, admin in ports
    ]
    with envoys[0] as first, envoys[1] as second:
        for envoy, (listen, _) in zip((first, second), ports, strict=True):
            assert envoy.admin_get("/ready").strip() == "LIVE"
            assert "inbound" in envoy.admin_get("/listeners")
            assert "cluster.extauthz." in envoy.admin_get("/stats?filter=^cluster.extauthz")
            socket.create_connection(("127.0.0.1", listen), timeout=2).close()
        pids = [e.pid for e in envoys]

    for envoy, pid in zip(envoys, pids, strict=True):
        assert pid is not None
        assert envoy.returncode is not None
        assert _gone(pid)


def test_envoy_start_failure_reports_log_and_leaves_nothing_running(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    admin = free_port()
    config = _render(certs, admin_port=admin, certs={**certs, "key": tmp_path / "no-key.pem"})
    envoy = EnvoyProcess(config, workdir=tmp_path, admin_port=admin)
    with pytest.raises(RuntimeError, match=r"(?s)exited with status .*no-key\.pem"):
        envoy.start()
    assert envoy.pid is not None
    assert envoy.returncode is not None
    assert _gone(envoy.pid)


def test_sidecar_fails_closed_with_503_when_extauthz_is_down(tmp_path: Path) -> None:
    pki = write_pki(
        tmp_path / "certs",
        TRUST_DOMAIN,
        {"workload": ORDERS_ID, "client": "spiffe://example.org/ns/shop/sa/web"},
    )
    listen, admin = free_port(), free_port()
    config = _render(
        {"ca": pki["ca"], "cert": pki["workload"], "key": pki["workload-key"]},
        listen_port=listen,
        admin_port=admin,
        extauthz_port=free_port(),  # nothing listens here
    )

    def get(client_cert: bool) -> int:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.check_hostname = False  # the SVID has a URI SAN, not a DNS name
        if client_cert:
            ctx.load_cert_chain(pki["client"], pki["client-key"])
        conn = http.client.HTTPSConnection("127.0.0.1", listen, context=ctx, timeout=5)
        try:
            conn.request("GET", "/orders")
            return conn.getresponse().status
        finally:
            conn.close()

    with EnvoyProcess(config, workdir=tmp_path, admin_port=admin) as envoy:
        assert get(client_cert=True) == 503  # status_on_error, not the default 403
        assert "http.inbound.ext_authz.error: 1" in envoy.admin_get("/stats?filter=ext_authz")
        # TLS 1.3 reports the rejected client cert only once the client reads.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(client_cert=False)
