"""Token exchange: ``token:`` rules mint a short-lived JWT for the upstream, signed with
``--signing-key`` and verifiable with the JWKS ``--jwks-listen`` serves."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz import cli, policytest
from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Decision, Outcome
from extauthz.devtools.idp import DevIdP
from extauthz.errors import PolicySetError, SigningKeyError
from extauthz.identity.mint import (
    MintedTokenCache,
    SigningKey,
    TokenMinter,
    TokenSpec,
    jwk_thumbprint,
    load_signing_key,
    request_audience,
)
from extauthz.jwks_server import JwksServer
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.response import to_check_response
from extauthz.server import Server
from extauthz.telemetry import Telemetry, span_attributes

EXT = "extauthz.io/v1alpha1"
ISS = "https://idp.test"
IDP = DevIdP.create(ISS)
CALLER = "spiffe://demo.local/ns/shop/sa/frontend"
SETTINGS = Settings(workload_namespace="ns1")
KEY = SigningKey.generate()


class Clock:
    """An injected clock: tests move time, never sleep."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def request_authentication(**rule: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "idp", "namespace": "ns1"},
        "spec": {"jwtRules": [{"issuer": ISS, "jwks": IDP.jwks(), **rule}]},
    }


def policy(*rules: dict[str, Any], action: str = "ALLOW", api: str = EXT) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "mint", "namespace": "ns1"},
        "spec": {"action": action, "rules": list(rules)},
    }


def minting(token: dict[str, Any] | None, path: str = "/*", **extra: Any) -> dict[str, Any]:
    """A rule that allows ``path`` and mints ``token``."""
    return {"to": [{"operation": {"paths": [path]}}], "token": token, **extra}


def load(tmp_path: Path, *docs: dict[str, Any]) -> PolicySet:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(docs))
    return PolicySet.load(tmp_path)


def authorizer(
    tmp_path: Path, *docs: dict[str, Any], minter: TokenMinter | None = None
) -> Authorizer:
    return Authorizer(load(tmp_path, *docs), SETTINGS, minter=minter)


def request(
    token: str | None = None,
    *,
    principal: str = CALLER,
    host: str = "orders.shop:8080",
    path: str = "/orders/1",
    headers: dict[str, str] | None = None,
) -> CheckInput:
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return CheckInput(method="GET", host=host, path=path, headers=h, source_principal=principal)


def decode(
    token: str, key: SigningKey = KEY, audience: str = "orders.shop", leeway: float = 0
) -> dict[str, Any]:
    """Verify a minted token as an upstream would, with the published JWK only."""
    public = jwt.PyJWK(dict(key.public_jwk))
    claims: dict[str, Any] = jwt.decode(
        token,
        public.key,
        algorithms=[key.algorithm],
        audience=audience,
        issuer="extauthz",
        leeway=leeway,
    )
    return claims


def upstream(decision: Decision) -> tuple[dict[str, str], list[str]]:
    """Headers set and removed upstream, read from the real CheckResponse."""
    ok = to_check_response(decision).ok_response
    return {h.header.key: h.header.value for h in ok.headers}, list(ok.headers_to_remove)


def bearer(decision: Decision, header: str = "authorization") -> str:
    value = upstream(decision)[0][header]
    return value.removeprefix("Bearer ") if header == "authorization" else value


# --- load errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        *(
            (policy(minting({"claims": ["email", name]})), f"['{name}'] are set by extauthz")
            for name in ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "azp", "act")
        ),
        (policy(minting({"claims": ["a", "a"]})), "names a claim twice"),
        (policy(minting({"claims": "email"})), "must be a list of claim names"),
        (policy(minting({"claims": [""]})), "must be a list of claim names"),
        (policy(minting({"ttl": "60"})), "ttl: must be a positive duration like 5s"),
        (policy(minting({"ttl": 60})), "ttl: must be a positive duration like 5s"),
        (policy(minting({"ttl": "1d"})), "ttl: must be a positive duration like 5s"),
        (policy(minting({"ttl": "0s"})), "ttl: must be a positive duration like 5s"),
        (policy(minting({"ttl": "61m"})), "61m is not between 1s and 1h"),
        (policy(minting({"ttl": "1.5s"})), "1.5s is not a whole number of seconds"),
        (policy(minting({"audience": ""})), "token.audience: must be a non-empty string"),
        (policy(minting({"audience": ["a"]})), "token.audience: must be a non-empty string"),
        (policy(minting({"header": "x-extauthz-token"})), "not x-extauthz-*"),
        (policy(minting({"header": "cookie"})), "another reserved header"),
        (policy(minting({"header": "bad header"})), "must be authorization or a header name"),
        (policy(minting({"audiance": "x"})), "unknown field 'audiance' (did you mean 'audience'?)"),
        (policy(minting([])), "rules[0].token: must be a mapping"),
        (
            policy(minting({"header": "x-up"}, headers={"x-up": "static"})),
            "'x-up' is where the minted token goes",
        ),
        (policy(minting({}), action="DENY"), "rules[0].token: only an ALLOW rule mints a token"),
        (policy(minting({}), action="AUDIT"), "only an ALLOW rule mints a token"),
        (policy(minting({}), api="security.istio.io/v1"), "rules[0]: unknown field 'token'"),
    ],
)
def test_refused_at_load_with_the_field_named(
    tmp_path: Path, doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicySetError) as err:
        load(tmp_path, doc)
    text = str(err.value)
    assert message in text, text
    assert f"{tmp_path / 'p.yaml'}:" in text
    assert "AuthorizationPolicy ns1/mint" in text


def test_a_load_error_names_the_line_of_the_field(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        f"""apiVersion: {EXT}
kind: AuthorizationPolicy
metadata: {{name: mint, namespace: ns1}}
spec:
  rules:
    - token:
        claims: [email]
        ttl: 2h
"""
    )
    with pytest.raises(PolicySetError) as err:
        PolicySet.load(tmp_path)
    assert f"{tmp_path / 'p.yaml'}:8: " in str(err.value)
    assert "rules[0].token.ttl: 2h is not between 1s and 1h" in str(err.value)


def test_defaults_and_a_bare_token_key(tmp_path: Path) -> None:
    doc = policy(
        minting(None),
        minting({"claims": [], "audience": "payments", "header": "X-Up", "ttl": "1m30s"}),
    )
    rules = load(tmp_path, doc).authz[0].rules
    assert rules[0].token == TokenSpec((), "", "authorization", 60)
    assert rules[1].token == TokenSpec((), "payments", "x-up", 90)
    assert load(tmp_path, doc).mints_tokens


# --- minted content -----------------------------------------------------------------------


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer("127.0.0.1:0", KEY, "extauthz")
    server.start()
    yield server
    server.stop()


def test_the_minted_token_verifies_against_the_served_jwks(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    auth = authorizer(
        tmp_path,
        request_authentication(),
        policy(minting({"claims": ["email", "groups", "tenant"]})),
        minter=TokenMinter(KEY),
    )
    original = IDP.token(
        "alice", email="a@example.com", groups=["admin"], phone="555", act={"sub": "gateway"}
    )
    decision = auth.check(request(original))
    assert decision.allowed, decision
    minted = bearer(decision)
    # As an upstream would: fetch the JWKS over HTTP, pick the key by kid.
    client = jwt.PyJWKClient(f"http://127.0.0.1:{jwks_server.port}/.well-known/jwks.json")
    signing = client.get_signing_key_from_jwt(minted)
    claims = jwt.decode(
        minted, signing.key, algorithms=["ES256"], audience="orders.shop", issuer="extauthz"
    )
    assert jwt.get_unverified_header(minted) == {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}
    assert claims.pop("exp") - claims.pop("iat") == 60
    assert len(claims.pop("jti")) == 32
    assert claims == {
        "iss": "extauthz",
        "sub": "alice",  # the user, not the workload that called
        "aud": "orders.shop",  # the request's host, port stripped
        "azp": CALLER,
        "act": {"sub": CALLER, "act": {"sub": "gateway"}},  # RFC 8693: prior actor nested
        "email": "a@example.com",
        "groups": ["admin"],
        # not named: phone; named but absent: tenant
    }
    assert decision.token_audience == "orders.shop"
    assert span_attributes(decision, None)["extauthz.token.audience"] == "orders.shop"


def test_without_a_token_the_caller_is_the_subject(tmp_path: Path) -> None:
    auth = authorizer(
        tmp_path,
        policy(minting({"claims": ["email"], "audience": "payments"})),
        minter=TokenMinter(KEY),
    )
    claims = decode(bearer(auth.check(request())), audience="payments")
    assert (claims["sub"], claims["azp"], claims["act"]) == (CALLER, CALLER, {"sub": CALLER})
    assert "email" not in claims


def test_a_caller_without_spiffe_id_gets_no_actor(tmp_path: Path) -> None:
    auth = authorizer(
        tmp_path, request_authentication(), policy(minting({})), minter=TokenMinter(KEY)
    )
    claims = decode(bearer(auth.check(request(IDP.token("bob"), principal=""))))
    assert claims["sub"] == "bob"
    assert "azp" not in claims
    assert "act" not in claims


@pytest.mark.parametrize(
    ("host", "audience"),
    [
        ("orders.shop", "orders.shop"),
        ("orders.shop:8080", "orders.shop"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("[::1]:8443", "[::1]"),
        ("[::1]", "[::1]"),
        ("", ""),
    ],
)
def test_the_default_audience_is_the_host_without_port(host: str, audience: str) -> None:
    assert request_audience(host) == audience


def test_exp_is_capped_at_the_original_tokens(tmp_path: Path) -> None:
    auth = authorizer(
        tmp_path,
        request_authentication(),
        policy(minting({"ttl": "5m"})),
        minter=TokenMinter(KEY),
    )
    original = IDP.token("alice", ttl=20)
    original_exp = jwt.decode(original, options={"verify_signature": False})["exp"]
    claims = decode(bearer(auth.check(request(original))))
    assert claims["exp"] == original_exp
    assert claims["exp"] - claims["iat"] <= 20


def test_a_token_in_its_last_seconds_of_skew_mints_nothing(tmp_path: Path) -> None:
    auth = authorizer(
        tmp_path, request_authentication(), policy(minting({})), minter=TokenMinter(KEY)
    )
    # Expired 10 s ago: still inside the 60 s skew the verifier allows, but a token minted
    # from it would be expired at birth.
    decision = auth.check(request(IDP.token("alice", ttl=-10)))
    assert decision.outcome is Outcome.UNAUTHENTICATED
    assert decision.reason == "jwt_expired"
    assert to_check_response(decision).denied_response.status.code == 401


# --- headers: the original token and spoofing ------------------------------------------------


@pytest.mark.parametrize(
    ("jwt_rule", "token_header", "sent_in", "original"),
    [
        # minted into the same header: it replaces the original (never set and removed)
        ({}, "authorization", "authorization", "replaced"),
        ({"forwardOriginalToken": True}, "authorization", "authorization", "replaced"),
        # minted elsewhere: the original goes along only with forwardOriginalToken
        ({}, "x-upstream-token", "authorization", "removed"),
        ({"forwardOriginalToken": True}, "x-upstream-token", "authorization", "forwarded"),
        ({"fromHeaders": [{"name": "x-jwt"}]}, "authorization", "x-jwt", "removed"),
    ],
)
def test_the_original_token_is_removed_unless_forwarded_beside_it(
    tmp_path: Path, jwt_rule: dict[str, Any], token_header: str, sent_in: str, original: str
) -> None:
    auth = authorizer(
        tmp_path,
        request_authentication(**jwt_rule),
        policy(minting({"header": token_header})),
        minter=TokenMinter(KEY),
    )
    token = IDP.token("alice")
    value = f"Bearer {token}" if sent_in == "authorization" else token
    decision = auth.check(request(headers={sent_in: value}))
    assert decision.allowed, decision
    written, removed = upstream(decision)
    assert decode(bearer(decision, token_header))["sub"] == "alice"
    assert token_header not in removed  # Envoy removes after it sets: it would be lost
    fate = {
        (True, False): "replaced",  # overwritten by the minted token
        (False, True): "removed",
        (False, False): "forwarded",  # untouched
    }[(sent_in in written, sent_in in removed)]
    assert fate == original


def test_a_caller_cannot_supply_the_minted_header(tmp_path: Path) -> None:
    doc = policy(
        minting({"header": "x-upstream-token"}, path="/minted/*"),
        {"to": [{"operation": {"paths": ["/plain/*"]}}], "headers": {"x-upstream-token": "s"}},
    )
    auth = authorizer(tmp_path, doc, minter=TokenMinter(KEY))
    forged = {"x-upstream-token": "eyJforged"}
    # A rule that mints: the caller's value is overwritten by the one minted token.
    minted = auth.check(request(path="/minted/1", headers=forged))
    response = to_check_response(minted).ok_response
    values = [h.header.value for h in response.headers if h.header.key == "x-upstream-token"]
    assert len(values) == 1
    assert decode(values[0])["sub"] == CALLER
    # A rule that does not mint: the header is stripped, and no static value stands in.
    written, removed = upstream(auth.check(request(path="/plain/1", headers=forged)))
    assert "x-upstream-token" in removed
    assert "x-upstream-token" not in written


# --- the cache ----------------------------------------------------------------------------


def test_a_minted_token_is_reused_until_half_its_lifetime_is_gone(tmp_path: Path) -> None:
    clock = Clock()
    minter = TokenMinter(KEY, clock=clock)
    auth = authorizer(tmp_path, policy(minting({"ttl": "60s"})), minter=minter)
    first = bearer(auth.check(request()))
    clock.now += 29
    assert bearer(auth.check(request())) == first
    assert (minter.cache.hits, minter.cache.misses) == (1, 1)
    clock.now += 1  # 30 s of 60 left: the upstream would get less than half: mint anew
    second = bearer(auth.check(request()))
    assert second != first
    assert decode(second, leeway=60)["iat"] == int(clock.now)  # the injected clock's time
    assert len(minter.cache) == 1


@pytest.mark.parametrize(
    "other",
    [
        request(principal="spiffe://demo.local/ns/shop/sa/checkout"),  # another caller
        request(host="payments.shop"),  # another audience
        request(path="/other"),  # another rule
    ],
)
def test_the_cache_never_hands_a_token_to_another_caller_audience_or_rule(
    tmp_path: Path, other: CheckInput
) -> None:
    minter = TokenMinter(KEY)
    doc = policy(minting({}, path="/orders/*"), minting({"ttl": "30s"}, path="/other"))
    auth = authorizer(tmp_path, doc, minter=minter)
    assert bearer(auth.check(request())) != bearer(auth.check(other))
    assert minter.cache.hits == 0


def test_one_user_token_through_two_callers_gets_two_actors(tmp_path: Path) -> None:
    minter = TokenMinter(KEY)
    auth = authorizer(tmp_path, request_authentication(), policy(minting({})), minter=minter)
    original = IDP.token("alice")
    other = "spiffe://demo.local/ns/shop/sa/checkout"
    a = decode(bearer(auth.check(request(original))))
    b = decode(bearer(auth.check(request(original, principal=other))))
    assert (a["sub"], b["sub"]) == ("alice", "alice")
    assert (a["azp"], b["azp"]) == (CALLER, other)


def test_a_capped_token_is_reused_for_half_of_its_shorter_life(tmp_path: Path) -> None:
    clock = Clock()
    minter = TokenMinter(KEY, clock=clock)
    auth = authorizer(tmp_path, request_authentication(), policy(minting({})), minter=minter)
    original = IDP.token("alice", ttl=20, issued=clock.now)
    first = bearer(auth.check(request(original)))
    lifetime = decode(first)["exp"] - decode(first)["iat"]
    assert lifetime <= 20
    clock.now += lifetime // 2 - 1
    assert bearer(auth.check(request(original))) == first
    clock.now += 2
    assert bearer(auth.check(request(original))) != first


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = MintedTokenCache(max_entries=2)
    spec = TokenSpec()
    keys = [(b"", f"spiffe://td/{i}", spec, "aud") for i in range(3)]
    cache.put(keys[0], "t0", 100, 160)
    cache.put(keys[1], "t1", 100, 160)
    assert cache.get(keys[0], 101) == "t0"  # now the most recent
    cache.put(keys[2], "t2", 100, 160)
    assert len(cache) == 2
    assert cache.get(keys[1], 102) is None
    assert cache.get(keys[0], 102) == "t0"
    assert cache.get(keys[0], 99) is None  # a clock stepped back: no token from the future


def test_explanations_never_fill_the_cache(tmp_path: Path) -> None:
    minter = TokenMinter(KEY)
    auth = authorizer(tmp_path, request_authentication(), policy(minting({})), minter=minter)
    explanation = auth.explain(request(), claims={"iss": ISS, "sub": "alice"})
    assert explanation.decision.allowed
    assert decode(bearer(explanation.decision))["sub"] == "alice"
    assert len(minter.cache) == 0


# --- failing closed ---------------------------------------------------------------------------


def test_without_a_signing_key_the_set_loads_and_the_rule_fails_closed(tmp_path: Path) -> None:
    auth = authorizer(tmp_path, policy(minting({})))  # what `policy lint` compiles, too
    decision = auth.check(request())
    assert decision.outcome is Outcome.ERROR
    assert decision.reason == "token_signing_unconfigured"
    assert (decision.policy, decision.rule) == ("ns1/mint", "rules[0]")
    resp = to_check_response(decision)
    assert resp.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert resp.denied_response.status.code == 503
    assert json.loads(resp.denied_response.body)["reason"] == "token_signing_unconfigured"


def test_a_caller_with_no_identity_at_all_gets_no_token_and_no_access(tmp_path: Path) -> None:
    auth = authorizer(tmp_path, policy(minting({})), minter=TokenMinter(KEY))
    decision = auth.check(request(principal=""))
    assert decision.outcome is Outcome.PERMISSION_DENIED
    assert decision.reason == "token_mint_refused"
    assert auth.check(request(principal="", host="")).reason == "token_mint_refused"


def test_policy_test_mints_with_a_throwaway_key(tmp_path: Path) -> None:
    load(tmp_path, policy(minting({}, path="/orders/*")))
    (tmp_path / "p.test.yaml").write_text(
        yaml.safe_dump(
            {
                "tests": [
                    {
                        "name": "minted",
                        "request": {
                            "namespace": "ns1",
                            "host": "orders.shop",
                            "path": "/orders/1",
                            "principal": CALLER,
                        },
                        "expect": {
                            "decision": "allow",
                            "headers": {"x-extauthz-spiffe-id": CALLER},
                        },
                    }
                ]
            }
        )
    )
    report = policytest.run(tmp_path)
    assert report.passed, report


# --- keys ---------------------------------------------------------------------------------


def _pem(key: Any, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return pem


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048", "ed25519"],
)
def test_each_key_type_signs_with_its_algorithm(tmp_path: Path, key: Any, algorithm: str) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_pem(key))
    signing = load_signing_key(path)
    assert signing.algorithm == algorithm
    jwk = signing.public_jwk
    assert (jwk["kid"], jwk["alg"], jwk["use"]) == (jwk_thumbprint(jwk), algorithm, "sig")
    assert "d" not in jwk  # never a private member
    (tmp_path / "policies").mkdir()
    auth = authorizer(tmp_path / "policies", policy(minting({})), minter=TokenMinter(signing))
    minted = bearer(auth.check(request()))
    assert jwt.get_unverified_header(minted)["alg"] == algorithm
    assert decode(minted, signing)["sub"] == CALLER


def test_the_kid_is_the_rfc_7638_thumbprint() -> None:
    # RFC 7638 section 3.1's example key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
        "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
        "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    assert jwk_thumbprint({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "x"}) == (
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # weak on purpose: it must be refused
        (_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "1024 bits"),  # noqa: S505
        (_pem(ec.generate_private_key(ec.SECP521R1())), "secp521r1 is not supported"),
        (_pem(ed448.Ed448PrivateKey.generate()), "Ed448PrivateKey is not supported"),
        (_pem(ec.generate_private_key(ec.SECP256R1()), b"pw"), "the key is encrypted"),
        (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "not a PEM private key (it holds a public key)",
        ),
        (b"hello", "not a PEM private key"),
        (None, "cannot read"),
    ],
)
def test_unusable_signing_keys_are_refused_naming_the_flag(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SigningKeyError) as err:
        load_signing_key(path)
    assert message in err.value.message
    assert err.value.message.startswith(f"--signing-key {path}: ")
    assert err.value.reason == "signing_key_invalid"


# --- the JWKS listener and the CLI -------------------------------------------------------------


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)  # noqa: S310 (a local http:// URL)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_jwks_listener_serves_the_key_and_discovery(jwks_server: JwksServer) -> None:
    base = f"http://127.0.0.1:{jwks_server.port}"
    status, headers, body = _get(f"{base}/.well-known/jwks.json")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "public, max-age=300"
    assert headers["Server"] == "extauthz"
    assert json.loads(body) == {"keys": [dict(KEY.public_jwk)]}
    status, _, body = _get(f"{base}/.well-known/openid-configuration")
    assert json.loads(body) == {"issuer": "extauthz", "jwks_uri": f"{base}/.well-known/jwks.json"}
    status, headers, body = _get(f"{base}/.well-known/jwks.json", method="HEAD")
    assert (status, body) == (200, b"")
    for path in ("/", "/jwks.json", "/.well-known/jwks.json/x"):
        assert _get(f"{base}{path}")[0] == 404


def test_a_url_issuer_puts_the_jwks_under_itself() -> None:
    server = JwksServer("127.0.0.1:0", KEY, "https://extauthz.shop.svc:9193")
    server.start()
    try:
        _, _, body = _get(f"http://127.0.0.1:{server.port}/.well-known/openid-configuration")
    finally:
        server.stop()
    assert json.loads(body)["jwks_uri"] == "https://extauthz.shop.svc:9193/.well-known/jwks.json"
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{server.port}/.well-known/jwks.json")  # stopped: port closed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jwks-listen", "127.0.0.1:0"], "--jwks-listen needs --signing-key"),
        (["--signing-key", "/nonexistent/key.pem"], "--signing-key /nonexistent/key.pem: cannot"),
        (["--signing-key", "KEY", "--jwks-listen", "unix:/x"], "expected HOST:PORT"),
        (["--signing-key", "KEY", "--token-issuer", ""], "--token-issuer must not be empty"),
    ],
)
def test_serve_refuses_bad_token_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    args = [str(key) if a == "KEY" else a for a in argv]
    assert cli.main(["serve", "--listen", "127.0.0.1:0", *args]) == 1
    assert message in capsys.readouterr().err


# --- through the real gRPC server ----------------------------------------------------------


async def test_the_check_response_carries_the_minted_header(tmp_path: Path) -> None:
    auth = authorizer(
        tmp_path,
        policy(minting({"audience": "orders", "header": "x-upstream-token"})),
        minter=TokenMinter(KEY),
    )
    jwks = JwksServer("127.0.0.1:0", KEY, "extauthz")
    server = Server(auth, Telemetry(None), listen="127.0.0.1:0", grace=1.0, jwks=jwks)
    await server.start()
    try:
        req = external_auth_pb2.CheckRequest()
        req.attributes.source.principal = CALLER
        http = req.attributes.request.http
        http.method, http.host, http.path = "GET", "orders.shop", "/orders/1"
        http.headers["x-upstream-token"] = "forged"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            resp = await stub.Check(req, timeout=5)
        headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
        client = jwt.PyJWKClient(f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json")
        minted = headers["x-upstream-token"]
        claims = jwt.decode(
            minted,
            client.get_signing_key_from_jwt(minted).key,
            algorithms=[KEY.algorithm],
            audience="orders",
            issuer="extauthz",
        )
        assert claims["sub"] == CALLER
    finally:
        await server.stop()
    assert resp.status.code == 0
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json")  # stopped with the server
