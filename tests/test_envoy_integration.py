"""Through real Envoy sidecars with mTLS: the shipped policies, envoy/sidecar.yaml, extauthz.

One mesh for the module (extauthz + frontend/orders/payments, each behind its own Envoy).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extauthz.devtools.mesh import Mesh

ALICE_ROLES = {"roles": ["user"]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with Mesh(tmp_path_factory.mktemp("mesh")) as m:
        yield m


def token(mesh: Mesh, **kw: object) -> str:
    kw.setdefault("audience", "shop")
    return mesh.idp.token("alice", **kw)  # type: ignore[arg-type]


def test_allowed_call_reaches_upstream_with_identity_headers(mesh: Mesh) -> None:
    r = mesh.call("frontend", "orders", "GET", "/orders/42?expand=items", token=token(mesh))
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["service"] == "orders"
    assert seen["path"] == "/orders/42?expand=items"
    h = seen["headers"]
    assert h["x-extauthz-spiffe-id"] == "spiffe://demo.local/ns/shop/sa/frontend"
    assert h["x-user"] == "alice"  # outputClaimToHeaders
    assert len(h["x-extauthz-decision-id"]) == 32
    assert "authorization" not in h  # forwardOriginalToken: false


def test_lateral_move_is_denied_with_json_reason(mesh: Mesh) -> None:
    before = mesh.services["payments"].upstream.hits  # type: ignore[union-attr]
    r = mesh.call("frontend", "payments", "POST", "/payments/1", token=token(mesh))
    assert r.status == 403
    body = r.json()
    assert body["error"] == "permission_denied"
    assert body["reason"] == "no_allow_policy_matched"
    assert body["decision_id"] == r.headers["x-extauthz-decision-id"]
    assert r.headers["content-type"] == "application/json"
    assert mesh.services["payments"].upstream.hits == before  # type: ignore[union-attr]


def test_service_to_service_call_without_user_token(mesh: Mesh) -> None:
    r = mesh.call("orders", "payments", "POST", "/payments/charge")
    assert r.status == 200, r.body
    assert r.json()["headers"]["x-extauthz-spiffe-id"].endswith("/sa/orders")


def test_a_policy_deny_response_reaches_the_client(mesh: Mesh) -> None:
    """policies/shop/payments-limits.yaml: CEL over a header, its own status, headers, body."""
    before = mesh.services["payments"].upstream.hits  # type: ignore[union-attr]
    small = mesh.call("orders", "payments", "POST", "/payments/charge", headers={"x-amount": "9"})
    assert small.status == 200, small.body
    r = mesh.call("orders", "payments", "POST", "/payments/charge", headers={"x-amount": "20000"})
    assert r.status == 422, r.body
    assert r.json() == {"error": "amount_over_limit", "limit": 10000}
    assert r.headers["x-limit"] == "10000"
    assert r.headers["content-type"] == "application/json"
    assert "x-extauthz-decision-id" in r.headers
    assert mesh.services["payments"].upstream.hits == before + 1  # only the small charge


def test_wrong_spiffe_id_is_denied(mesh: Mesh) -> None:
    r = mesh.call("intruder", "orders", "GET", "/orders", token=token(mesh))
    assert r.status == 403
    assert r.json()["reason"] == "no_allow_policy_matched"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda m: token(m, ttl=-3600), "jwt_expired"),
        (lambda m: token(m, audience="other"), "jwt_audience_invalid"),
        (lambda m: "not.a.jwt", "jwt_malformed"),
        (
            lambda m: jwt.encode(
                {"iss": "https://idp.demo.local", "sub": "mallory", "aud": "shop"},
                ec.generate_private_key(ec.SECP256R1()),
                algorithm="ES256",
                headers={"kid": m.idp.kid},
            ),
            "jwt_signature_invalid",
        ),
        (
            lambda m: jwt.encode({"iss": "https://evil", "sub": "x"}, "k" * 32, "HS256"),
            "jwt_issuer_unknown",
        ),
    ],
    ids=["expired", "wrong-aud", "malformed", "forged-signature", "unknown-issuer"],
)
def test_invalid_token_is_401(mesh: Mesh, make: object, reason: str) -> None:
    r = mesh.call("frontend", "orders", "GET", "/orders", token=make(mesh))  # type: ignore[operator]
    assert r.status == 401, r.body
    assert r.json()["reason"] == reason
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="extauthz", error="invalid_token"')


def test_missing_token_is_left_to_policy(mesh: Mesh) -> None:
    # orders requires a request principal: no token means no ALLOW rule matches (403, not 401)
    assert mesh.call("frontend", "orders", "GET", "/orders").status == 403
    # frontend allows any GET: no token is fine there
    assert mesh.call("orders", "frontend", "GET", "/").status == 200


def test_deny_policy_beats_allow(mesh: Mesh) -> None:
    user = token(mesh, roles=["user"])
    admin = token(mesh, roles=["user", "admin"])
    assert mesh.call("orders", "frontend", "GET", "/admin", token=user).status == 403
    assert mesh.call("orders", "frontend", "GET", "/admin", token=admin).status == 200


def test_caller_cannot_spoof_identity_headers(mesh: Mesh) -> None:
    forged = {
        "x-extauthz-spiffe-id": "spiffe://demo.local/ns/shop/sa/payments",
        "x-user": "admin",
        "x-forwarded-client-cert": "URI=spiffe://demo.local/ns/shop/sa/payments",
    }
    r = mesh.call("orders", "frontend", "GET", "/", headers=forged)
    assert r.status == 200
    h = r.json()["headers"]
    assert h["x-extauthz-spiffe-id"] == "spiffe://demo.local/ns/shop/sa/orders"
    assert "x-user" not in h  # no token: extauthz sets no x-user, and strips the forged one
    # Envoy replaced the forged XFCC (SANITIZE_SET); extauthz (--trust-xfcc) read Envoy's.
    xfcc = h["x-forwarded-client-cert"]
    assert "URI=spiffe://demo.local/ns/shop/sa/orders" in xfcc
    assert "payments" not in xfcc


def test_a_forged_xfcc_cannot_make_a_lateral_move(mesh: Mesh) -> None:
    # frontend may not call payments; claiming to be orders in XFCC must not help.
    forged = {"x-forwarded-client-cert": "URI=spiffe://demo.local/ns/shop/sa/orders"}
    r = mesh.call("frontend", "payments", "POST", "/payments/1", headers=forged, token=token(mesh))
    assert r.status == 403, r.body
    assert r.json()["reason"] == "no_allow_policy_matched"


@pytest.mark.parametrize("caller", [None, "rogue"], ids=["no-client-cert", "untrusted-ca"])
def test_unauthenticated_connection_never_reaches_upstream(mesh: Mesh, caller: str | None) -> None:
    upstream = mesh.services["frontend"].upstream
    assert upstream is not None
    before = upstream.hits
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mesh.call(caller, "frontend", "GET", "/")
    assert upstream.hits == before


def _counter(mesh: Mesh, workload: str, name: str) -> int:
    envoy = mesh.services[workload].envoy
    assert envoy is not None
    for line in envoy.admin_get(f"/stats?filter=^http.inbound.ext_authz.{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == f"http.inbound.ext_authz.{name}":
            return int(value)
    raise AssertionError(f"no counter {name}")


def test_envoy_counts_our_answers_as_ok_and_denied_never_error(mesh: Mesh) -> None:
    before = {n: _counter(mesh, "payments", n) for n in ("ok", "denied", "error")}
    assert mesh.call("frontend", "payments", "POST", "/payments/1").status == 403
    assert mesh.call("orders", "payments", "POST", "/payments/1").status == 200
    after = {n: _counter(mesh, "payments", n) for n in ("ok", "denied", "error")}
    assert after["denied"] == before["denied"] + 1
    assert after["ok"] == before["ok"] + 1
    assert after["error"] == 0  # every answer was a CheckResponse, never an RPC failure


def test_extauthz_down_fails_closed(tmp_path: Path) -> None:
    """Envoy with failure_mode_allow: false answers 503 while extauthz is away."""
    with Mesh(tmp_path, workloads=("frontend",), clients=()) as m:
        assert m.call("frontend", "frontend", "GET", "/").status == 200
        assert m.stop_extauthz() == 0  # graceful SIGTERM exit
        upstream = m.services["frontend"].upstream
        assert upstream is not None
        before = upstream.hits
        assert m.call("frontend", "frontend", "GET", "/").status == 503
        assert upstream.hits == before


def test_envoy_reaches_extauthz_over_a_unix_socket(tmp_path: Path) -> None:
    """The documented `--listen unix:/path` + Envoy `pipe` address, end to end."""
    with Mesh(tmp_path, workloads=("frontend",), clients=(), unix_socket=True) as m:
        assert m.extauthz_target.startswith("unix:")
        allowed = m.call("frontend", "frontend", "GET", "/")
        assert allowed.status == 200
        assert allowed.json()["headers"]["x-extauthz-spiffe-id"].endswith("/sa/frontend")
        assert m.call("frontend", "frontend", "POST", "/").status == 403
        envoy = m.services["frontend"].envoy
        assert envoy is not None
        assert "http.inbound.ext_authz.error: 0" in envoy.admin_get("/stats?filter=ext_authz")


@pytest.mark.parametrize("path", ["/orders//42", "/orders/./42", "/orders/x/../42"])
def test_the_sidecar_authorizes_the_normalized_path(mesh: Mesh, path: str) -> None:
    """Envoy normalizes before ext_authz: the path extauthz decides on is the one served."""
    r = mesh.call("frontend", "orders", "GET", path, token=token(mesh))
    assert r.status == 200, r.body
    assert r.json()["path"] == "/orders/42"


def test_underscored_header_names_are_refused(mesh: Mesh) -> None:
    r = mesh.call("orders", "frontend", "GET", "/", headers={"x_user": "admin"})
    assert r.status == 400


MINTING = """\
apiVersion: extauthz.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
    - from: [{source: {requestPrincipals: ["https://idp.demo.local/*"]}}]
      to: [{operation: {methods: [GET], paths: [/orders/*]}}]
      token: {claims: [email], audience: orders, ttl: 60s}
"""


def test_minted_token_and_decision_log_through_envoy(tmp_path: Path) -> None:
    """Token exchange and the decision log through a real sidecar: the workload receives the
    minted token (never the caller's), and the log holds the decision the client saw, with
    no credential in it."""
    import json as _json

    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from extauthz.devtools.mesh import EXAMPLE_POLICIES

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "mesh-jwt.yaml").write_text((EXAMPLE_POLICIES / "mesh-jwt.yaml").read_text())
    (policies / "orders.yaml").write_text(MINTING)
    signing = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(
        signing.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    log_file = tmp_path / "decisions.jsonl"
    args = ["--signing-key", str(key_file), "--decision-log", str(log_file)]
    with Mesh(
        tmp_path / "mesh",
        policies=policies,
        workloads=("orders",),
        clients=("frontend",),
        extauthz_args=args,
    ) as m:
        caller = m.idp.token("alice", audience="shop", email="alice@example.com", ttl=600)
        r = m.call("frontend", "orders", "GET", "/orders/7", token=caller)
        assert r.status == 200, r.body
        upstream = r.json()["headers"]
        minted = upstream["authorization"].removeprefix("Bearer ")
        assert minted != caller
        claims = pyjwt.decode(
            minted,
            signing.public_key(),
            algorithms=["ES256"],
            audience="orders",
            issuer="extauthz",
        )
        assert claims["sub"] == "alice"
        assert claims["email"] == "alice@example.com"
        assert claims["azp"] == m.spiffe_id("frontend")
        decision_id = upstream["x-extauthz-decision-id"]  # on allow it goes upstream
        denied = m.call("frontend", "orders", "GET", "/other", token=caller)
        assert denied.status == 403
        assert m.stop_extauthz() == 0  # a graceful stop writes what is queued
    text = log_file.read_text()
    records = {rec["decision_id"]: rec for rec in map(_json.loads, text.splitlines())}
    assert records[decision_id]["outcome"] == "OUTCOME_ALLOW"
    assert records[decision_id]["minted_token_audience"] == "orders"
    # The mesh trusts XFCC (its sidecar sets it): the caller came from Envoy's header.
    assert records[decision_id]["caller"]["source"] == "xfcc"
    assert records[decision_id]["caller"]["spiffe_id"].endswith("/sa/frontend")
    assert records[denied.headers["x-extauthz-decision-id"]]["http_status"] == 403
    assert caller not in text
    assert minted not in text
    assert caller.split(".")[1] not in text  # not even the payload
