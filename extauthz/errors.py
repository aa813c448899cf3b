"""The one exception tree of extauthz.

Every error carries a stable machine ``reason``: it is the label on the decision span, the
metric and the audit record, and the ``reason`` field of a deny body. Reasons never change
meaning once released; add new ones instead.
"""

from __future__ import annotations

from concurrent.futures import Future


class ExtAuthzError(Exception):
    """Base of every error extauthz raises on purpose."""

    reason = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


# --- configuration and policy loading (load time, never on the request path) -------------


class ConfigError(ExtAuthzError):
    """The server's own configuration (flags, environment) is unusable."""

    reason = "config_invalid"


class PolicyError(ExtAuthzError):
    """A policy file cannot be loaded; the message names ``file:line`` and the field."""

    reason = "policy_invalid"

    def __init__(self, message: str, *, file: str = "", line: int = 0) -> None:
        self.file = file
        self.line = line
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(f"{where}{message}")


class PolicySetError(ExtAuthzError):
    """Several policy problems found in one load; ``errors`` holds each of them."""

    reason = "policy_invalid"

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = errors
        super().__init__("\n".join(e.message for e in errors))


class JwksError(ExtAuthzError):
    """A JWKS (inline or file) cannot be parsed or holds no usable key."""

    reason = "jwks_invalid"


class SigningKeyError(ConfigError):
    """``--signing-key`` cannot be read, is not a private key, or is of a type or size
    extauthz does not sign with (EC P-256/P-384, RSA >= 2048 bits, Ed25519)."""

    reason = "signing_key_invalid"


class DecisionLogError(ConfigError):
    """The ``--decision-log*`` flags are inconsistent, or the decision log file cannot be
    opened or rotated at start; the message names the flag and the file."""

    reason = "decision_log_invalid"


# --- request-time failures: each becomes a deny ------------------------------------------


class RequestError(ExtAuthzError):
    """The CheckRequest itself is unusable (missing attributes, malformed values)."""

    reason = "request_invalid"


class IdentityError(ExtAuthzError):
    """The caller's identity could not be established: always a 401."""

    reason = "unauthenticated"


class SpiffeIdError(IdentityError):
    """A peer identity claims to be a SPIFFE ID but breaks the SPIFFE ID syntax."""

    reason = "spiffe_id_invalid"


class TrustDomainError(IdentityError):
    """The peer is not a SPIFFE ID of a trust domain this server was told to trust."""

    reason = "spiffe_trust_domain_untrusted"


class XfccError(IdentityError):
    """An x-forwarded-client-cert header that extauthz was told to trust cannot be parsed."""

    reason = "xfcc_invalid"


class PeerCertificateError(IdentityError):
    """The peer certificate Envoy forwarded cannot be decoded or is not an X.509-SVID."""

    reason = "peer_certificate_invalid"


class TokenError(IdentityError):
    """A JWT is present but not acceptable. Subclasses name the exact failure.

    ``refresh`` is set when the issuer's keys come from the network and an early refetch was
    granted because of this token (an unknown ``kid``): the caller may wait for it, bounded,
    and decide once more with the new keys.
    """

    reason = "jwt_invalid"

    def __init__(
        self, message: str, *, reason: str | None = None, refresh: Future[bool] | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.refresh = refresh


class TokenMalformedError(TokenError):
    """The token is not a well-formed compact JWS (segments, base64url, JSON)."""

    reason = "jwt_malformed"


class TokenIssuerUnknownError(TokenError):
    """No RequestAuthentication rule for this workload trusts the token's issuer."""

    reason = "jwt_issuer_unknown"


class TokenAlgorithmError(TokenError):
    """The token's ``alg`` is not allowed for the provider or the key (``none``, HS on RSA)."""

    reason = "jwt_algorithm_not_allowed"


class TokenKeyUnknownError(TokenError):
    """No key of the issuer matches the token's ``kid`` and algorithm."""

    reason = "jwt_key_unknown"


class JwksUnavailableError(TokenKeyUnknownError):
    """The issuer's keys come from the network and none have been fetched yet."""

    reason = "jwks_unavailable"


class TokenSignatureError(TokenError):
    """The signature does not verify with the provider's key."""

    reason = "jwt_signature_invalid"


class TokenExpiredError(TokenError):
    """``exp`` is in the past (beyond the clock-skew leeway)."""

    reason = "jwt_expired"


class TokenNotYetValidError(TokenError):
    """``nbf`` or ``iat`` is in the future (beyond the clock-skew leeway)."""

    reason = "jwt_not_yet_valid"


class TokenAudienceError(TokenError):
    """The token's ``aud`` shares no value with the provider's ``audiences``."""

    reason = "jwt_audience_invalid"


class TokenClaimsError(TokenError):
    """A registered claim has the wrong type (e.g. ``exp`` not a number, ``sub`` not a string)."""

    reason = "jwt_claims_invalid"


class TokenMultipleError(TokenError):
    """The request carries more than one distinct token; extauthz will not guess which counts."""

    reason = "jwt_multiple"


class TokenMintError(ExtAuthzError):
    """A rule asks for a minted token but the request gives nothing to mint it from: no caller
    identity for ``sub`` (neither a token subject nor a SPIFFE ID), or no host for the default
    ``aud``. Denied (403): an allow without the token the rule promised the upstream would
    reach it unauthenticated."""

    reason = "token_mint_refused"


class UnavailableError(ExtAuthzError):
    """extauthz cannot carry out what a policy asks because of its own configuration, not the
    caller: a 503, as for an internal error, so that it shows up as a server fault."""

    reason = "authorization_unavailable"


class TokenSigningUnconfiguredError(UnavailableError):
    """A rule asks for a minted token but the server runs without ``--signing-key``. The policy
    set loads (``policy lint`` compiles it without server flags) and every decision that needs
    the token fails closed with this reason."""

    reason = "token_signing_unconfigured"


class OverloadedError(UnavailableError):
    """More Checks are in flight than ``--max-concurrent-checks``: this one is answered at
    once with a 503 (and ``retry-after``) instead of queueing behind the others. A deny like
    any other, never an RPC error that ``failure_mode_allow`` could turn into an allow."""

    reason = "overloaded"


class WorkloadUnknownError(ExtAuthzError):
    """Policies are scoped to namespaces/labels but the request does not say which workload
    it is for (no ``namespace``/``labels`` context extension, server default or destination
    principal). Denied (403) rather than guessed: guessing could skip an ALLOW policy and
    fall through to Istio's "no ALLOW policy applies, allow" default."""

    reason = "workload_unknown"
