"""Through real Envoy sidecars with mTLS, asking extauthz over Envoy's ext_authz
``http_service`` (envoy/sidecar-http.yaml, ``serve --http-listen``): the shipped policies,
the identity Envoy puts in ``x-extauthz-peer``, and the traps the template's comments name.

One mesh for the module (extauthz + frontend/orders/payments, each behind its own Envoy),
a second with policies of its own (OWN_POLICIES: a failed decision, a claim header Envoy
would drop, a policy reading x-envoy-internal); tests that stop extauthz for good or run
``--workers 2`` get their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import ssl
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from test_envoy_integration import token
from test_envoy_tls import stat

from extauthz.devtools.envoy import dump_config, load_config, render_sidecar, validate
from extauthz.devtools.mesh import SIDECAR_HTTP_TEMPLATE, TRUST_DOMAIN, Mesh, Workload
from extauthz.devtools.pki import DevCA, write_pki
from extauthz.devtools.upstream import EchoServer
from extauthz.request import PEER_HEADER

ORDERS_ID = "spiffe://demo.local/ns/shop/sa/orders"
# What a caller would send to pass for orders, calling payments (which only orders may call).
FORGED_PEER = (
    f"namespace=shop;labels=app=payments;src=10.0.0.1:1234;dst=10.0.0.2:8443;uri={ORDERS_ID}"
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Mesh(tmp_path_factory.mktemp("mesh-http"), transport="http") as m:
        yield m


def hits(workload: Workload) -> int:
    assert workload.upstream is not None  # a Workload's is optional
    return workload.upstream.hits


def authz_stat(mesh: Mesh, workload: str, name: str) -> int:
    """One of Envoy's ext_authz counters (ok, denied, error) on ``workload``'s sidecar."""
    return stat(mesh.services[workload].envoy, f"http.inbound.ext_authz.{name}")


# --- the shipped template: its traps stay closed -------------------------------------------


def _matches(patterns: list[dict[str, Any]], name: str) -> bool:
    """Envoy's ListStringMatcher over a header name (the kinds the template may use)."""
    for pattern in patterns:
        ((kind, value),) = ((k, v) for k, v in pattern.items() if k != "ignore_case")
        if kind == "safe_regex":
            hit = re.fullmatch(value["regex"], name) is not None
        else:
            hit = {
                "exact": name == value,
                "prefix": name.startswith(value),
                "suffix": name.endswith(value),
                "contains": value in name,
            }[kind]
        if hit:
            return True
    return False


def _http_ext_authz(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    (ext_authz,) = (
        f for f in hcm["typed_config"]["http_filters"] if f["name"].endswith("ext_authz")
    )
    return ext_authz["typed_config"]  # type: ignore[no-any-return]


def test_the_template_keeps_the_http_traps_closed() -> None:
    """The choices envoy/sidecar-http.yaml's comments explain, each one a hole if edited."""
    authz = _http_ext_authz(load_config(SIDECAR_HTTP_TEMPLATE))
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    service = authz["http_service"]
    assert service["server_uri"]["timeout"] == "0.25s"
    (peer,) = service["authorization_request"]["headers_to_add"]
    assert peer["key"] == PEER_HEADER
    # Fixed text before any formatter: the value is never empty, so Envoy always sets it.
    assert peer["value"].startswith("namespace=")
    assert peer["value"].endswith(";uri=%DOWNSTREAM_PEER_URI_SAN%")  # uri last: it takes the rest
    # The client's headers extauthz sees: what the policies read, never the peer header.
    allowed = authz["allowed_headers"]["patterns"]
    for name in ("x-amount", "x-forwarded-client-cert"):
        assert _matches(allowed, name)
    assert not _matches(allowed, PEER_HEADER)
    # extauthz's answer headers that go upstream: its own, never its framing.
    upstream = service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    for name in ("x-extauthz-decision-id", "x-extauthz-spiffe-id", "x-user", "authorization"):
        assert _matches(upstream, name)
    for name in ("content-length", "transfer-encoding", "connection", "content-type", "host"):
        assert not _matches(upstream, name)


def _rendered(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    certs = write_pki(tmp_path / "certs", "demo.local", {"workload": ORDERS_ID})
    kwargs: dict[str, Any] = {
        "listen_port": 18443,
        "admin_port": 19901,
        "extauthz_port": 19192,
        "upstream_port": 18080,
        "certs": {"ca": certs["ca"], "cert": certs["workload"], "key": certs["workload-key"]},
    }
    return render_sidecar(SIDECAR_HTTP_TEMPLATE, **{**kwargs, **overrides})


def test_render_puts_the_workload_in_the_peer_header_and_numbers_workers(tmp_path: Path) -> None:
    """Namespace and labels replace the template's, Envoy's fields stay; with two workers
    the cluster has extauthz's two HTTP ports; the prefix is the one given; Envoy accepts it."""
    config = _rendered(
        tmp_path,
        context_extensions={"namespace": "bank", "labels": "app=ledger,tier=db"},
        extauthz_workers=2,
        http_path_prefix="/authz",
    )
    service = _http_ext_authz(config)["http_service"]
    (peer,) = service["authorization_request"]["headers_to_add"]
    assert peer["value"] == (
        "namespace=bank;labels=app=ledger,tier=db;src=%DOWNSTREAM_REMOTE_ADDRESS%;"
        "dst=%DOWNSTREAM_LOCAL_ADDRESS%;uri=%DOWNSTREAM_PEER_URI_SAN%"
    )
    assert service["path_prefix"] == "/authz"
    assert service["server_uri"] == {
        "uri": "http://127.0.0.1:19192",
        "cluster": "extauthz_http",
        "timeout": "0.25s",
    }
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz_http")
    ports = [
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for lb in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [19192, 19193]
    validate(dump_config(config, tmp_path / "sidecar-http.yaml"))
    no_prefix = _http_ext_authz(_rendered(tmp_path, http_path_prefix=""))["http_service"]
    assert "path_prefix" not in no_prefix


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"context_extensions": {"labels": "app=a;uri=spiffe://x"}}, "cannot be in"),
        ({"context_extensions": {"labels": "app=%REQ(x)%"}}, "cannot be in"),
        ({"context_extensions": {"uri": "spiffe://x"}}, "not a field name"),
        ({"context_extensions": {"datauri": "x"}}, "cannot be in"),
        ({"extauthz_tls": {"ca": Path("ca.pem"), "san": "x"}}, "plaintext"),
    ],
    ids=["semicolon", "formatter", "connection-field", "uri-suffix", "tls"],
)
def test_render_refuses_what_would_forge_or_break_the_peer_header(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    """A field that extauthz would split elsewhere, or Envoy would expand, is refused."""
    with pytest.raises(ValueError, match=message):
        _rendered(tmp_path, **overrides)


# --- decisions through Envoy -----------------------------------------------------------------


def test_allowed_call_reaches_upstream_with_identity_headers(mesh: Mesh) -> None:
    """Allow (200): extauthz's headers go upstream, its framing does not; the path was
    decided without Envoy's path_prefix (the policy is on /orders/*)."""
    r = mesh.call("frontend", "orders", "GET", "/orders/42?expand=items", token=token(mesh))
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["service"] == "orders"
    assert seen["path"] == "/orders/42?expand=items"
    h = seen["headers"]
    assert h["x-extauthz-spiffe-id"] == "spiffe://demo.local/ns/shop/sa/frontend"
    assert h["x-user"] == "alice"  # outputClaimToHeaders
    assert re.fullmatch("[0-9a-f]{32}", h["x-extauthz-decision-id"])
    assert "x-envoy-auth-headers-to-remove" not in h  # Envoy's instruction, applied
    assert "content-length" not in h  # the answer's `content-length: 0` stayed behind
    assert PEER_HEADER not in h


@pytest.mark.parametrize(
    ("caller", "target", "with_token", "removed"),
    [
        ("frontend", "orders", True, "authorization"),  # forwardOriginalToken: false
        ("orders", "frontend", False, "x-user"),  # a forged claim header, no token
    ],
    ids=["token", "forged-claim-header"],
)
def test_headers_extauthz_removes_are_gone_upstream(
    mesh: Mesh, caller: str, target: str, with_token: bool, removed: str
) -> None:
    """x-envoy-auth-headers-to-remove works: the caller's copy never reaches the workload."""
    forged = {"x-user": "admin", "x-extauthz-spiffe-id": "spiffe://demo.local/ns/shop/sa/payments"}
    r = mesh.call(
        caller,
        target,
        "GET",
        "/orders/1" if target == "orders" else "/",
        token=token(mesh) if with_token else None,
        headers=forged,
    )
    assert r.status == 200, r.body
    h = r.json()["headers"]
    assert removed not in h
    assert h["x-extauthz-spiffe-id"] == mesh.spiffe_id(caller)  # set over the forged one


def test_lateral_move_is_denied_with_json_reason(mesh: Mesh) -> None:
    """Deny (403): extauthz's status, JSON body and decision id reach the client as they
    are, Envoy counts a denial (not an error), and the workload sees nothing."""
    payments = mesh.services["payments"]
    before = hits(payments), authz_stat(mesh, "payments", "denied")
    errors = authz_stat(mesh, "payments", "error")
    r = mesh.call("frontend", "payments", "POST", "/payments/1", token=token(mesh))
    assert r.status == 403
    body = r.json()
    assert body["error"] == "permission_denied"
    assert body["reason"] == "no_allow_policy_matched"
    assert body["decision_id"] == r.headers["x-extauthz-decision-id"]
    assert r.headers["content-type"] == "application/json"
    assert (hits(payments), authz_stat(mesh, "payments", "denied")) == (before[0], before[1] + 1)
    assert authz_stat(mesh, "payments", "error") == errors


def test_a_policy_deny_response_reaches_the_client(mesh: Mesh) -> None:
    """policies/shop/payments-limits.yaml reads x-amount: allowed_headers must pass it to
    extauthz, or the charge over the limit would be allowed."""
    before = hits(mesh.services["payments"])
    small = mesh.call("orders", "payments", "POST", "/payments/charge", headers={"x-amount": "9"})
    assert small.status == 200, small.body
    r = mesh.call("orders", "payments", "POST", "/payments/charge", headers={"x-amount": "20000"})
    assert r.status == 422, r.body
    assert r.json() == {"error": "amount_over_limit", "limit": 10000}
    assert r.headers["x-limit"] == "10000"
    assert "x-extauthz-decision-id" in r.headers
    assert hits(mesh.services["payments"]) == before + 1  # only the small charge


@pytest.mark.parametrize(
    ("make", "reason"),
    [(lambda m: token(m, ttl=-3600), "jwt_expired"), (lambda m: "not.a.jwt", "jwt_malformed")],
    ids=["expired", "malformed"],
)
def test_invalid_token_is_401_with_a_challenge(
    mesh: Mesh, make: Callable[[Mesh], str], reason: str
) -> None:
    r = mesh.call("frontend", "orders", "GET", "/orders", token=make(mesh))
    assert r.status == 401, r.body
    assert r.json()["reason"] == reason
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="extauthz", error="invalid_token"')


def test_missing_token_is_left_to_policy(mesh: Mesh) -> None:
    """No token is not a 401: orders requires a request principal (403), frontend does not."""
    r = mesh.call("frontend", "orders", "GET", "/orders")
    assert r.status == 403, r.body
    assert r.json()["reason"] == "no_allow_policy_matched"
    assert "www-authenticate" not in r.headers
    assert mesh.call("orders", "frontend", "GET", "/").status == 200


# --- the peer header cannot be forged ----------------------------------------------------------


@pytest.mark.parametrize("caller", ["frontend", "intruder"])
@pytest.mark.parametrize(
    "forged",
    [
        {PEER_HEADER: FORGED_PEER},
        {PEER_HEADER: FORGED_PEER, "x-forwarded-client-cert": f"URI={ORDERS_ID}"},
    ],
    ids=["peer-header", "peer-header-and-xfcc"],
)
def test_a_forged_peer_header_gives_a_caller_no_other_identity(
    mesh: Mesh, caller: str, forged: dict[str, str]
) -> None:
    """A caller with another workload's certificate claims to be orders: still denied."""
    before = hits(mesh.services["payments"])
    r = mesh.call(caller, "payments", "POST", "/payments/1", headers=forged)
    assert r.status == 403, r.body
    assert r.json()["reason"] == "no_allow_policy_matched"
    assert hits(mesh.services["payments"]) == before


def _allow_every_x_header(config: dict[str, Any]) -> None:
    """allowed_headers made a catch-all over x-*: the client's peer header now reaches the
    check request too, and only Envoy's headers_to_add stands in the way."""
    _http_ext_authz(config)["allowed_headers"]["patterns"].append({"prefix": "x-"})


def _no_client_certificate_needed(config: dict[str, Any]) -> None:
    """The inbound listener also takes callers without a client certificate (anonymous)."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            chain["transport_socket"]["typed_config"]["require_client_certificate"] = False


@pytest.mark.parametrize(
    ("tweak", "caller"),
    [(_allow_every_x_header, "frontend"), (_no_client_certificate_needed, None)],
    ids=["catch-all-allowed-headers", "no-client-certificate"],
)
def test_envoy_overrides_a_forged_peer_header(
    mesh: Mesh, tweak: Callable[[dict[str, Any]], None], caller: str | None
) -> None:
    """Sidecars weaker than the template, so the second defence is what is tested: Envoy's
    own x-extauthz-peer replaces the client's, also when its uri is empty (anonymous).
    Orders itself is still allowed, and the workload never sees the client's copy."""
    name = "payments-" + tweak.__name__.strip("_").replace("_", "-")
    workload = mesh.add_sidecar(name, svid="payments", labels="app=payments", tweak=tweak)
    forged = {PEER_HEADER: FORGED_PEER}
    r = mesh.call(caller, name, "POST", "/payments/1", headers=forged)
    assert r.status == 403, r.body
    assert r.json()["reason"] == "no_allow_policy_matched"
    assert hits(workload) == 0
    allowed = mesh.call("orders", name, "POST", "/payments/1", headers=forged)
    assert allowed.status == 200, allowed.body
    h = allowed.json()["headers"]
    assert h["x-extauthz-spiffe-id"] == ORDERS_ID
    assert PEER_HEADER not in h  # the route drops it


def test_without_a_client_certificate_the_shipped_listener_refuses(mesh: Mesh) -> None:
    """The template's listener requires mTLS: no anonymous caller reaches a check."""
    frontend = mesh.services["frontend"]
    before = hits(frontend), authz_stat(mesh, "frontend", "ok")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mesh.call(None, "frontend", "GET", "/", headers={PEER_HEADER: FORGED_PEER})
    assert (hits(frontend), authz_stat(mesh, "frontend", "ok")) == before


def test_a_certificate_with_several_uri_sans_is_refused(mesh: Mesh) -> None:
    """Envoy joins a client certificate's URI SANs with ',' in x-extauthz-peer. An SVID has
    one, and which of several is the caller cannot be told: 401, never the first SAN's
    (orders') rights. The certificate is from a second CA that only this sidecar trusts."""
    ca = DevCA.create(TRUST_DOMAIN)
    pair = ca.issue_cert(common_name="", uris=[ORDERS_ID, mesh.spiffe_id("frontend")])
    certs = mesh.workdir / "certs"
    (certs / "two-sans.pem").write_bytes(pair.cert_pem)
    (certs / "two-sans-key.pem").write_bytes(pair.key_pem)
    bundle = certs / "mesh-and-second-ca.pem"
    bundle.write_bytes((certs / "ca.pem").read_bytes() + ca.cert_pem)

    def trust_both_cas(config: dict[str, Any]) -> None:
        for listener in config["static_resources"]["listeners"]:
            for chain in listener["filter_chains"]:
                tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
                tls["validation_context"]["trusted_ca"] = {"filename": str(bundle)}

    name = "payments-two-cas"
    if name not in mesh.services:
        mesh.add_sidecar(name, svid="payments", labels="app=payments", tweak=trust_both_cas)
    workload = mesh.services[name]
    before = hits(workload)
    r = mesh.call("two-sans", name, "POST", "/payments/1")
    assert r.status == 401, r.body
    assert r.json()["reason"] == "spiffe_id_invalid"
    assert hits(workload) == before
    allowed = mesh.call("orders", name, "POST", "/payments/1")  # the sidecar takes orders
    assert allowed.status == 200, allowed.body
    assert hits(workload) == before + 1


# --- the body of the client's request ----------------------------------------------------------


class _BodyEcho(BaseHTTPRequestHandler):
    """Answers with the headers it got and the length and SHA-256 of the body it read."""

    server: BodyEchoServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.hits += 1
        answer = json.dumps(
            {
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BodyEchoServer(EchoServer):
    """An echo upstream that proves which body arrived."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.RequestHandlerClass = _BodyEcho


def test_a_request_body_reaches_the_upstream_intact(mesh: Mesh) -> None:
    """Were extauthz's `content-length: 0` copied upstream (a catch-all
    allowed_upstream_headers), the workload would read an empty body."""
    name = "payments-body"
    if name not in mesh.services:
        mesh.add_sidecar(
            name, svid="payments", labels="app=payments", upstream=BodyEchoServer(name).start()
        )
    body = os.urandom(48 * 1024)
    r = mesh.call("orders", name, "POST", "/payments/charge", body=body)
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["headers"]["content-length"] == str(len(body))
    assert (seen["length"], seen["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert seen["headers"]["x-extauthz-spiffe-id"] == ORDERS_ID


def test_a_denied_head_leaves_envoys_connection_to_extauthz_clean(mesh: Mesh) -> None:
    """Envoy asks with the client's method: a denied HEAD must be answered without a body."""
    name = "cluster.extauthz_http.upstream_cx_protocol_error"
    before = stat(mesh.services["payments"].envoy, name)
    for _ in range(2):
        assert mesh.call("frontend", "payments", "HEAD", "/payments/1").status == 403
    assert stat(mesh.services["payments"].envoy, name) == before


# --- extauthz away, extauthz with workers ------------------------------------------------------


def test_extauthz_away_fails_closed(tmp_path: Path) -> None:
    """Hung (past the 0.25 s timeout), stopped or killed: the caller gets the 503 of
    status_on_error, Envoy counts an error, the workload sees nothing; back, it allows."""
    with Mesh(tmp_path, workloads=("frontend",), clients=(), transport="http") as m:
        frontend = m.services["frontend"]

        def away() -> None:
            before = hits(frontend), authz_stat(m, "frontend", "error")
            r = m.call("frontend", "frontend", "GET", "/")
            assert r.status == 503, r.body
            assert b"decision_id" not in r.body  # Envoy's answer, not extauthz's
            assert hits(frontend) == before[0]
            assert authz_stat(m, "frontend", "error") == before[1] + 1

        assert m.call("frontend", "frontend", "GET", "/").status == 200
        pid = m.extauthz_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            away()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert m.call("frontend", "frontend", "GET", "/").status == 200
        assert m.stop_extauthz() == 0  # graceful SIGTERM exit
        away()
        m.start_extauthz()
        assert m.call("frontend", "frontend", "GET", "/").status == 200
        m.kill_extauthz()
        away()


def test_the_decision_path_with_two_workers(tmp_path: Path) -> None:
    """`serve --workers 2 --http-listen`: Envoy balances the checks over both workers'
    HTTP listeners, each decides right, and each identified the caller by Envoy's XFCC
    (which allowed_headers lets through, for --trust-xfcc)."""
    log = tmp_path / "decisions.jsonl"
    with Mesh(
        tmp_path / "mesh",
        workloads=("payments",),
        clients=("orders", "frontend"),
        transport="http",
        workers=2,
        extauthz_args=["--decision-log", str(log)],
    ) as m:
        allowed = [m.call("orders", "payments", "POST", "/payments/1").status for _ in range(6)]
        denied = [m.call("frontend", "payments", "POST", "/payments/1").status for _ in range(6)]
        assert (allowed, denied) == ([200] * 6, [403] * 6)
        envoy = m.services["payments"].envoy
        assert envoy is not None
        clusters = envoy.admin_get("/clusters")
        for port in (m.http_port, m.http_port + 1):
            (total,) = re.findall(rf"extauthz_http::127\.0\.0\.1:{port}::rq_total::(\d+)", clusters)
            assert int(total) > 0
        assert m.stop_extauthz() == 0  # a graceful stop writes what is queued
    for worker in (0, 1):
        records = [json.loads(line) for line in (tmp_path / f"decisions-{worker}.jsonl").open()]
        assert records
        for record in records:
            assert record["caller"]["source"] == "xfcc"
            allow = record["caller"]["spiffe_id"] == ORDERS_ID
            assert record["outcome"] == ("OUTCOME_ALLOW" if allow else "OUTCOME_PERMISSION_DENIED")
            assert record["workload"] == {"namespace": "shop", "labels": "app=payments"}


# --- never 5xx, never a header Envoy drops, never Envoy's own headers: policies of their own ---

# A mesh with its own policies (the shipped set stays as the tests above read it). The
# mesh-wide RequestAuthentication also writes `user`, a name outside the template's
# allowed_upstream_headers (x-*, authorization): Envoy would drop extauthz's value of it.
OWN_POLICIES = {
    "mesh-jwt.yaml": """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: demo-idp, namespace: istio-system}
spec:
  jwtRules:
    - issuer: https://idp.demo.local
      audiences: [shop]
      jwksUri: demo-idp.jwks.json
      outputClaimToHeaders:
        - {header: user, claim: sub}
        - {header: x-user, claim: sub}
""",
    "shop/claims.yaml": """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: claims, namespace: shop}
spec:
  selector: {matchLabels: {app: claims}}
  action: ALLOW
  rules:
    - from: [{source: {requestPrincipals: ["https://idp.demo.local/*"]}}]
""",
    # Allowed, but the rule mints a token and extauthz runs without --signing-key: an ERROR
    # outcome, 503 token_signing_unconfigured over gRPC.
    "shop/minting.yaml": """\
apiVersion: extauthz.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: minting, namespace: shop}
spec:
  selector: {matchLabels: {app: minting}}
  action: ALLOW
  rules:
    - to: [{operation: {paths: ["/orders/*"]}}]
      token: {}
""",
    # A policy's own 5xx.
    "shop/maintenance.yaml": """\
apiVersion: extauthz.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: maintenance, namespace: shop}
spec:
  selector: {matchLabels: {app: minting}}
  action: DENY
  denyResponse:
    status: 503
    headers: {retry-after: "120"}
    body: {error: down_for_maintenance}
  rules:
    - to: [{operation: {paths: ["/maintenance/*"]}}]
""",
    # Trusts what only Envoy sets: every HTTP check carries x-envoy-internal: true.
    "shop/internal.yaml": """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: internal, namespace: shop}
spec:
  selector: {matchLabels: {app: internal}}
  action: ALLOW
  rules:
    - when: [{key: "request.headers[x-envoy-internal]", values: ["true"]}]
""",
}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Mesh(
        tmp_path_factory.mktemp("mesh-http-own"),
        policies=tmp_path_factory.mktemp("own-policies"),  # empty: OWN_POLICIES is the set
        extra_policies=OWN_POLICIES,
        workloads=("claims", "internal"),
        clients=("frontend",),
        transport="http",
    ) as m:
        yield m


def _fail_open(config: dict[str, Any]) -> None:
    """failure_mode_allow: true, the setting that lets a request through when Envoy takes
    the authorization server's answer for a failure (a 5xx, a timeout, no connection)."""
    _http_ext_authz(config)["failure_mode_allow"] = True


def _fail_open_sidecar(mesh: Mesh) -> Workload:
    name = "minting-fail-open"
    if name not in mesh.services:
        mesh.add_sidecar(name, svid="claims", labels="app=minting", tweak=_fail_open)
    return mesh.services[name]


def test_the_fail_open_sidecar_lets_a_request_through_when_extauthz_is_away(own: Mesh) -> None:
    """What the next test guards against: with extauthz hung past the timeout, this sidecar
    counts a failure and lets the request through to the workload."""
    workload = _fail_open_sidecar(own)
    name = workload.name
    before = hits(workload), authz_stat(own, name, "failure_mode_allowed")
    pid = own.extauthz_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        r = own.call("frontend", name, "GET", "/orders/1")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.status == 200, r.body
    assert (hits(workload), authz_stat(own, name, "failure_mode_allowed")) == (
        before[0] + 1,
        before[1] + 1,
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "/orders/1",
            {"error": "authorization_unavailable", "reason": "token_signing_unconfigured"},
        ),
        ("/maintenance/1", {"error": "down_for_maintenance"}),
    ],
    ids=["unsigned-minting-rule", "policy-503-deny-response"],
)
def test_a_failed_decision_is_a_deny_even_where_envoy_fails_open(
    own: Mesh, path: str, expected: dict[str, str]
) -> None:
    """An ERROR outcome (503 over gRPC) and a policy's 503 denyResponse are answered 403
    over HTTP: a 5xx would be Envoy's own failure, which this sidecar turns into an allow
    (and the template's into its body-less status_on_error). The deny is extauthz's: its
    body and decision id reach the client, Envoy counts a denial, the workload sees nothing."""
    workload = _fail_open_sidecar(own)
    name = workload.name
    counters = ("denied", "error", "failure_mode_allowed")
    before = hits(workload), *(authz_stat(own, name, c) for c in counters)
    r = own.call("frontend", name, "GET", path)
    assert r.status == 403, r.body
    body = r.json()
    assert body.items() >= expected.items()
    assert re.fullmatch("[0-9a-f]{32}", r.headers["x-extauthz-decision-id"])
    if "decision_id" in body:
        assert body["decision_id"] == r.headers["x-extauthz-decision-id"]
    else:
        assert r.headers["retry-after"] == "120"  # the policy's headers come along
    after = hits(workload), *(authz_stat(own, name, c) for c in counters)
    assert after == (before[0], before[1] + 1, before[2], before[3])


def test_a_claim_header_envoy_would_drop_is_removed_instead(own: Mesh) -> None:
    """outputClaimToHeaders writes `user`, which allowed_upstream_headers does not pass:
    Envoy would drop extauthz's value and forward the client's own `user: admin`. The
    upstream gets no `user` at all; x-user, which Envoy passes, carries the claim."""
    claims = own.services["claims"]
    before = hits(claims)
    forged = {"user": "admin", "x-user": "admin"}
    r = own.call("frontend", "claims", "GET", "/", token=token(own), headers=forged)
    assert r.status == 200, r.body
    h = r.json()["headers"]
    assert "user" not in h, h
    assert h["x-user"] == "alice"
    assert "x-envoy-auth-headers-to-remove" not in h
    assert hits(claims) == before + 1


@pytest.mark.parametrize("sent", [{}, {"x-envoy-internal": "true"}], ids=["plain", "client-set"])
def test_a_policy_never_sees_x_envoy_internal(own: Mesh, sent: dict[str, str]) -> None:
    """Envoy's HTTP client marks every check x-envoy-internal: true; a policy trusting it
    would allow every caller. extauthz drops it over HTTP, so the policy never matches."""
    internal = own.services["internal"]
    before = hits(internal)
    r = own.call("frontend", "internal", "GET", "/", headers=sent)
    assert r.status == 403, r.body
    assert r.json()["reason"] == "no_allow_policy_matched"
    assert hits(internal) == before
