"""What token exchange costs: signing a minted token versus reusing a cached one.

Three levels, each timed with :mod:`timeit` (best round, µs per call):

- ``sign``: ``jwt.encode`` of a typical minted payload with each supported key type (the
  private-key operation plus PyJWT's JSON/base64 work);
- ``mint``: :meth:`TokenMinter.mint` for one rule and caller, cache off (a new token every
  call) and cache hit (a dict lookup);
- ``check``: ``Authorizer.check`` of a request with an ES256 user token that an ALLOW rule
  with ``token:`` allows, minting on a miss or reusing on a hit, next to the same rule
  without ``token:``. The user token itself is a verified-token cache hit in every case.

    python -m loadtest.mint_measure [--rounds 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.devtools.idp import DevIdP
from extauthz.identity.mint import MintedTokenCache, SigningKey, TokenMinter, TokenSpec
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from loadtest.micro import browser_headers

ISSUER = "https://idp.bench"
CALLER = "spiffe://demo.local/ns/shop/sa/frontend"
PAYLOAD = {
    "iss": "extauthz",
    "sub": "alice",
    "aud": "orders.shop",
    "iat": 1_800_000_000,
    "exp": 1_800_000_060,
    "jti": "5f0c3a9e2b7d4c1e8f6a0b3c2d1e4f5a",
    "azp": CALLER,
    "act": {"sub": CALLER},
    "email": "alice@example.com",
    "groups": ["dev", "admin"],
}


def best_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=rounds)) / n * 1e6


def _policies(directory: Path, idp: DevIdP, token: bool) -> PolicySet:
    rule: dict[str, Any] = {"to": [{"operation": {"paths": ["/orders/*"]}}]}
    if token:
        rule["token"] = {"claims": ["email", "groups"]}
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "idp", "namespace": "shop"},
            "spec": {"jwtRules": [{"issuer": ISSUER, "jwks": idp.jwks()}]},
        },
        {
            "apiVersion": "extauthz.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"rules": [rule]},
        },
    ]
    directory.mkdir()
    (directory / "p.yaml").write_text(yaml.safe_dump_all(docs))
    return PolicySet.load(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    n, rounds = args.n, args.rounds
    results: dict[str, float] = {}

    def report(name: str, us: float) -> None:
        results[name] = us
        print(f"{name:<58} {us:>9.1f}")

    print(f"{'case':<58} {'best µs':>9}")
    keys = {
        "ES256 (EC P-256)": SigningKey.of(ec.generate_private_key(ec.SECP256R1())),
        "ES384 (EC P-384)": SigningKey.of(ec.generate_private_key(ec.SECP384R1())),
        "RS256 (RSA 2048)": SigningKey.of(rsa.generate_private_key(65537, 2048)),
        "EdDSA (Ed25519)": SigningKey.of(ed25519.Ed25519PrivateKey.generate()),
    }
    for name, key in keys.items():
        headers = {"kid": key.kid, "typ": "JWT"}
        report(
            f"sign: jwt.encode, {name}",
            best_us(
                lambda k=key, h=headers: jwt.encode(PAYLOAD, k.private_key, k.algorithm, h),
                n // 4 if "RSA" in name else n,
                rounds,
            ),
        )
    es256 = keys["ES256 (EC P-256)"]
    spec = TokenSpec(("email", "groups"))
    cold = TokenMinter(es256, cache=MintedTokenCache(max_entries=0))
    hot = TokenMinter(es256)

    def mint(minter: TokenMinter) -> str:
        return minter.mint(
            spec, audience="orders.shop", subject=CALLER, actor=CALLER, original=None
        )

    mint(hot)
    report(
        "mint: TokenMinter.mint ES256, cache off (signs)", best_us(lambda: mint(cold), n, rounds)
    )
    report("mint: TokenMinter.mint ES256, cache hit", best_us(lambda: mint(hot), n, rounds))
    if hot.cache.misses != 1:
        raise SystemExit(f"expected one miss, then hits; got {hot.cache.misses} misses")

    idp = DevIdP.create(ISSUER)
    user = idp.token("alice", ttl=3600, email="alice@example.com", groups=["dev"])
    headers = {
        **browser_headers("orders.shop", "GET", "/orders/42"),
        "authorization": f"Bearer {user}",
    }
    inp = CheckInput(
        method="GET",
        host="orders.shop",
        path="/orders/42",
        headers=headers,
        source_principal=CALLER,
    )
    settings = Settings(workload_namespace="shop")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Authorizer(_policies(Path(tmp) / "plain", idp, False), settings)
        minting = _policies(Path(tmp) / "mint", idp, True)
    cases = {
        "check: allow, no token: rule": plain,
        "check: allow + mint ES256, minted-token cache hit": Authorizer(
            minting, settings, minter=TokenMinter(es256)
        ),
        "check: allow + mint ES256, cache off (signs)": Authorizer(
            minting, settings, minter=TokenMinter(es256, cache=MintedTokenCache(max_entries=0))
        ),
    }
    for name, authorizer in cases.items():
        decision = authorizer.check(inp)
        if not decision.allowed:
            raise SystemExit(f"{name}: expected allow, got {decision.reason}")
        report(name, best_us(lambda a=authorizer: a.check(inp), n, rounds))
    machine = (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}"
    )
    print(f"(best of {rounds} rounds x {n} calls, RSA signing {n // 4}; {machine})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results_us": results}, indent=2))


if __name__ == "__main__":
    main()
