"""Server settings: one frozen value built from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .decisionlog.settings import DecisionLogSettings
from .errors import ConfigError
from .identity.jwks import FetchSettings
from .identity.mint import DEFAULT_ISSUER
from .policy.engine import DEFAULT_ROOT_NAMESPACE

DEFAULT_LISTEN = "127.0.0.1:9191"
# Checks one process holds at once before it sheds more (503 ``overloaded``): about Envoy's
# default circuit breaker (1,024 requests per cluster) and gRPC's ~1,000 pending calls.
DEFAULT_MAX_CONCURRENT_CHECKS = 1000
SPIFFE_ID_HEADER = "x-extauthz-spiffe-id"


@dataclass(frozen=True, slots=True)
class Settings:
    """How extauthz identifies workloads and what it tells the upstream.

    ``workload_namespace``/``workload_labels`` name the protected workload when Envoy's
    ``context_extensions`` do not (one extauthz per sidecar); ``xff_trusted_hops`` is Istio's
    ``numTrustedProxies`` for ``remote.ip``/``remoteIpBlocks``. ``signing_key`` (a PEM file
    read once at start), ``token_issuer`` and ``jwks_listen`` configure token exchange.
    """

    listen: str = DEFAULT_LISTEN
    policies: Path | None = None
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    workload_namespace: str | None = None
    workload_labels: str | None = None
    xff_trusted_hops: int = 0
    # SPIFFE trust domains whose peers are accepted; empty: any (mTLS already vouched).
    trust_domains: frozenset[str] = frozenset()
    # x-forwarded-client-cert identifies the caller only when this Envoy's chain of proxies
    # sets it (and sanitizes what clients send); otherwise it is ignored and stripped.
    trust_xfcc: bool = False
    # Remote JWKS / OIDC discovery: refresh interval, unknown-kid rate limit, timeout, CA file.
    jwks: FetchSettings = field(default_factory=FetchSettings)
    spiffe_id_header: str = SPIFFE_ID_HEADER
    grace_seconds: float = 5.0
    drain_delay: float = 0.0  # seconds NOT_SERVING but still answering, before closing
    max_concurrent_checks: int = DEFAULT_MAX_CONCURRENT_CHECKS  # 0: no limit
    reload_interval: float = 2.0
    # The admin gRPC service's own listener (None: off) and how many recent decisions it can
    # explain by id (0: none are recorded).
    admin_listen: str | None = None
    recent_decisions: int = 1024
    # Token exchange: the key minted tokens are signed with (None: rules that mint fail
    # closed), their ``iss``, and the HTTP listener serving the public key (None: off).
    signing_key: Path | None = None
    token_issuer: str = DEFAULT_ISSUER
    jwks_listen: str | None = None
    # One JSON record per decision (``--decision-log``); None: off.
    decision_log: DecisionLogSettings | None = None
    # The Prometheus scrape endpoint (None: off).
    metrics_listen: str | None = None
    # Envoy's ext_authz http_service listener (None: off; loopback or unix: only) and the
    # path_prefix Envoy puts in front of the client's path.
    http_listen: str | None = None
    http_path_prefix: str = ""
    # The names Envoy's allowed_upstream_headers lets upstream (prefixes end in '*').
    http_upstream_headers: str = "x-*,authorization"


def host_port(listen: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` too) of a TCP listener flag; ConfigError naming ``what``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {listen!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
