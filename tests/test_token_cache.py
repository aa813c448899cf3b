"""The verified-token cache: a token seen again costs a lookup, never outlives its validity,
and never turns a refused token into an accepted one."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz.errors import TokenExpiredError, TokenSignatureError
from extauthz.identity.jwt import (
    CLOCK_SKEW_SECONDS,
    DEFAULT_LOCATIONS,
    JwtProvider,
    TokenCache,
    TokenLocation,
    TokenVerifier,
    VerifiedToken,
    compile_jwks,
)
from extauthz.request import CheckInput

ISS = "https://idp.test"
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
JWK = json.loads(ECAlgorithm.to_jwk(KEY.public_key())) | {"kid": "k"}
PROVIDER = JwtProvider(
    issuer=ISS,
    audiences=frozenset(),
    keys=compile_jwks(json.dumps({"keys": [JWK]}), source="test"),
    locations=(*DEFAULT_LOCATIONS, TokenLocation("header", "x-jwt")),
)
HEADER = DEFAULT_LOCATIONS[0]


def sign(key: Any = KEY, **claims: Any) -> str:
    body = {"iss": ISS, "sub": "alice", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": "k"})


def bearer(token: str) -> CheckInput:
    return CheckInput(headers={"authorization": f"Bearer {token}"})


def test_a_token_seen_again_is_a_hit_with_the_same_claims() -> None:
    verifier = TokenVerifier([PROVIDER])
    token = sign(groups=["a"])
    first = verifier.verify(bearer(token))
    again = verifier.verify(bearer(token))
    assert first is not None
    assert again is first
    assert (verifier.cache.hits, verifier.cache.misses) == (1, 1)


def test_refused_tokens_are_never_cached() -> None:
    verifier = TokenVerifier([PROVIDER])
    forged = sign(OTHER_KEY)
    for _ in range(3):
        with pytest.raises(TokenSignatureError):
            verifier.verify(bearer(forged))
    assert len(verifier.cache) == 0
    assert verifier.cache.hits == 0
    with pytest.raises(TokenExpiredError):
        verifier.verify(bearer(sign(exp=int(time.time()) - 3600)))
    assert len(verifier.cache) == 0


def test_the_same_token_in_another_location_is_verified_again() -> None:
    verifier = TokenVerifier([PROVIDER])
    token = sign()
    verifier.verify(bearer(token))
    got = verifier.verify(CheckInput(headers={"x-jwt": token}))
    assert got is not None
    assert got.location == TokenLocation("header", "x-jwt")
    assert verifier.cache.hits == 0


def _verified(**claims: Any) -> VerifiedToken:
    return VerifiedToken(ISS, "alice", (), "", claims, PROVIDER, HEADER, "")


@pytest.mark.parametrize(
    ("claims", "put_at", "at", "hit"),
    [
        ({"exp": 1000}, 900, 999, True),
        ({"exp": 1000}, 900, 1000 + CLOCK_SKEW_SECONDS - 1, True),  # as a fresh check would
        ({"exp": 1000}, 900, 1000 + CLOCK_SKEW_SECONDS, False),
        ({"nbf": 500, "exp": 900}, 400, 500 - CLOCK_SKEW_SECONDS - 1, False),
        ({"nbf": 500, "exp": 900}, 400, 500 - CLOCK_SKEW_SECONDS, True),
        ({}, 100, 100 + 299, True),  # no exp: at most max_ttl
        ({}, 100, 100 + 300, False),
        ({"exp": 100_000}, 100, 100 + 300, False),  # max_ttl bounds a long-lived token too
        ({"exp": True}, 100, 150, True),  # a bool is not a time: max_ttl applies
    ],
)
def test_an_entry_lives_only_while_the_token_would_verify(
    claims: dict[str, Any], put_at: float, at: float, hit: bool
) -> None:
    cache = TokenCache(max_ttl=300)
    cache.put("t", HEADER, _verified(**claims), now=put_at)
    assert (cache.get("t", HEADER, now=at) is not None) is hit
    if not hit and at >= put_at + 300 - 1:
        assert len(cache) == 0  # an expired entry is dropped at once


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = TokenCache(max_entries=2)
    for t in ("a", "b"):
        cache.put(t, HEADER, _verified(exp=10_000), now=0)
    assert cache.get("a", HEADER, now=1) is not None  # a is now the most recent
    cache.put("c", HEADER, _verified(exp=10_000), now=2)
    assert len(cache) == 2
    assert cache.get("b", HEADER, now=3) is None
    assert cache.get("a", HEADER, now=3) is not None
    assert cache.get("c", HEADER, now=3) is not None


def test_a_zero_sized_cache_caches_nothing() -> None:
    verifier = TokenVerifier([PROVIDER], cache=TokenCache(max_entries=0))
    token = sign()
    verifier.verify(bearer(token))
    verifier.verify(bearer(token))
    assert len(verifier.cache) == 0
    assert verifier.cache.hits == 0


def test_clear_forgets_every_token() -> None:
    verifier = TokenVerifier([PROVIDER])
    token = sign()
    verifier.verify(bearer(token))
    verifier.cache.clear()
    verifier.verify(bearer(token))
    assert (verifier.cache.hits, verifier.cache.misses) == (0, 2)


def _policy_dir(tmp_path: Any, *, audiences_for_ns2: bool) -> Any:
    """One issuer: mesh-wide without an audience check, or (``audiences_for_ns2``) in ns1
    without and in ns2 with one."""
    jwk = json.loads(ECAlgorithm.to_jwk(KEY.public_key()))
    jwk.update(kid="k", alg="ES256")
    jwks = json.dumps({"keys": [jwk]}).replace("'", "''")
    root = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: {"ns1" if audiences_for_ns2 else "istio-system"}}}
spec:
  jwtRules: [{{issuer: "{ISS}", jwks: '{jwks}'}}]
"""
    ns2 = f"""
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: strict, namespace: ns2}}
spec:
  jwtRules: [{{issuer: "{ISS}", jwks: '{jwks}', audiences: [only-ns2]}}]
"""
    (tmp_path / "p.yaml").write_text(root + (ns2 if audiences_for_ns2 else ""))
    return tmp_path


def test_one_cache_bounds_every_workload_of_a_policy_set(tmp_path: Any) -> None:
    """Found by the soak: a cache per workload grew without a bound in practice (4,096
    workloads x 10,000 tokens). Workloads now share the set's cache; the same token for
    many workloads of one provider set is one entry."""
    from extauthz.policy.engine import PolicySet

    policies = PolicySet.load(_policy_dir(tmp_path, audiences_for_ns2=False))
    tokens = [sign(sub=f"user-{i}") for i in range(20)]
    for n in range(50):
        verifier = policies.for_workload(f"ns-{n}", None).verifier
        for t in tokens:
            assert verifier.verify(bearer(t)) is not None
    assert len(policies.token_cache) == 20
    assert policies.token_cache.hits == 49 * 20


def test_a_shared_cache_never_lends_a_verification_to_other_providers(tmp_path: Any) -> None:
    from extauthz.errors import TokenAudienceError
    from extauthz.policy.engine import PolicySet

    policies = PolicySet.load(_policy_dir(tmp_path, audiences_for_ns2=True))
    token = sign(sub="alice", aud="web")  # fine for ns1, refused where audiences differ
    assert policies.for_workload("ns1", None).verifier.verify(bearer(token)) is not None
    with pytest.raises(TokenAudienceError):
        policies.for_workload("ns2", None).verifier.verify(bearer(token))
