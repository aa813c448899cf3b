"""JWT verification: JWKS compilation, token location, and every refusal with its reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from extauthz.errors import (
    JwksError,
    TokenAlgorithmError,
    TokenAudienceError,
    TokenClaimsError,
    TokenError,
    TokenExpiredError,
    TokenIssuerUnknownError,
    TokenKeyUnknownError,
    TokenMalformedError,
    TokenMultipleError,
    TokenNotYetValidError,
    TokenSignatureError,
)
from extauthz.identity.jwt import (
    DEFAULT_LOCATIONS,
    MAX_TOKEN_BYTES,
    JwtProvider,
    TokenLocation,
    TokenVerifier,
    VerifiedToken,
    compile_jwks,
)
from extauthz.request import CheckInput

ISS = "https://idp.test"
OTHER_ISS = "https://other.test"


# --- keys and tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """A private key, its public JWK (with ``kid``) and the algorithm it signs with."""

    key: Any
    jwk: dict[str, Any]
    alg: str

    def sign(self, claims: Mapping[str, Any], *, kid: str | None = None, **header: Any) -> str:
        headers = {"kid": self.jwk["kid"] if kid is None else kid, **header}
        return jwt.encode(dict(claims), self.key, algorithm=self.alg, headers=headers)

    def sign_raw(self, payload: bytes) -> str:
        """Sign arbitrary payload bytes (PyJWT's encode refuses some malformed claims)."""
        return jwt.api_jws.PyJWS().encode(
            payload, self.key, algorithm=self.alg, headers={"kid": self.jwk["kid"]}
        )


def _jwk(public_json: str, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(public_json)
    jwk["kid"] = kid
    jwk.update(extra)
    return jwk


@dataclass(frozen=True)
class Keys:
    rsa: Signer  # RS256, kid "rsa"
    rsa_other: Signer  # a different RSA key that claims the same kid "rsa"
    ps: Signer  # PS256 with the same RSA key as ``rsa``
    es256: Signer
    es384: Signer
    ed: Signer  # EdDSA; JWK carries alg "EdDSA"
    ed_no_alg: Signer  # EdDSA; JWK without alg (as to_jwk produces it)
    hs: Signer  # HS256 with an oct JWK
    rsa_public_pem: bytes


@pytest.fixture(scope="module")
def keys() -> Keys:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    secret = b"0123456789abcdef0123456789abcdef"
    rsa_jwk = _jwk(RSAAlgorithm.to_jwk(rsa_key.public_key()), "rsa")
    return Keys(
        rsa=Signer(rsa_key, rsa_jwk, "RS256"),
        rsa_other=Signer(
            rsa_other, _jwk(RSAAlgorithm.to_jwk(rsa_other.public_key()), "rsa"), "RS256"
        ),
        ps=Signer(rsa_key, rsa_jwk, "PS256"),
        es256=Signer(p256, _jwk(ECAlgorithm.to_jwk(p256.public_key()), "p256"), "ES256"),
        es384=Signer(p384, _jwk(ECAlgorithm.to_jwk(p384.public_key()), "p384"), "ES384"),
        ed=Signer(ed, _jwk(OKPAlgorithm.to_jwk(ed.public_key()), "ed", alg="EdDSA"), "EdDSA"),
        ed_no_alg=Signer(ed, _jwk(OKPAlgorithm.to_jwk(ed.public_key()), "ed-plain"), "EdDSA"),
        hs=Signer(secret, _jwk(HMACAlgorithm.to_jwk(secret), "hs"), "HS256"),
        rsa_public_pem=rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def jwks(*jwk: Mapping[str, Any]) -> str:
    return json.dumps({"keys": list(jwk)})


def provider(
    *jwk: Mapping[str, Any],
    issuer: str = ISS,
    audiences: tuple[str, ...] = (),
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS,
    algorithms: frozenset[str] | None = None,
) -> JwtProvider:
    extra: dict[str, Any] = {} if algorithms is None else {"algorithms": algorithms}
    return JwtProvider(
        issuer=issuer,
        audiences=frozenset(audiences),
        keys=compile_jwks(jwks(*jwk), source="test"),
        locations=locations,
        **extra,
    )


def bearer(token: str) -> CheckInput:
    return CheckInput(headers={"authorization": f"Bearer {token}"})


def verify(providers: list[JwtProvider], inp: CheckInput) -> VerifiedToken | None:
    return TokenVerifier(providers).verify(inp)


def now() -> int:
    return int(time.time())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


def claims(**extra: Any) -> dict[str, Any]:
    return {"iss": ISS, "sub": "alice", **extra}


# --- successes ----------------------------------------------------------------------------


SUCCESS: list[tuple[str, Callable[[Keys], Signer]]] = [
    ("RS256", lambda k: k.rsa),
    ("PS256", lambda k: k.ps),
    ("ES256", lambda k: k.es256),
    ("ES384", lambda k: k.es384),
    ("EdDSA", lambda k: k.ed),
    ("HS256-oct-jwk", lambda k: k.hs),
]


@pytest.mark.parametrize(("name", "pick"), SUCCESS, ids=[n for n, _ in SUCCESS])
def test_algorithms_verify(keys: Keys, name: str, pick: Callable[[Keys], Signer]) -> None:
    signer = pick(keys)
    # Every key in one JWKS: selection must be by kid + alg, not by position.
    p = provider(keys.rsa.jwk, keys.es256.jwk, keys.es384.jwk, keys.ed.jwk, keys.hs.jwk)
    token = signer.sign(claims(exp=now() + 600))
    got = verify([p], bearer(token))
    assert got is not None
    assert got.issuer == ISS
    assert got.subject == "alice"
    assert got.principal == f"{ISS}/alice"
    assert got.provider is p


def test_eddsa_jwk_without_alg_verifies(keys: Keys) -> None:
    p = provider(keys.ed_no_alg.jwk)
    got = verify([p], bearer(keys.ed_no_alg.sign(claims())))
    assert got is not None
    assert got.subject == "alice"


def test_token_without_kid_tries_every_key(keys: Keys) -> None:
    p = provider(keys.rsa_other.jwk | {"kid": "first"}, keys.rsa.jwk)
    token = jwt.encode(claims(), keys.rsa.key, algorithm="RS256")  # no kid header
    got = verify([p], bearer(token))
    assert got is not None
    assert got.subject == "alice"


def test_two_keys_same_kid_second_verifies(keys: Keys) -> None:
    p = provider(keys.rsa_other.jwk, keys.rsa.jwk)  # both kid "rsa"
    got = verify([p], bearer(keys.rsa.sign(claims())))
    assert got is not None


@pytest.mark.parametrize(
    ("offset", "claim"),
    [(-30, "exp"), (30, "nbf"), (30, "iat")],
    ids=["exp-within-leeway", "nbf-within-leeway", "iat-within-leeway"],
)
def test_clock_skew_leeway_accepts(keys: Keys, offset: int, claim: str) -> None:
    p = provider(keys.rsa.jwk)
    got = verify([p], bearer(keys.rsa.sign(claims(**{claim: now() + offset}))))
    assert got is not None


def test_deeply_nested_header_is_malformed_not_a_crash(keys: Keys) -> None:
    """'[[[[...' past the JSON decoder's depth limit must be a 401, not a 503 (review)."""
    nested = base64.urlsafe_b64encode(b"[" * 30_000).rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b'{"iss":"x"}').rstrip(b"=").decode()
    with pytest.raises(TokenMalformedError) as info:
        verify([provider(keys.rsa.jwk)], bearer(f"{nested}.{payload}.sig"))
    assert info.value.reason == "jwt_malformed"


def test_iat_in_future_is_accepted(keys: Keys) -> None:
    """iat is informational; Envoy's jwt_authn does not reject a future iat either."""
    got = verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(claims(iat=now() + 3600))))
    assert got is not None


def test_no_exp_is_accepted(keys: Keys) -> None:
    # Envoy's require_expiration defaults to false and Istio does not set it.
    got = verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(claims())))
    assert got is not None
    assert "exp" not in got.claims


def test_no_audience_check_when_audiences_empty(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    for aud in ("anything", ["x", "y"]):
        got = verify([p], bearer(keys.rsa.sign(claims(aud=aud))))
        assert got is not None
    assert verify([p], bearer(keys.rsa.sign(claims()))) is not None


@pytest.mark.parametrize(
    "aud",
    ["api", ["other", "api"]],
    ids=["string", "list-any-element"],
)
def test_audience_accepted(keys: Keys, aud: str | list[str]) -> None:
    p = provider(keys.rsa.jwk, audiences=("api", "api2"))
    got = verify([p], bearer(keys.rsa.sign(claims(aud=aud))))
    assert got is not None


# --- VerifiedToken fields -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("aud", "expected"),
    [
        ("api", ("api",)),
        (["api", "web"], ("api", "web")),
        (["api", 7, None], ("api",)),
        (None, ()),
    ],
    ids=["aud-string", "aud-list", "aud-list-non-strings-dropped", "aud-absent"],
)
def test_verified_token_audiences(keys: Keys, aud: Any, expected: tuple[str, ...]) -> None:
    body = claims() if aud is None else claims(aud=aud)
    got = verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(body)))
    assert got is not None
    assert got.audiences == expected


def test_verified_token_fields(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    body = claims(azp="web-client", aud="api", groups=["a", "b"])
    token = keys.rsa.sign(body)
    got = verify([p], bearer(token))
    assert got is not None
    assert got.issuer == ISS
    assert got.subject == "alice"
    assert got.principal == "https://idp.test/alice"
    assert got.presenter == "web-client"
    assert got.audiences == ("api",)
    assert dict(got.claims) == body
    assert got.payload_segment == token.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(got.payload_segment + "==")) == body
    assert got.location == TokenLocation("header", "authorization", "Bearer ")
    assert got.provider is p


def test_verified_token_defaults_without_sub_and_azp(keys: Keys) -> None:
    got = verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign({"iss": ISS})))
    assert got is not None
    assert got.subject == ""
    assert got.presenter == ""
    assert got.principal == "https://idp.test/"


def test_issuer_selects_provider(keys: Keys) -> None:
    a = provider(keys.rsa.jwk, issuer=ISS)
    b = provider(keys.es256.jwk, issuer=OTHER_ISS)
    got = verify([a, b], bearer(keys.es256.sign({"iss": OTHER_ISS, "sub": "bob"})))
    assert got is not None
    assert got.provider is b
    assert got.principal == "https://other.test/bob"


def test_no_token_is_none(keys: Keys) -> None:
    assert verify([provider(keys.rsa.jwk)], CheckInput()) is None


def test_no_providers_ignores_tokens(keys: Keys) -> None:
    assert verify([], bearer(keys.rsa.sign(claims()))) is None


# --- failures -----------------------------------------------------------------------------


def _none_token(k: Keys) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims())}."


def _hs256_with_rsa_pem(k: Keys) -> str:
    head = b64json({"alg": "HS256", "typ": "JWT", "kid": "rsa"})
    body = b64json(claims())
    signing_input = f"{head}.{body}".encode()
    mac = hmac.new(k.rsa_public_pem, signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def _hs256_with_rsa_pem_no_kid(k: Keys) -> str:
    head = b64json({"alg": "HS256", "typ": "JWT"})
    body = b64json(claims())
    mac = hmac.new(k.rsa_public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def _tampered(k: Keys) -> str:
    head, _, sig = k.rsa.sign(claims()).split(".")
    return f"{head}.{b64json(claims(sub='mallory'))}.{sig}"


def _rs_sig(k: Keys) -> str:
    return k.rsa.sign(claims()).split(".")[2]


# (id, token factory, exception class, reason)
FAILURES: list[tuple[str, Callable[[Keys], str], type[TokenError], str]] = [
    (
        "expired",
        lambda k: k.rsa.sign(claims(exp=now() - 3600)),
        TokenExpiredError,
        "jwt_expired",
    ),
    (
        "expired-just-beyond-leeway",
        lambda k: k.rsa.sign(claims(exp=now() - 120)),
        TokenExpiredError,
        "jwt_expired",
    ),
    (
        "nbf-in-future",
        lambda k: k.rsa.sign(claims(nbf=now() + 3600)),
        TokenNotYetValidError,
        "jwt_not_yet_valid",
    ),
    (
        "wrong-issuer",
        lambda k: k.rsa.sign(claims(iss="https://evil.test")),
        TokenIssuerUnknownError,
        "jwt_issuer_unknown",
    ),
    (
        "issuer-trailing-slash",
        lambda k: k.rsa.sign(claims(iss=ISS + "/")),
        TokenIssuerUnknownError,
        "jwt_issuer_unknown",
    ),
    (
        "no-issuer",
        lambda k: k.rsa.sign({"sub": "alice"}),
        TokenIssuerUnknownError,
        "jwt_issuer_unknown",
    ),
    (
        "issuer-not-a-string",
        lambda k: k.rsa.sign_raw(json.dumps({"iss": [ISS], "sub": "alice"}).encode()),
        TokenIssuerUnknownError,
        "jwt_issuer_unknown",
    ),
    (
        "bad-signature-other-key-same-kid",
        lambda k: k.rsa_other.sign(claims()),
        TokenSignatureError,
        "jwt_signature_invalid",
    ),
    ("tampered-payload", _tampered, TokenSignatureError, "jwt_signature_invalid"),
    (
        "signature-stripped",
        lambda k: k.rsa.sign(claims()).rsplit(".", 1)[0] + ".",
        TokenSignatureError,
        "jwt_signature_invalid",
    ),
    ("alg-none", _none_token, TokenAlgorithmError, "jwt_algorithm_not_allowed"),
    (
        "alg-None-capitalised",
        lambda k: f"{b64json({'alg': 'None'})}.{b64json(claims())}.",
        TokenAlgorithmError,
        "jwt_algorithm_not_allowed",
    ),
    (
        "alg-missing",
        lambda k: f"{b64json({'typ': 'JWT', 'kid': 'rsa'})}.{b64json(claims())}.{_rs_sig(k)}",
        TokenAlgorithmError,
        "jwt_algorithm_not_allowed",
    ),
    (
        "alg-unknown",
        lambda k: f"{b64json({'alg': 'XS256', 'kid': 'rsa'})}.{b64json(claims())}.{_rs_sig(k)}",
        TokenAlgorithmError,
        "jwt_algorithm_not_allowed",
    ),
    (
        "hs256-secret-is-rsa-public-pem",
        _hs256_with_rsa_pem,
        TokenKeyUnknownError,
        "jwt_key_unknown",
    ),
    (
        "hs256-secret-is-rsa-public-pem-no-kid",
        _hs256_with_rsa_pem_no_kid,
        TokenKeyUnknownError,
        "jwt_key_unknown",
    ),
    (
        "unknown-kid",
        lambda k: k.rsa.sign(claims(), kid="nope"),
        TokenKeyUnknownError,
        "jwt_key_unknown",
    ),
    (
        "kid-of-a-key-of-another-type",
        lambda k: k.rsa.sign(claims(), kid="p256"),
        TokenKeyUnknownError,
        "jwt_key_unknown",
    ),
    (
        "ps256-on-rs256-only-jwk",
        lambda k: k.ps.sign(claims(), kid="rsa-rs256-only"),
        TokenKeyUnknownError,
        "jwt_key_unknown",
    ),
    (
        "two-segments",
        lambda k: ".".join(k.rsa.sign(claims()).split(".")[:2]),
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "four-segments",
        lambda k: k.rsa.sign(claims()) + ".x",
        TokenMalformedError,
        "jwt_malformed",
    ),
    ("one-segment", lambda k: "abcdef", TokenMalformedError, "jwt_malformed"),
    (
        "header-bad-base64",
        lambda k: "!!!." + ".".join(k.rsa.sign(claims()).split(".")[1:]),
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "payload-bad-base64",
        lambda k: f"{b64json({'alg': 'RS256'})}.%%%%.{_rs_sig(k)}",
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "payload-not-json",
        lambda k: f"{b64json({'alg': 'RS256'})}.{b64(b'not json')}.{_rs_sig(k)}",
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "payload-not-an-object",
        lambda k: f"{b64json({'alg': 'RS256'})}.{b64json(['iss', ISS])}.{_rs_sig(k)}",
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "header-not-an-object",
        lambda k: f"{b64json('RS256')}.{b64json(claims())}.{_rs_sig(k)}",
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "non-ascii-segment",
        lambda k: f"{b64json({'alg': 'RS256'})}.\u00e9\u00e9\u00e9\u00e9.{_rs_sig(k)}",
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "oversize",
        lambda k: k.rsa.sign(claims(pad="x" * MAX_TOKEN_BYTES)),
        TokenMalformedError,
        "jwt_malformed",
    ),
    (
        "azp-not-a-string",
        lambda k: k.rsa.sign(claims(azp=["a", "b"])),
        TokenClaimsError,
        "jwt_claims_invalid",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "reason"),
    [(m, e, r) for _, m, e, r in FAILURES],
    ids=[i for i, *_ in FAILURES],
)
def test_refused(
    keys: Keys, make: Callable[[Keys], str], error: type[TokenError], reason: str
) -> None:
    rs256_only = keys.rsa.jwk | {"kid": "rsa-rs256-only", "alg": "RS256"}
    p = provider(keys.rsa.jwk, keys.es256.jwk, rs256_only)
    with pytest.raises(TokenError) as info:
        verify([p], bearer(make(keys)))
    assert type(info.value) is error
    assert info.value.reason == reason


def test_oversize_boundary(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    token = keys.rsa.sign(claims(pad=""))
    # Grow the padding claim until the token is exactly MAX_TOKEN_BYTES long.
    pad = 0
    while len(token) < MAX_TOKEN_BYTES:
        pad += max(1, (MAX_TOKEN_BYTES - len(token)) * 3 // 4)
        token = keys.rsa.sign(claims(pad="x" * pad))
    while len(token) > MAX_TOKEN_BYTES:
        pad -= 1
        token = keys.rsa.sign(claims(pad="x" * pad))
    assert len(token) <= MAX_TOKEN_BYTES
    assert verify([p], bearer(token)) is not None


def test_wrong_audience(keys: Keys) -> None:
    p = provider(keys.rsa.jwk, audiences=("api",))
    for aud in ("web", ["web", "mobile"]):
        with pytest.raises(TokenAudienceError) as info:
            verify([p], bearer(keys.rsa.sign(claims(aud=aud))))
        assert info.value.reason == "jwt_audience_invalid"


def test_missing_audience_when_required(keys: Keys) -> None:
    # Refused; the reason is PyJWT's MissingRequiredClaimError mapping (claims, not audience).
    p = provider(keys.rsa.jwk, audiences=("api",))
    with pytest.raises(TokenClaimsError) as info:
        verify([p], bearer(keys.rsa.sign(claims())))
    assert info.value.reason == "jwt_claims_invalid"


@pytest.mark.parametrize("sub", [42, None, ["alice"]], ids=["int", "null", "list"])
def test_sub_not_a_string_is_claims_error(keys: Keys, sub: Any) -> None:
    with pytest.raises(TokenClaimsError) as info:
        verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(claims(sub=sub))))
    assert info.value.reason == "jwt_claims_invalid"


def test_exp_not_a_number_is_claims_error(keys: Keys) -> None:
    with pytest.raises(TokenClaimsError) as info:
        verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(claims(exp="soon"))))
    assert info.value.reason == "jwt_claims_invalid"


def test_exp_not_a_number_is_refused(keys: Keys) -> None:
    with pytest.raises(TokenError):
        verify([provider(keys.rsa.jwk)], bearer(keys.rsa.sign(claims(exp="soon"))))


def test_hs256_with_rsa_pem_never_accepted_even_with_hmac_allowed(keys: Keys) -> None:
    # Even with HS256 the only allowed algorithm, an RSA key is never used as an HMAC secret.
    p = provider(keys.rsa.jwk, algorithms=frozenset({"HS256"}))
    for token in (_hs256_with_rsa_pem(keys), _hs256_with_rsa_pem_no_kid(keys)):
        with pytest.raises(TokenKeyUnknownError) as info:
            verify([p], bearer(token))
        assert info.value.reason == "jwt_key_unknown"


def test_provider_algorithm_allow_list(keys: Keys) -> None:
    p = provider(keys.rsa.jwk, keys.es256.jwk, algorithms=frozenset({"ES256"}))
    assert verify([p], bearer(keys.es256.sign(claims()))) is not None
    with pytest.raises(TokenAlgorithmError) as info:
        verify([p], bearer(keys.rsa.sign(claims())))
    assert info.value.reason == "jwt_algorithm_not_allowed"


def test_jwk_alg_pins_algorithm(keys: Keys) -> None:
    p = provider(keys.rsa.jwk | {"alg": "RS256"})
    assert verify([p], bearer(keys.rsa.sign(claims()))) is not None
    with pytest.raises(TokenKeyUnknownError) as info:
        verify([p], bearer(keys.ps.sign(claims())))
    assert info.value.reason == "jwt_key_unknown"


def test_ec_curve_pins_algorithm(keys: Keys) -> None:
    # An ES384 token whose kid names the P-256 key is refused before any signature check.
    p = provider(keys.es256.jwk, keys.es384.jwk)
    with pytest.raises(TokenKeyUnknownError):
        verify([p], bearer(keys.es384.sign(claims(), kid="p256")))


# --- multiple tokens and locations --------------------------------------------------------


def test_two_different_tokens_refused(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    a, b = keys.rsa.sign(claims(sub="a")), keys.rsa.sign(claims(sub="b"))
    inp = CheckInput(headers={"authorization": f"Bearer {a}"}, query=f"access_token={b}")
    with pytest.raises(TokenMultipleError) as info:
        verify([p], inp)
    assert info.value.reason == "jwt_multiple"


def test_two_different_tokens_refused_before_verification(keys: Keys) -> None:
    # Even if one of them is garbage: the request is ambiguous, that is the error.
    p = provider(keys.rsa.jwk)
    a = keys.rsa.sign(claims())
    inp = CheckInput(headers={"authorization": f"Bearer {a}"}, query="access_token=junk")
    with pytest.raises(TokenMultipleError):
        verify([p], inp)


def test_same_token_twice_is_fine(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    token = keys.rsa.sign(claims())
    inp = CheckInput(headers={"authorization": f"Bearer {token}"}, query=f"access_token={token}")
    got = verify([p], inp)
    assert got is not None
    # the first location in order wins
    assert got.location == TokenLocation("header", "authorization", "Bearer ")


def test_repeated_param_with_different_tokens_refused(keys: Keys) -> None:
    p = provider(keys.rsa.jwk)
    a, b = keys.rsa.sign(claims(sub="a")), keys.rsa.sign(claims(sub="b"))
    with pytest.raises(TokenMultipleError):
        verify([p], CheckInput(query=f"access_token={a}&access_token={b}"))


def test_token_in_location_its_issuer_does_not_use(keys: Keys) -> None:
    header_only = provider(keys.rsa.jwk, issuer=ISS, locations=(TokenLocation("header", "x-jwt"),))
    default = provider(keys.es256.jwk, issuer=OTHER_ISS)
    # ISS's token sent in Authorization, which only OTHER_ISS reads.
    with pytest.raises(TokenIssuerUnknownError) as info:
        verify([header_only, default], bearer(keys.rsa.sign(claims())))
    assert info.value.reason == "jwt_issuer_unknown"
    # ... and in its own location it verifies.
    inp = CheckInput(headers={"x-jwt": keys.rsa.sign(claims())})
    got = verify([header_only, default], inp)
    assert got is not None
    assert got.location == TokenLocation("header", "x-jwt")


CUSTOM = (
    TokenLocation("header", "x-token", "Token "),
    TokenLocation("header", "x-raw"),
    TokenLocation("param", "tok"),
    TokenLocation("cookie", "session"),
)

# (id, locations, request builder(token) -> CheckInput, expected location or None)
LOCATIONS: list[
    tuple[str, tuple[TokenLocation, ...], Callable[[str], CheckInput], TokenLocation | None]
] = [
    (
        "bearer",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"Bearer {t}"}),
        DEFAULT_LOCATIONS[0],
    ),
    (
        "bearer-lowercase-scheme",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"bearer {t}"}),
        DEFAULT_LOCATIONS[0],
    ),
    (
        "bearer-uppercase-scheme",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"BEARER {t}"}),
        DEFAULT_LOCATIONS[0],
    ),
    (
        "bearer-extra-spaces",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"Bearer   {t}  "}),
        DEFAULT_LOCATIONS[0],
    ),
    (
        "basic-auth-ignored",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"Basic {t}"}),
        None,
    ),
    (
        "bearer-without-space-ignored",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": f"Bearer{t}"}),
        None,
    ),
    (
        "bearer-empty-ignored",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(headers={"authorization": "Bearer "}),
        None,
    ),
    (
        "access-token-param",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(query=f"a=1&access_token={t}&b=2"),
        DEFAULT_LOCATIONS[1],
    ),
    (
        "other-param-ignored",
        DEFAULT_LOCATIONS,
        lambda t: CheckInput(query=f"token={t}"),
        None,
    ),
    (
        "custom-header-exact-prefix",
        CUSTOM,
        lambda t: CheckInput(headers={"x-token": f"Token {t}"}),
        CUSTOM[0],
    ),
    (
        "custom-header-prefix-is-case-sensitive",
        CUSTOM,
        lambda t: CheckInput(headers={"x-token": f"token {t}"}),
        None,
    ),
    (
        "custom-header-missing-prefix",
        CUSTOM,
        lambda t: CheckInput(headers={"x-token": t}),
        None,
    ),
    (
        "custom-header-no-prefix",
        CUSTOM,
        lambda t: CheckInput(headers={"x-raw": t}),
        CUSTOM[1],
    ),
    (
        "custom-locations-replace-authorization",
        CUSTOM,
        lambda t: CheckInput(headers={"authorization": f"Bearer {t}"}),
        None,
    ),
    (
        "custom-locations-replace-access-token",
        CUSTOM,
        lambda t: CheckInput(query=f"access_token={t}"),
        None,
    ),
    ("from-params", CUSTOM, lambda t: CheckInput(query=f"tok={t}"), CUSTOM[2]),
    (
        "from-cookies",
        CUSTOM,
        lambda t: CheckInput(headers={"cookie": f"theme=dark; session={t}; x=y"}),
        CUSTOM[3],
    ),
    (
        "from-cookies-quoted",
        CUSTOM,
        lambda t: CheckInput(headers={"cookie": f'session="{t}"'}),
        CUSTOM[3],
    ),
    (
        "cookie-name-must-match-exactly",
        CUSTOM,
        lambda t: CheckInput(headers={"cookie": f"session2={t}; xsession={t}"}),
        None,
    ),
]


@pytest.mark.parametrize(
    ("locations", "build", "expected"),
    [(loc, b, e) for _, loc, b, e in LOCATIONS],
    ids=[i for i, *_ in LOCATIONS],
)
def test_token_locations(
    keys: Keys,
    locations: tuple[TokenLocation, ...],
    build: Callable[[str], CheckInput],
    expected: TokenLocation | None,
) -> None:
    p = provider(keys.rsa.jwk, locations=locations)
    got = verify([p], build(keys.rsa.sign(claims())))
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert got.location == expected
        assert got.subject == "alice"


# --- JWKS compilation ---------------------------------------------------------------------


def test_enc_keys_skipped(keys: Keys) -> None:
    enc = keys.es256.jwk | {"use": "enc"}
    compiled = compile_jwks(jwks(enc, keys.rsa.jwk | {"use": "sig"}), source="t")
    assert [k.kid for k in compiled] == ["rsa"]
    p = JwtProvider(issuer=ISS, audiences=frozenset(), keys=compiled)
    with pytest.raises(TokenKeyUnknownError):
        verify([p], bearer(keys.es256.sign(claims())))


def test_single_jwk_document(keys: Keys) -> None:
    compiled = compile_jwks(json.dumps(keys.es256.jwk), source="t")
    assert len(compiled) == 1
    assert compiled[0].kid == "p256"
    assert compiled[0].algorithms == frozenset({"ES256"})


@pytest.mark.parametrize(
    ("jwk", "algorithms"),
    [
        ({"alg": None}, frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})),
        ({"alg": "PS384"}, frozenset({"PS384"})),
    ],
    ids=["rsa-family", "rsa-pinned"],
)
def test_key_algorithms(keys: Keys, jwk: dict[str, Any], algorithms: frozenset[str]) -> None:
    entry = dict(keys.rsa.jwk)
    if jwk["alg"]:
        entry["alg"] = jwk["alg"]
    (compiled,) = compile_jwks(jwks(entry), source="t")
    assert compiled.algorithms == algorithms


JWKS_ERRORS: list[tuple[str, Callable[[Keys], str], str]] = [
    ("not-json", lambda k: "{not json", "JWKS is not JSON"),
    ("no-keys-list", lambda k: json.dumps({"keys": "x"}), "must be an object with a 'keys' list"),
    ("array", lambda k: json.dumps([k.rsa.jwk]), "must be an object with a 'keys' list"),
    ("key-not-object", lambda k: json.dumps({"keys": ["x"]}), "keys[0] is not an object"),
    ("empty", lambda k: jwks(), "no usable signing key"),
    ("only-enc", lambda k: jwks(k.rsa.jwk | {"use": "enc"}), "no usable signing key"),
    ("unknown-kty", lambda k: jwks({"kty": "XYZ", "kid": "x"}), "no usable signing key"),
    (
        "unsupported-alg",
        lambda k: jwks(k.rsa.jwk | {"alg": "RSA-OAEP"}),
        "no usable signing key",
    ),
    (
        "ec-alg-does-not-fit-curve",
        lambda k: jwks(k.es256.jwk | {"alg": "ES384"}),
        "no usable signing key",
    ),
    (
        "rsa-garbage-modulus",
        lambda k: jwks({"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"}),
        "keys[0] is not a valid key",
    ),
    (
        "ec-missing-coordinates",
        lambda k: jwks({"kty": "EC", "crv": "P-256", "kid": "x"}),
        "keys[0] is not a valid key",
    ),
    ("oct-without-k", lambda k: jwks({"kty": "oct", "kid": "x"}), "keys[0] is not a valid key"),
    (
        "alg-not-a-string",
        lambda k: jwks(k.es256.jwk | {"alg": ["ES256"]}),
        None,  # read as no alg (was a TypeError): the key still verifies ES256
    ),
    ("deeply-nested", lambda k: "[" * 100_000, "JWKS is not JSON"),
]


@pytest.mark.parametrize(
    ("make", "fragment"),
    [(m, f) for _, m, f in JWKS_ERRORS],
    ids=[i for i, *_ in JWKS_ERRORS],
)
def test_jwks_errors(keys: Keys, make: Callable[[Keys], str], fragment: str | None) -> None:
    if fragment is None:
        assert compile_jwks(make(keys), source="where.yaml:3")
        return
    with pytest.raises(JwksError) as info:
        compile_jwks(make(keys), source="where.yaml:3")
    assert info.value.reason == "jwks_invalid"
    assert info.value.message.startswith("where.yaml:3: ")
    assert fragment in info.value.message


# --- every supported algorithm, and header tricks ----------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


ALGORITHMS = [
    ("RS256", "rsa"),
    ("RS384", "rsa"),
    ("RS512", "rsa"),
    ("PS256", "rsa"),
    ("PS384", "rsa"),
    ("PS512", "rsa"),
    ("ES256", "P-256"),
    ("ES384", "P-384"),
    ("ES512", "P-521"),
    ("EdDSA", "Ed25519"),
    ("EdDSA", "Ed448"),
]
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def _private(kind: str, rsa_key: Any) -> Any:
    if kind == "rsa":
        return rsa_key
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind]())
    return (ed25519.Ed25519PrivateKey if kind == "Ed25519" else ed448.Ed448PrivateKey).generate()


def _public_jwk(private: Any, kid: str) -> dict[str, Any]:
    if isinstance(private, rsa.RSAPrivateKey):
        return _jwk(RSAAlgorithm.to_jwk(private.public_key()), kid)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return _jwk(ECAlgorithm.to_jwk(private.public_key()), kid)
    return _jwk(OKPAlgorithm.to_jwk(private.public_key()), kid)


@pytest.mark.parametrize(("alg", "kind"), ALGORITHMS, ids=[f"{a}-{k}" for a, k in ALGORITHMS])
def test_every_supported_algorithm_verifies(rsa_key: Any, alg: str, kind: str) -> None:
    private = _private(kind, rsa_key)
    token = jwt.encode(claims(), private, algorithm=alg, headers={"kid": "k"})
    got = verify([provider(_public_jwk(private, "k"))], bearer(token))
    assert got is not None
    assert got.subject == "alice"


@pytest.mark.parametrize(("alg", "kind"), ALGORITHMS, ids=[f"{a}-{k}" for a, k in ALGORITHMS])
def test_every_algorithm_obeys_the_provider_allow_list(rsa_key: Any, alg: str, kind: str) -> None:
    private = _private(kind, rsa_key)
    token = jwt.encode(claims(), private, algorithm=alg, headers={"kid": "k"})
    others = frozenset({"RS256", "ES256", "EdDSA", "PS512"} - {alg})
    p = provider(_public_jwk(private, "k"), algorithms=others)
    with pytest.raises(TokenAlgorithmError):
        verify([p], bearer(token))


def _attacker() -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _jwk(ECAlgorithm.to_jwk(key.public_key()), "p256")


# Headers that point a naive verifier at keys the attacker controls. extauthz only ever uses
# the keys of the issuer's jwtRule, so each of these is a signature failure.
HEADER_TRICKS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("jku-to-attacker-jwks", lambda jwk: {"jku": "https://attacker.test/jwks.json"}),
    ("x5u-to-attacker-cert", lambda jwk: {"x5u": "https://attacker.test/cert.pem"}),
    ("embedded-jwk", lambda jwk: {"jwk": jwk}),
    ("embedded-x5c", lambda jwk: {"x5c": ["MIIBattackercert"]}),
    ("kid-path-traversal", lambda jwk: {"kid": "../../../../dev/null"}),
    ("kid-sql-injection", lambda jwk: {"kid": "p256' OR '1'='1"}),
    ("kid-of-the-real-key", lambda jwk: {"kid": "p256"}),
]


@pytest.mark.parametrize("extra", [t for _, t in HEADER_TRICKS], ids=[n for n, _ in HEADER_TRICKS])
def test_header_tricks_never_bring_their_own_key(
    keys: Keys, extra: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    attacker, attacker_jwk = _attacker()
    header = {"kid": "p256", **extra(attacker_jwk)}
    token = jwt.encode(claims(), attacker, algorithm="ES256", headers=header)
    with pytest.raises(TokenError) as info:
        verify([provider(keys.es256.jwk)], bearer(token))
    assert info.value.reason in {"jwt_signature_invalid", "jwt_key_unknown"}


def test_a_genuine_token_with_a_jku_header_still_verifies_with_our_keys(keys: Keys) -> None:
    # jku/x5u are ignored, not obeyed and not a reason to refuse a good signature.
    token = keys.es256.sign(claims(), jku="https://attacker.test/jwks.json", x5u="https://x")
    assert verify([provider(keys.es256.jwk)], bearer(token)) is not None


def test_crit_header_is_refused(keys: Keys) -> None:
    token = keys.es256.sign(claims(), crit=["exp-ext"], **{"exp-ext": 1})
    with pytest.raises(TokenMalformedError, match="'crit'"):
        verify([provider(keys.es256.jwk)], bearer(token))


def test_a_token_for_another_provider_is_not_verified_with_its_keys(keys: Keys) -> None:
    # Two providers on one workload: a token claiming the first issuer but signed with the
    # second one's key fails; the provider is chosen by iss, never by trying every key.
    first = provider(keys.rsa.jwk)
    second = provider(keys.es256.jwk, issuer=OTHER_ISS)
    forged = keys.es256.sign(claims())  # iss is ISS, key is OTHER_ISS's
    with pytest.raises(TokenError) as info:
        verify([first, second], bearer(forged))
    assert info.value.reason in {"jwt_algorithm_not_allowed", "jwt_key_unknown"}
    genuine = keys.es256.sign(claims(iss=OTHER_ISS))
    got = verify([first, second], bearer(genuine))
    assert got is not None
    assert got.issuer == OTHER_ISS


def test_duplicate_claims_are_read_last_wins_by_both_readers(keys: Keys) -> None:
    """RFC 7519 4: a parser may keep the last duplicate. The provider choice (our peek) and
    PyJWT's validation must read the same one, or a token could be checked against the
    issuer it does not claim."""
    payload = f'{{"iss":"{OTHER_ISS}","sub":"mallory","iss":"{ISS}","sub":"alice"}}'.encode()
    token = keys.es256.sign_raw(payload)
    got = verify(
        [provider(keys.es256.jwk), provider(keys.rsa.jwk, issuer=OTHER_ISS)], bearer(token)
    )
    assert got is not None
    assert (got.issuer, got.subject) == (ISS, "alice")
    flipped = keys.es256.sign_raw(f'{{"iss":"{ISS}","iss":"{OTHER_ISS}"}}'.encode())
    with pytest.raises(TokenError) as info:  # OTHER_ISS's provider holds only the RSA key
        verify(
            [provider(keys.es256.jwk), provider(keys.rsa.jwk, issuer=OTHER_ISS)], bearer(flipped)
        )
    # Chosen by the last iss and refused for lack of its key; reading the first iss would
    # have verified the signature and failed on the issuer instead.
    assert info.value.reason in {"jwt_key_unknown", "jwt_algorithm_not_allowed"}


def test_a_nested_token_is_not_unwrapped(keys: Keys) -> None:
    """A JWT whose payload is another JWT (``cty: JWT``) is not a claims set: refused as
    malformed (its payload is not JSON); extauthz never unwraps it."""
    inner = keys.es256.sign(claims())
    outer = jwt.api_jws.PyJWS().encode(
        inner.encode(), keys.es256.key, algorithm="ES256", headers={"kid": "p256", "cty": "JWT"}
    )
    with pytest.raises(TokenMalformedError, match="not base64url-encoded JSON"):
        verify([provider(keys.es256.jwk)], bearer(outer))
