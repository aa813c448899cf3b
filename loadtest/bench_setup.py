"""What ``loadtest.bench`` measures: workloads, setups, and the Envoy configs of each.

Every setup is one Envoy (``--concurrency 1``) answering with ``direct_response`` (no
upstream: the figure is Envoy plus the authorization layer, nothing else), and differs only
in its HTTP filters. The *realistic* workload needs a SPIFFE peer, and wrk cannot present a
client certificate: a front Envoy (also ``--concurrency 1``, the same for every setup) takes
wrk's plaintext connections and opens mTLS to the measured Envoy with the SVID
``spiffe://bench.local/ns/shop/sa/frontend``. The *trivial* workload needs no peer: wrk talks
plaintext to the measured Envoy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.json"  # the realistic workload's 20 path/method rules
POLICIES = HERE / "policies"
OPA = HERE / "opa"
TRUST_DOMAIN = "bench.local"
CALLER = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
SERVER = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/orders"
ISSUER = "https://idp.bench.local"
AUDIENCE = "orders"
SCOPE = "orders.read"
JWKS_FILE = "bench-idp.jwks.json"

WORKLOADS = ("trivial", "realistic")
SETUPS = (
    "none",
    "native",
    "extauthz-1",
    "extauthz-2",
    "extauthz-http-1",
    "extauthz-http-2",
    "peer",
)
# extauthz's setups by transport: (1 worker, 2 workers).
EXTAUTHZ = {"grpc": ("extauthz-1", "extauthz-2"), "http": ("extauthz-http-1", "extauthz-http-2")}
_T = "type.googleapis.com/envoy.extensions."
_HCM = _T + "filters.network.http_connection_manager.v3.HttpConnectionManager"
_TLS = "envoy.transport_sockets.tls"


@dataclass(frozen=True)
class Request:
    """The request wrk sends (allowed by every setup) and one every setup must deny."""

    method: str
    path: str
    headers: Mapping[str, str]
    denied_method: str
    denied_path: str
    denied_headers: Mapping[str, str]


class Idp:
    """An RS256 key pair made per run: the JWKS for the policies, the token for wrk."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="bench-1", alg="RS256", use="sig")
        self.jwks = json.dumps({"keys": [jwk]})

    def token(self, *, scope: Sequence[str] = (SCOPE, "profile"), ttl: int = 3600) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "alice",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + ttl,
            "scope": list(scope),
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "bench-1"})


def request(workload: str, idp: Idp) -> Request:
    if workload == "trivial":
        return Request("GET", "/", {}, "POST", "/", {})
    token = idp.token()
    return Request(
        "GET",
        "/api/v1/res19/item",  # the last of the 20 rules
        {"authorization": f"Bearer {token}"},
        "GET",
        "/api/v1/res19/item",
        {"authorization": f"Bearer {idp.token(scope=('profile',))}"},  # no orders.read
    )


def rules() -> list[dict[str, str]]:
    data: list[dict[str, str]] = json.loads(RULES.read_text())
    return data


def native_filters(workload: str, jwks: str) -> list[dict[str, Any]]:
    """Envoy's RBAC (+ jwt_authn for the realistic workload) with the rules of the policies."""
    if workload == "trivial":
        policies = {
            "get-only": {
                "permissions": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}}],
                "principals": [{"any": True}],
            }
        }
        return [_rbac(policies)]
    principal = {
        "and_ids": {
            "ids": [
                {
                    "authenticated": {
                        "principal_name": {"prefix": f"spiffe://{TRUST_DOMAIN}/ns/shop/"}
                    }
                },
                {
                    "metadata": {
                        "filter": "envoy.filters.http.jwt_authn",
                        "path": [{"key": "jwt_payload"}, {"key": "scope"}],
                        "value": {"list_match": {"one_of": {"string_match": {"exact": SCOPE}}}},
                    }
                },
            ]
        }
    }
    policies = {
        f"rule-{i:02d}": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [
                            {"header": {"name": ":method", "string_match": {"exact": r["method"]}}},
                            {"url_path": {"path": {"prefix": r["prefix"]}}},
                        ]
                    }
                }
            ],
            "principals": [principal],
        }
        for i, r in enumerate(rules())
    }
    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _T + "filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "bench": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": jwks},
                    "forward": False,
                    "payload_in_metadata": "jwt_payload",
                    # A verified-token cache, as extauthz has one (off by default in Envoy).
                    "jwt_cache_config": {"jwt_cache_size": 100},
                }
            },
            # requestPrincipals: ["*"]: a valid token is required.
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }
    return [jwt_authn, _rbac(policies)]


def _rbac(policies: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _T + "filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": dict(policies)},
        },
    }


def ext_authz_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _T + "filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            # 1 s rather than the sidecar's 0.25 s: under saturation checks queue, and a
            # timeout would turn the measurement into a count of 503s.
            "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "1s"},
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def http_ext_authz_filter() -> dict[str, Any]:
    """ext_authz over ``http_service`` to ``serve --http-listen`` (as envoy/sidecar-http.yaml):
    the peer header carries the namespace and the mTLS peer's URI SAN."""
    peer = (
        "namespace=shop;src=%DOWNSTREAM_REMOTE_ADDRESS%;dst=%DOWNSTREAM_LOCAL_ADDRESS%;"
        "uri=%DOWNSTREAM_PEER_URI_SAN%"
    )
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _T + "filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {"uri": "http://127.0.0.1", "cluster": "authz", "timeout": "1s"},
                "authorization_request": {
                    "headers_to_add": [{"key": "x-extauthz-peer", "value": peer}]
                },
                "authorization_response": {
                    "allowed_upstream_headers": {
                        "patterns": [{"prefix": "x-"}, {"exact": "authorization"}]
                    }
                },
            },
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def http_authz_cluster(ports: Sequence[int]) -> dict[str, Any]:
    """One HTTP/1.1 endpoint per worker, least request."""
    return {
        "name": "authz",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": "authz",
            "endpoints": [{"lb_endpoints": [_endpoint(p) for p in ports]}],
        },
    }


def authz_cluster(ports: Sequence[int]) -> dict[str, Any]:
    """One endpoint per worker, least request (as envoy/workers.yaml)."""
    return {
        "name": "authz",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "authz",
            "endpoints": [{"lb_endpoints": [_endpoint(p) for p in ports]}],
        },
    }


def _endpoint(port: int) -> dict[str, Any]:
    return {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    }


def target_envoy(
    *,
    admin_port: int,
    listen_port: int,
    filters: Sequence[dict[str, Any]],
    clusters: Sequence[dict[str, Any]] = (),
    tls: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """The measured Envoy: filters, then a ``direct_response`` 200; mTLS with ``tls``."""
    answer = {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    chain = _http_chain("bench", filters, answer)
    if tls is not None:
        chain["transport_socket"] = {
            "name": _TLS,
            "typed_config": {
                "@type": _T + "transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _tls_context(tls),
            },
        }
    return _bootstrap(
        admin_port,
        [_listener("bench", listen_port, chain)],
        list(clusters),
    )


def front_envoy(
    *, admin_port: int, routes: Mapping[int, int], tls: Mapping[str, Path]
) -> dict[str, Any]:
    """wrk's plaintext on each port of ``routes`` → mTLS as CALLER to the target port."""
    listeners, clusters = [], []
    for listen_port, target_port in routes.items():
        name = f"to-{target_port}"
        chain = _http_chain(name, (), {"route": {"cluster": name}})
        listeners.append(_listener(name, listen_port, chain))
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [_endpoint(target_port)]}],
                },
                "transport_socket": {
                    "name": _TLS,
                    "typed_config": {
                        "@type": _T + "transport_sockets.tls.v3.UpstreamTlsContext",
                        "common_tls_context": _tls_context(tls),
                    },
                },
            }
        )
    return _bootstrap(admin_port, listeners, clusters)


def _http_chain(
    stat_prefix: str, filters: Sequence[dict[str, Any]], action: Mapping[str, Any]
) -> dict[str, Any]:
    """A filter chain: the HTTP connection manager with ``filters``, the router, and one
    route for every path doing ``action``."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",  # HTTP/1.1 (wrk) or HTTP/2 cleartext (h2load)
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "filters.http.router.v3.Router"},
            },
        ],
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, **action}],
                }
            ]
        },
    }
    return {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }


def _tls_context(tls: Mapping[str, Path]) -> dict[str, Any]:
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(tls["cert"])},
                "private_key": {"filename": str(tls["key"])},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(tls["ca"])}},
    }


def _listener(name: str, port: int, chain: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def _bootstrap(
    admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
