"""``extauthz certs`` and ``extauthz token``: development-only helpers the demo also uses.

Flags are checked as a table (a bad one exits 2 naming it); a token the CLI signs is verified
by the real Authorizer against a RequestAuthentication that trusts the JWKS the CLI wrote;
the SVIDs carry the SPIFFE ID as their only URI SAN and chain to the CA written beside them.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from extauthz import cli
from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput

ISSUER = "https://idp.test"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "idp.pem"
    cli.main(["token", "--new-key", "--key", str(path)])
    return path


BAD_FLAGS = [
    # (argv, what stderr must name); {d} is a fresh directory, {key} an existing dev key
    (["certs", "web"], "--out"),
    (["certs", "--out", "{d}/c"], "NAME"),
    (["certs", "--out", "{d}/c", "--trust-domain", "Demo.Local", "web"], "--trust-domain"),
    (["certs", "--out", "{d}/c", "--trust-domain", "td/x", "web"], "--trust-domain"),
    (["certs", "--out", "{d}/c", "--namespace", "a/b", "web"], "--namespace"),
    (["certs", "--out", "{d}/c", "../web"], "NAME"),
    (["certs", "--out", "{d}/c", ".hidden"], "NAME"),
    (["certs", "--out", "{d}/c", "ca"], "NAME"),  # would overwrite ca.pem
    (["certs", "--out", "{d}/c", "web", "web-key"], "NAME"),  # web-key.pem twice
    (["certs", "--out", "{d}/c", "web", "web"], "NAME"),
    (["certs", "--out", "{key}", "web"], "--out"),  # a file, not a directory
    (["token"], "--key"),
    (["token", "--key", "{d}/missing.pem"], "--new-key"),
    (["token", "--key", "{d}/not-a-key.pem"], "--key"),
    (["token", "--key", "{d}/rsa.pem"], "--key"),
    (["token", "--new-key", "--key", "{key}"], "--key"),  # never replaces a key
    (["token", "--key", "{key}", "--ttl", "soon"], "--ttl"),
    (["token", "--key", "{key}", "--ttl", "nan"], "--ttl"),
    (["token", "--key", "{key}", "--claim", "roles"], "--claim"),
    (["token", "--key", "{key}", "--claim", "=1"], "--claim"),
    (["token", "--key", "{key}", "--claim", "iss=https://other"], "--issuer"),
    (["token", "--key", "{key}", "--claim", "exp=1"], "--ttl"),
    (["token", "--key", "{key}", "--issuer", ""], "--issuer"),
    (["token", "--key", "{key}", "--jwks", "{d}"], "--jwks"),
    (["demo", "--base-port", "0"], "--base-port"),
    (["demo", "--base-port", "65533"], "--base-port"),
    (["demo", "--base-port", "http"], "--base-port"),
]


@pytest.mark.parametrize(("argv", "named"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], named: str, tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not-a-key.pem").write_text("hello\n")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    before = key.read_bytes()
    args = [a.format(d=tmp_path, key=key) for a in argv]
    code, out, err = run(args, capsys)
    assert code == 2, (out, err)
    assert named in err, err
    assert "Traceback" not in err
    assert out == ""  # no half-made token or file list
    assert key.read_bytes() == before


@pytest.mark.parametrize("command", ["certs", "token"])
def test_marked_development_only(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert f"{command}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "DEVELOPMENT ONLY" in capsys.readouterr().out


def test_banner_on_stderr_keeps_stdout_a_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["token", "--new-key", "--key", str(tmp_path / "k.pem")], capsys)
    assert code == 0
    assert "DEVELOPMENT ONLY" in err
    # Only the JWT on stdout, so TOKEN=$(extauthz token ...) works.
    assert out.count(".") == 2
    assert "\n" not in out.strip()
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


POLICIES = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: dev, namespace: shop}}
spec:
  jwtRules:
    - issuer: {ISSUER}
      audiences: [orders]
      jwksUri: idp.jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: admins, namespace: shop}}
spec:
  rules:
    - from: [{{source: {{requestPrincipals: ["{ISSUER}/bob"]}}}}]
      when:
        - {{key: "request.auth.claims[roles]", values: [admin]}}
        - {{key: "request.auth.claims[team][name]", values: [payments]}}
        - {{key: "request.auth.claims[email]", values: [bob@example.com]}}
"""

GOOD = [
    "--subject=bob",
    "--audience=orders",
    '--claim=roles=["dev", "admin"]',
    '--claim=team={"name": "payments"}',
    "--claim=email=bob@example.com",
]

TOKENS = [
    # (flags after --key, expected decision reason)
    (GOOD, "allowed_by_policy"),
    ([*GOOD, "--audience=shop"], "allowed_by_policy"),  # a list aud holding orders
    ([a for a in GOOD if "roles" not in a], "no_allow_policy_matched"),
    ([*GOOD[:2], '--claim=roles=["dev"]', *GOOD[3:]], "no_allow_policy_matched"),
    (["--subject=alice", *GOOD[1:]], "no_allow_policy_matched"),
    ([*GOOD, "--ttl=-120"], "jwt_expired"),
    ([g for g in GOOD if "audience" not in g] + ["--audience=payments"], "jwt_audience_invalid"),
    ([*GOOD, "--issuer=https://elsewhere"], "jwt_issuer_unknown"),
]


@pytest.mark.parametrize(("flags", "reason"), TOKENS, ids=[r for _, r in TOKENS])
def test_cli_token_is_verified_by_the_authorizer(
    flags: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    key, jwks = tmp_path / "idp.pem", policies / "idp.jwks.json"
    code, _, err = run(["token", "--new-key", "--key", str(key), "--jwks", str(jwks)], capsys)
    assert code == 0, err
    (policies / "p.yaml").write_text(POLICIES)
    code, token, err = run(["token", "--key", str(key), "--issuer", ISSUER, *flags], capsys)
    assert code == 0, err
    authorizer = Authorizer(PolicySet.load(policies), Settings(workload_namespace="shop"))
    inp = CheckInput(method="GET", path="/", headers={"authorization": f"Bearer {token.strip()}"})
    assert authorizer.check(inp).reason == reason


def test_token_from_another_key_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(POLICIES)
    trusted, other = tmp_path / "trusted.pem", tmp_path / "other.pem"
    jwks = str(policies / "idp.jwks.json")
    run(["token", "--new-key", "--key", str(trusted), "--jwks", jwks], capsys)
    run(["token", "--new-key", "--key", str(other)], capsys)
    _, token, _ = run(["token", "--key", str(other), "--issuer", ISSUER, *GOOD], capsys)
    authorizer = Authorizer(PolicySet.load(policies), Settings(workload_namespace="shop"))
    inp = CheckInput(headers={"authorization": f"Bearer {token.strip()}"})
    # Each key's kid is its thumbprint: the other key's is simply unknown to the JWKS.
    assert authorizer.check(inp).reason == "jwt_key_unknown"


def test_token_claims_and_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.pem"
    _, token, _ = run(
        ["token", "--new-key", "--key", str(key), "--claim", "n=3", "--claim", "s=not json"],
        capsys,
    )
    claims = jwt.decode(token.strip(), options={"verify_signature": False})
    assert claims["iss"] == "https://idp.demo.local"  # the demo's: its tokens work there
    assert (claims["sub"], claims["aud"], claims["n"], claims["s"]) == (
        "alice",
        "shop",
        3,
        "not json",
    )
    assert claims["exp"] - claims["iat"] == 3600
    _, token2, _ = run(["token", "--key", str(key)], capsys)
    kids = {jwt.get_unverified_header(t.strip())["kid"] for t in (token, token2)}
    assert len(kids) == 1  # the thumbprint: the same key file, the same kid


CERTS = [
    # (flags, names, expected trust domain, namespace, DNS SANs)
    ([], ["frontend", "orders"], "demo.local", "shop", ["localhost"]),
    (
        ["--trust-domain", "prod.example", "--namespace", "payments"],
        ["api"],
        "prod.example",
        "payments",
        ["localhost"],
    ),
    (
        ["--dns", "api.local", "--dns", "api"],
        ["api.v2_x"],
        "demo.local",
        "shop",
        ["api.local", "api"],
    ),
]


@pytest.mark.parametrize(("flags", "names", "domain", "namespace", "dns"), CERTS)
def test_certs_carry_the_spiffe_id_and_chain_to_the_ca(
    flags: list[str],
    names: list[str],
    domain: str,
    namespace: str,
    dns: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "certs"
    code, stdout, err = run(["certs", "--out", str(out), *flags, *names], capsys)
    assert code == 0, err
    assert "DEVELOPMENT ONLY" in err
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ca.pem", *(f"{n}.pem" for n in names), *(f"{n}-key.pem" for n in names)]
    )
    for name in names:
        expected = f"spiffe://{domain}/ns/{namespace}/sa/{name}"
        assert expected in stdout
        cert = x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [expected]
        assert san.get_values_for_type(x509.DNSName) == dns
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        key_file = out / f"{name}-key.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key() == cert.public_key()


def test_jwks_written_by_the_cli_is_a_key_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = tmp_path / "jwks.json"
    run(["token", "--new-key", "--key", str(tmp_path / "k.pem"), "--jwks", str(jwks)], capsys)
    (jwk,) = json.loads(jwks.read_text())["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
    assert "d" not in jwk  # the public half only
