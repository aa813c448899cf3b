"""JWT verification for RequestAuthentication ``jwtRules``.

A :class:`JwtProvider` is one compiled jwtRule: issuer, audiences, keys and token locations.
A :class:`TokenVerifier` is the set of providers that apply to one workload; it finds the
token, picks the provider by the token's ``iss`` (never by trying every key) and verifies it
with PyJWT. Keys are parsed at load time; nothing here reads a file or the network.

Algorithms are tied to the key type: an RSA key only verifies RS*/PS*, an EC key only the ES
algorithm of its curve, an OKP key only EdDSA, an ``oct`` key only HS*. That makes the classic
confusions (``none``, HS256 "signed" with an RSA public key) impossible by construction.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import parse_qsl

import jwt

from ..errors import (
    JwksError,
    JwksUnavailableError,
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
from ..request import CheckInput

if TYPE_CHECKING:
    from .jwks import RemoteKeySet

CLOCK_SKEW_SECONDS = 60  # Envoy jwt_authn's default clock_skew_seconds
MAX_TOKEN_BYTES = 64 * 1024

_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP = frozenset({"EdDSA"})  # PyJWT's one name for Ed25519 and Ed448
_HMAC = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = _RSA | frozenset(_EC_BY_CURVE.values()) | _OKP
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | _HMAC


@dataclass(frozen=True, slots=True)
class Jwk:
    """One verification key and the algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any


class TokenLocation(NamedTuple):
    """Where a token may be: a header (with a value prefix), a query parameter or a cookie.

    A NamedTuple: part of the verified-token cache's key, hashed on every lookup (in C).
    """

    kind: Literal["header", "param", "cookie"]
    name: str
    prefix: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}" + (f" (prefix {self.prefix!r})" if self.prefix else "")


DEFAULT_LOCATIONS = (
    TokenLocation("header", "authorization", "Bearer "),
    TokenLocation("param", "access_token"),
)


def _key_algorithms(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty = jwk.get("kty")
    if kty == "RSA":
        family = _RSA
    elif kty == "EC":
        curve_alg = _EC_BY_CURVE.get(str(jwk.get("crv")))
        family = frozenset({curve_alg}) if curve_alg else frozenset()
    elif kty == "OKP":
        family = _OKP
    elif kty == "oct":
        family = _HMAC
    else:
        family = frozenset()
    alg = jwk.get("alg")
    return family & {alg} if isinstance(alg, str) and alg else family


def compile_jwks(text: str, *, source: str) -> tuple[Jwk, ...]:
    """Parse a JWKS document (or a single JWK) into keys; raise :class:`JwksError` if unusable.

    Keys with ``use`` other than ``sig`` are skipped, as are key types no algorithm here
    verifies; a set left with no key at all is an error, because it could verify nothing.
    """
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise JwksError(f"{source}: JWKS is not JSON: {exc}") from exc
    if isinstance(doc, dict) and "keys" not in doc and "kty" in doc:
        doc = {"keys": [doc]}
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError(f"{source}: JWKS must be an object with a 'keys' list")
    keys: list[Jwk] = []
    for i, entry in enumerate(doc["keys"]):
        if not isinstance(entry, dict):
            raise JwksError(f"{source}: keys[{i}] is not an object")
        if entry.get("use", "sig") != "sig":
            continue
        algorithms = _key_algorithms(entry) & SUPPORTED_ALGORITHMS
        if not algorithms:
            continue
        try:
            parsed = jwt.PyJWK(entry, algorithm=sorted(algorithms)[0])
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            raise JwksError(f"{source}: keys[{i}] is not a valid key: {exc}") from exc
        kid = entry.get("kid")
        keys.append(Jwk(kid if isinstance(kid, str) else None, algorithms, parsed.key))
    if not keys:
        raise JwksError(f"{source}: JWKS holds no usable signing key")
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    """Claim ``name`` copied into ``header``. ``path`` is ``name`` split on ``.`` at load: a
    nested claim, used when no top-level claim carries the dotted name itself."""

    header: str
    name: str
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One compiled jwtRule of a RequestAuthentication."""

    issuer: str
    audiences: frozenset[str]
    keys: tuple[Jwk, ...]
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS
    algorithms: frozenset[str] = ASYMMETRIC_ALGORITHMS | _HMAC
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    source: str = ""
    # jwksUri over http(s) or OIDC discovery: keys fetched in the background; ``keys`` is empty.
    remote: RemoteKeySet | None = None


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check. Holds the claims, never the token itself."""

    issuer: str
    subject: str
    audiences: tuple[str, ...]
    presenter: str
    claims: Mapping[str, Any]
    provider: JwtProvider
    location: TokenLocation
    payload_segment: str  # base64url payload, for outputPayloadToHeader; not a credential
    key_revision: int = 0  # of the provider's remote keys when verified: newer keys retire it
    # The provider's outputClaimToHeaders, worked out once per verification: a cached token
    # costs no claim lookups on later requests.
    claim_headers: tuple[tuple[str, str], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        headers = []
        for item in self.provider.output_claim_to_headers:
            value = claim_header_value(self.claims, item)
            if value is not None:
                headers.append((item.header, value))
        object.__setattr__(self, "claim_headers", tuple(headers))

    @property
    def principal(self) -> str:
        """Istio's ``request.auth.principal``: ``<iss>/<sub>``."""
        return f"{self.issuer}/{self.subject}"


# C0 controls and DEL, not tab: CR/LF or NUL in a claim must never reach an upstream header.
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def claim_header_value(claims: Mapping[str, Any], claim: ClaimToHeader) -> str | None:
    """A string/int/bool claim as a header value; None if absent, another type or unsafe."""
    value = claims[claim.name] if claim.name in claims else claim_value(claims, claim.path)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | str):
        text = str(value)
    else:
        return None
    if _UNSAFE_IN_HEADER.search(text):
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None  # a lone surrogate ("\ud800") cannot go into a header at all
    return text


def claim_value(claims: Mapping[str, Any], path: Iterable[str]) -> Any:
    """Walk nested claims; None when any step is missing or not an object."""
    value: Any = claims
    for step in path:
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload without verification: only to choose the provider and key."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenMalformedError(f"token longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenMalformedError("token is not a compact JWS (three dot-separated segments)")
    try:
        header, payload = _b64json(parts[0]), _b64json(parts[1])
    except (ValueError, binascii.Error, UnicodeError, RecursionError) as exc:
        # RecursionError: '[[[[...' nested past the JSON decoder's depth limit.
        raise TokenMalformedError("token segments are not base64url-encoded JSON") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenMalformedError("token header and payload must be JSON objects")
    if "crit" in header:
        # RFC 7515 4.1.11: extensions the recipient does not understand make the JWS invalid,
        # and extauthz understands none.
        raise TokenMalformedError("token header 'crit' names extensions extauthz does not support")
    for claim in ("exp", "nbf", "iat"):
        value = payload.get(claim)
        # PyJWT would coerce "123" to a number; Envoy's verifier refuses it, and so do we.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TokenClaimsError(f"'{claim}' must be a number")
    return header, payload


_PYJWT_ERRORS: tuple[tuple[type[Exception], type[TokenError]], ...] = (
    (jwt.ExpiredSignatureError, TokenExpiredError),
    (jwt.ImmatureSignatureError, TokenNotYetValidError),
    (jwt.InvalidAudienceError, TokenAudienceError),
    (jwt.InvalidSignatureError, TokenSignatureError),
    (jwt.InvalidAlgorithmError, TokenAlgorithmError),
    (jwt.InvalidIssuedAtError, TokenClaimsError),
    (jwt.exceptions.InvalidSubjectError, TokenClaimsError),
    (jwt.exceptions.InvalidJTIError, TokenClaimsError),
    (jwt.MissingRequiredClaimError, TokenClaimsError),
    (jwt.InvalidIssuerError, TokenIssuerUnknownError),
    (jwt.DecodeError, TokenMalformedError),
)


def _translate(exc: jwt.PyJWTError) -> TokenError:
    for pyjwt_type, ours in _PYJWT_ERRORS:
        if isinstance(exc, pyjwt_type):
            return ours(str(exc))
    return TokenError(str(exc))


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass(slots=True)
class CacheTotals:
    """Lookups of every token cache in the process, for metrics: each policy set's caches
    are new, but these keep counting across reloads."""

    hits: int = 0
    misses: int = 0


TOKEN_CACHE_TOTALS = CacheTotals()


class TokenCache:
    """Verified tokens, so that a token seen again costs a dict lookup, not a signature check.

    Bounded (least recently used goes first) and time-bounded: an entry lives until the
    token's ``exp`` (plus the clock skew a fresh verification would allow) and at most
    ``max_ttl`` seconds, and is not used before ``nbf`` minus the skew. One cache serves a
    whole compiled policy set, so that the bound holds for the process and not per workload
    (4,096 workloads with a cache each would not be bounded in practice); entries are scoped
    by the set of providers that verified them. A reload (new keys, new rules) starts empty.
    Only successes are cached: a bad token is verified, and refused, every time.
    """

    def __init__(self, max_entries: int = 10_000, max_ttl: float = 300.0) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[
            tuple[str, TokenLocation, int], tuple[VerifiedToken, float, float]
        ]
        self._entries = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every token (e.g. when the keys they were verified with may be gone)."""
        self._entries.clear()

    def get(
        self, token: str, location: TokenLocation, now: float, scope: int = 0
    ) -> VerifiedToken | None:
        key = (token, location, scope)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            TOKEN_CACHE_TOTALS.misses += 1
            return None
        verified, not_before, until = entry
        remote = verified.provider.remote
        if (
            now >= until
            or now < not_before
            or (remote is not None and remote.state.revision != verified.key_revision)
        ):
            del self._entries[key]
            self.misses += 1
            TOKEN_CACHE_TOTALS.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        TOKEN_CACHE_TOTALS.hits += 1
        return verified

    def put(
        self,
        token: str,
        location: TokenLocation,
        verified: VerifiedToken,
        now: float,
        scope: int = 0,
    ) -> None:
        if self.max_entries <= 0:
            return
        claims = verified.claims
        until = now + self.max_ttl
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            until = min(until, exp + CLOCK_SKEW_SECONDS)
        not_before = 0.0
        if isinstance(nbf, int | float) and not isinstance(nbf, bool):
            not_before = nbf - CLOCK_SKEW_SECONDS
        key = (token, location, scope)
        self._entries[key] = (verified, not_before, until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class TokenVerifier:
    """The jwtRules that apply to one workload, indexed by issuer and by location."""

    def __init__(
        self, providers: Iterable[JwtProvider], cache: TokenCache | None = None, scope: int = 0
    ) -> None:
        self.providers = tuple(providers)
        self.cache = cache if cache is not None else TokenCache()
        # Tells this verifier's entries in a shared cache from another provider set's.
        self.scope = scope
        self._by_issuer: dict[str, JwtProvider] = {}
        for p in self.providers:
            # Two rules for one issuer: the first wins, as Envoy keeps the first provider.
            self._by_issuer.setdefault(p.issuer, p)
        seen: dict[TokenLocation, None] = {}
        for p in self.providers:
            for loc in p.locations:
                seen.setdefault(loc, None)
        self.locations = tuple(seen)
        self._reads_params = any(loc.kind == "param" for loc in self.locations)
        self._param_names = tuple(loc.name for loc in self.locations if loc.kind == "param")
        # Each location, and whether it is the usual Authorization: Bearer (read inline).
        self._plan = tuple((loc, loc == _AUTHORIZATION_BEARER) for loc in self.locations)
        # Headers extauthz writes for these providers: a caller must never supply them.
        self.output_headers = frozenset(
            [h.header for p in self.providers for h in p.output_claim_to_headers]
            + [p.output_payload_to_header for p in self.providers if p.output_payload_to_header]
        )
        self._reads_cookies = any(loc.kind == "cookie" for loc in self.locations)

    def find(self, inp: CheckInput) -> tuple[str, TokenLocation] | None:
        """The token the request carries, or None. Several different tokens are refused."""
        if not self.locations:
            return None
        params: dict[str, list[str]] = {}
        query = inp.query
        # A parameter name we read decodes only from itself, a %-escape or a '+' (a space):
        # any other query (the usual one) needs no parsing.
        if self._reads_params and query and ("%" in query or "+" in query or self._param_in(query)):
            for name, value in parse_qsl(query):
                params.setdefault(name, []).append(value)
        cookies = _cookies(inp.headers.get("cookie", "")) if self._reads_cookies else {}
        found: tuple[str, TokenLocation] | None = None
        for loc, bearer in self._plan:
            if bearer:
                token = _bearer(inp.headers.get("authorization", ""))
            elif loc.kind == "param" and not params:
                continue
            else:
                token = _extract(loc, inp, params, cookies)
            if not token:
                continue
            if found is None:
                found = (token, loc)
            elif found[0] != token:
                raise TokenMultipleError(
                    f"request carries different tokens in {found[1].describe()} and "
                    f"{loc.describe()}"
                )
        return found

    def _param_in(self, query: str) -> bool:
        return any(name in query for name in self._param_names)

    def verify(self, inp: CheckInput) -> VerifiedToken | None:
        """Verify the request's token; None when it carries none. Raise TokenError if bad."""
        hit = self.find(inp)
        if hit is None:
            return None
        token, location = hit
        now = time.time()
        cached = self.cache.get(token, location, now, self.scope)
        if cached is not None:
            return cached
        verified = self._verify(token, location)
        self.cache.put(token, location, verified, now, self.scope)
        return verified

    def _verify(self, token: str, location: TokenLocation) -> VerifiedToken:
        header, payload = _peek(token)
        issuer = payload.get("iss")
        provider = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if provider is None:
            raise TokenIssuerUnknownError("token issuer is not trusted for this workload")
        if location not in provider.locations:
            raise TokenIssuerUnknownError(
                f"issuer {issuer!r} does not accept tokens from {location.describe()}"
            )
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise TokenAlgorithmError(f"token algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        remote = provider.remote
        keys, revision = remote.state if remote is not None else (provider.keys, 0)
        if remote is not None and not keys:
            raise JwksUnavailableError(
                f"keys of issuer {issuer!r} are not available "
                f"({remote.last_error or 'first fetch pending'})",
                refresh=remote.request_refresh(),
            )
        candidates = [k for k in keys if alg in k.algorithms]
        if kid is not None:
            # As Envoy's jwt_verify_lib: a key without a kid may verify a token with one.
            candidates = [k for k in candidates if k.kid is None or k.kid == kid]
        if not candidates:
            raise TokenKeyUnknownError(
                f"no {alg} key with kid {kid!r} for issuer {issuer!r}",
                refresh=remote.request_refresh() if remote is not None else None,
            )
        try:
            claims = _decode(token, alg, candidates, provider)
        except TokenSignatureError as exc:
            if remote is not None and kid is None:
                # No kid to tell a rotated key by: a bad signature may mean keys we lack.
                exc.refresh = remote.request_refresh()
            raise
        subject = claims.get("sub", "")
        azp = claims.get("azp", "")
        if not isinstance(subject, str) or not isinstance(azp, str):
            raise TokenClaimsError("'sub' and 'azp' must be strings")
        return VerifiedToken(
            issuer=provider.issuer,
            subject=subject,
            audiences=_string_list(claims.get("aud")),
            presenter=azp,
            claims=MappingProxyType(claims),
            provider=provider,
            location=location,
            payload_segment=token.split(".", 2)[1],
            key_revision=revision,
        )

    def assume(self, claims: Mapping[str, Any]) -> VerifiedToken:
        """Claims taken as verified (``extauthz check``, policy tests), never from a request.

        The issuer must be one of this workload's providers and the audiences must fit, as
        for a real token; the signature and the clock are what is skipped.
        """
        issuer = claims.get("iss")
        provider = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if provider is None:
            raise TokenIssuerUnknownError(
                f"issuer {issuer!r} is not trusted by a RequestAuthentication of this workload"
            )
        audiences = _string_list(claims.get("aud"))
        if provider.audiences and not provider.audiences.intersection(audiences):
            raise TokenAudienceError(f"audience {list(audiences)} is not accepted")
        subject, azp = claims.get("sub", ""), claims.get("azp", "")
        if not isinstance(subject, str) or not isinstance(azp, str):
            raise TokenClaimsError("'sub' and 'azp' must be strings")
        payload = json.dumps(dict(claims), separators=(",", ":")).encode()
        return VerifiedToken(
            issuer=provider.issuer,
            subject=subject,
            audiences=audiences,
            presenter=azp,
            claims=MappingProxyType(dict(claims)),
            provider=provider,
            location=provider.locations[0],
            payload_segment=base64.urlsafe_b64encode(payload).rstrip(b"=").decode(),
        )


def _decode(token: str, alg: str, keys: list[Jwk], provider: JwtProvider) -> dict[str, Any]:
    last: TokenError = TokenSignatureError("signature verification failed")
    for key in keys:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=provider.audiences or None,
                issuer=provider.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                # iat is informational: Envoy's jwt_authn does not reject a future iat.
                options={"verify_aud": bool(provider.audiences), "verify_iat": False},
            )
        except jwt.InvalidSignatureError as exc:
            last = _translate(exc)
            continue  # several keys share no kid: try the next one
        except jwt.PyJWTError as exc:
            raise _translate(exc) from exc
        return claims
    raise last


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name not in out:
            out[name] = value.strip('"')
    return out


_AUTHORIZATION_BEARER = DEFAULT_LOCATIONS[0]
_BEARER = len("Bearer ")


def _bearer(value: str) -> str:
    """``_extract`` for the usual location, ``Authorization: Bearer <token>``, inlined."""
    if not value:
        return ""
    head = value[:_BEARER]
    if head != "Bearer " and head.lower() != "bearer ":
        return ""
    return value[_BEARER:].strip()


def _extract(
    loc: TokenLocation,
    inp: CheckInput,
    params: Mapping[str, list[str]],
    cookies: Mapping[str, str],
) -> str:
    if loc.kind == "param":
        values = set(params.get(loc.name, ()))
        if len(values) > 1:
            raise TokenMultipleError(f"request repeats {loc.describe()} with different tokens")
        return values.pop() if values else ""
    if loc.kind == "cookie":
        return cookies.get(loc.name, "")
    value = inp.headers.get(loc.name, "")
    if not value:
        return ""
    if loc.prefix:
        # The auth scheme is case-insensitive (RFC 9110 11.1); custom prefixes are exact.
        head = value[: len(loc.prefix)]
        same = (
            head.lower() == loc.prefix.lower()
            if loc.name == "authorization"
            else (head == loc.prefix)
        )
        if not same:
            return ""
        value = value[len(loc.prefix) :]
    return value.strip()
