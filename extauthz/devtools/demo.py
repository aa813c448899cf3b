"""``extauthz demo``: the shop mesh on 127.0.0.1, a scripted scenario, then your own requests.

Development only. ``--once`` plays the scenario and exits non-zero if any step misbehaves.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from .mesh import ISSUER, Mesh


@dataclass(frozen=True)
class Step:
    story: str
    caller: str
    target: str
    method: str
    path: str
    token: Callable[[Mesh], str | None]
    status: int
    reason: str = ""


def _user(mesh: Mesh, **claims: object) -> str:
    return mesh.idp.token("alice", audience="shop", **claims)  # type: ignore[arg-type]


def _forged(mesh: Mesh) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {"iss": ISSUER, "sub": "mallory", "aud": "shop"}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": mesh.idp.kid})


SCENARIO = (
    Step("frontend reads orders for alice", "frontend", "orders", "GET", "/orders/42", _user, 200),
    Step(
        "orders charges a card",
        "orders",
        "payments",
        "POST",
        "/payments/charge",
        lambda m: None,
        200,
    ),
    Step(
        "frontend calls payments directly (lateral move)",
        "frontend",
        "payments",
        "POST",
        "/payments/charge",
        _user,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "an unknown workload calls orders",
        "intruder",
        "orders",
        "GET",
        "/orders",
        _user,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "frontend calls orders with no user token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        lambda m: None,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "frontend calls orders with an expired token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        lambda m: _user(m, ttl=-3600),
        401,
        "jwt_expired",
    ),
    Step(
        "frontend calls orders with a forged token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        _forged,
        401,
        "jwt_signature_invalid",
    ),
    Step(
        "a user opens /admin (DENY policy)",
        "orders",
        "frontend",
        "GET",
        "/admin",
        lambda m: _user(m, roles=["user"]),
        403,
        "denied_by_policy",
    ),
    Step(
        "an admin opens /admin",
        "orders",
        "frontend",
        "GET",
        "/admin",
        lambda m: _user(m, roles=["admin"]),
        200,
    ),
)


def play(mesh: Mesh, out: Callable[[str], None] = print) -> int:
    """Run the scenario; return the number of steps that did not answer as expected."""
    failures = 0
    for n, step in enumerate(SCENARIO, 1):
        resp = mesh.call(step.caller, step.target, step.method, step.path, token=step.token(mesh))
        reason = ""
        if resp.status != 200 and resp.body.startswith(b"{"):
            reason = str(resp.json().get("reason", ""))
        ok = resp.status == step.status and (not step.reason or reason == step.reason)
        failures += not ok
        mark = "ok " if ok else "BAD"
        verdict = "allowed" if resp.status == 200 else f"denied {resp.status} {reason}"
        out(f" {mark} {n}. {step.story:<50} {step.caller:>8} -> {step.target:<8} {verdict}")
        if not ok:
            out(f"      expected {step.status} {step.reason}, got {resp.status}: {resp.body!r}")
    return failures


def _instructions(mesh: Mesh) -> str:
    certs = mesh.workdir / "certs"
    token_file = mesh.workdir / "alice.jwt"
    token_file.write_text(_user(mesh, ttl=3600) + "\n")
    port = mesh.services["orders"].port
    return f"""
Try it yourself (valid for an hour):
  curl --cacert {certs}/ca.pem --cert {certs}/frontend.pem --key {certs}/frontend-key.pem \\
       -H "authorization: Bearer $(cat {token_file})" https://localhost:{port}/orders
  (swap frontend.pem/-key.pem for intruder's, or drop the token, to see the denials)

Sidecars: {", ".join(f"{n} https://localhost:{w.port}" for n, w in mesh.services.items())}
extauthz: 127.0.0.1:{mesh.extauthz_port}, log {mesh.extauthz_log}
Policies: {mesh.policy_dir} (Istio YAML; see policies/README.md)
Press Ctrl-C to stop everything."""


def main(*, once: bool, workdir: Path) -> int:
    print("Starting extauthz and three Envoy sidecars (frontend, orders, payments)...")
    with Mesh(workdir.resolve()) as mesh:
        print("\nScenario (SPIFFE identity from mTLS, JWT from the demo IdP, Istio policies):")
        failures = play(mesh)
        print(f"\n{len(SCENARIO) - failures}/{len(SCENARIO)} steps answered as expected.")
        if once:
            return 1 if failures else 0
        print(_instructions(mesh))
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        print("\nStopping...")
    return 1 if failures else 0
