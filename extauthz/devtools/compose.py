"""``python -m extauthz.devtools.compose OUTDIR``: the files ``docker-compose.yml`` mounts.

Development only. The compose mesh is the local demo in containers, so it is built from the
same pieces: the dev CA and SVIDs (:func:`write_pki`), the dev IdP's JWKS (:class:`DevIdP`),
and one Envoy per workload rendered from ``envoy/sidecar.yaml`` by :func:`render_sidecar`,
with the same ``context_extensions`` as :mod:`extauthz.devtools.mesh`. Only addresses
differ: containers dial each other by compose service name. Each sidecar also gets an
``outbound`` listener on its workload's loopback that originates mTLS with the workload's
SVID, so workloads call each other as they would in a mesh.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .composecheck import interpolate, problems
from .envoy import dump_config, render_sidecar
from .idp import DevIdP
from .mesh import ISSUER, JWKS_FILE, NAMESPACE, REPO, SIDECAR_TEMPLATE, TRUST_DOMAIN
from .pki import write_pki

COMPOSE_FILE = REPO / "docker-compose.yml"
DEFAULT_OUTDIR = Path(".demo/compose")
DIR_VARIABLE = "EXTAUTHZ_COMPOSE_DIR"  # docker-compose.yml's ${...:-./.demo/compose}
WORKLOADS = ("frontend", "orders", "payments")
CLIENTS = ("intruder",)  # an SVID from the right CA that no policy lets in

# Compose service names and the ports their containers listen on; docker-compose.yml agrees
# (tests/test_compose.py checks it with extauthz.devtools.composecheck).
EXTAUTHZ_SERVICE = "extauthz"
EXTAUTHZ_PORT = 9191
COLLECTOR_SERVICE = "otel-collector"
OTLP_GRPC_PORT = 4317
OTLP_HTTP_PORT = 4318
JAEGER_SERVICE = "jaeger"
JAEGER_OTLP_PORT = 4317
UPSTREAM_PORT = 8080  # the echo workload, on its pod's loopback
INBOUND_PORT = 8443  # the sidecar's mTLS listener
OUTBOUND_PORT = 15001  # the sidecar's plaintext egress, on the pod's loopback
ADMIN_PORT = 9901
ENVOY_CERTS = "/etc/envoy/certs"  # where docker-compose.yml mounts each sidecar's files

_HCM = "envoy.filters.network.http_connection_manager"
_HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)


def spiffe_id(name: str) -> str:
    """The demo's SPIFFE ID for a workload (as :meth:`Mesh.spiffe_id`)."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{name}"


@dataclass(frozen=True)
class Generated:
    outdir: Path
    certs: Mapping[str, Path]
    envoy: Mapping[str, Path]
    jwks: Path
    collector: Path
    tokens: Mapping[str, Path]


def generate(outdir: Path, *, token_ttl: float = 8 * 3600) -> Generated:
    """Write certificates, IdP JWKS, tokens, sidecar and collector configs under ``outdir``.

    Everything is new on each call (a new CA and IdP key): restart the containers after it.
    """
    certs_dir = outdir / "certs"
    if certs_dir.exists():
        shutil.rmtree(certs_dir)  # no SVID of an older CA may linger
    certs = write_pki(
        certs_dir,
        TRUST_DOMAIN,
        {n: spiffe_id(n) for n in (*WORKLOADS, *CLIENTS)},
        dns_names=["localhost"],
    )
    idp = DevIdP.create(ISSUER)
    jwks = outdir / "idp" / JWKS_FILE
    jwks.parent.mkdir(parents=True, exist_ok=True)
    jwks.write_text(idp.jwks())
    tokens = {
        "alice": idp.token("alice", audience="shop", ttl=token_ttl),
        "admin": idp.token("root", audience="shop", ttl=token_ttl, roles=["admin"]),
    }
    token_files = {}
    for who, token in tokens.items():
        token_files[who] = outdir / f"{who}.jwt"
        token_files[who].write_text(token + "\n")

    envoy_dir = outdir / "envoy"
    envoy_dir.mkdir(parents=True, exist_ok=True)
    envoy = {
        name: dump_config(sidecar_config(name), envoy_dir / f"{name}.yaml") for name in WORKLOADS
    }
    collector = outdir / "otel-collector.yaml"
    collector.write_text(yaml.safe_dump(collector_config(), sort_keys=False))
    return Generated(outdir, certs, envoy, jwks, collector, token_files)


def sidecar_config(name: str) -> dict[str, Any]:
    """The Envoy bootstrap of ``name``'s sidecar container."""
    certs = {k: Path(ENVOY_CERTS, f) for k, f in CONTAINER_CERTS.items()}
    config = render_sidecar(
        SIDECAR_TEMPLATE,
        listen_port=INBOUND_PORT,
        admin_port=ADMIN_PORT,
        extauthz_port=EXTAUTHZ_PORT,
        upstream_port=UPSTREAM_PORT,
        certs=certs,
        # As in mesh.py: the label-selecting policies in policies/shop/ apply as written.
        context_extensions={"namespace": NAMESPACE, "labels": f"app={name}"},
        collector_port=OTLP_GRPC_PORT,
        service_name=name,
        # Other containers (and the published port) reach the inbound listener; the
        # workload itself shares the sidecar's network namespace and stays on 127.0.0.1.
        listen_address="0.0.0.0",
        hosts={"extauthz": EXTAUTHZ_SERVICE, "otel_collector": COLLECTOR_SERVICE},
    )
    peers = {w: (w, INBOUND_PORT) for w in WORKLOADS if w != name}
    add_outbound(config, peers=peers, certs=certs)
    return config


# Container file names; docker-compose.yml mounts each workload's own files onto them.
CONTAINER_CERTS = {"ca": "ca.pem", "cert": "workload.pem", "key": "workload-key.pem"}


def add_outbound(
    config: dict[str, Any],
    *,
    peers: Mapping[str, tuple[str, int]],
    certs: Mapping[str, Path],
    port: int = OUTBOUND_PORT,
) -> None:
    """Add the ``outbound`` listener and one mTLS cluster per peer workload to ``config``.

    The workload sends plain HTTP to 127.0.0.1:``port`` with ``Host: <peer>.shop``; Envoy
    dials the peer's sidecar at ``peers[peer]`` (host, port) presenting this workload's
    SVID, and accepts only a server whose URI SAN is the peer's SPIFFE ID. Spans use the
    inbound listener's tracer settings.
    """
    resources = config["static_resources"]
    inbound = next(lsn for lsn in resources["listeners"] if lsn["name"] == "inbound")
    hcm = next(
        f["typed_config"]
        for c in inbound["filter_chains"]
        for f in c["filters"]
        if f["name"] == _HCM
    )
    virtual_hosts = [
        {
            "name": peer,
            "domains": [f"{peer}.{NAMESPACE}", peer],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"to_{peer}"}}],
        }
        for peer in peers
    ]
    resources["listeners"].append(
        {
            "name": "outbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "traffic_direction": "OUTBOUND",
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": _HCM,
                            "typed_config": {
                                "@type": _HCM_TYPE,
                                "stat_prefix": "outbound",
                                "codec_type": "AUTO",
                                "strip_any_host_port": True,  # Host: orders.shop:15001
                                "tracing": copy.deepcopy(hcm["tracing"]),
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": _ROUTER_TYPE},
                                    }
                                ],
                                "route_config": {
                                    "name": "outbound",
                                    "virtual_hosts": virtual_hosts,
                                },
                            },
                        }
                    ]
                }
            ],
        }
    )
    for peer, address in peers.items():
        resources["clusters"].append(_peer_cluster(peer, address, certs))


def _peer_cluster(peer: str, address: tuple[str, int], certs: Mapping[str, Path]) -> dict[str, Any]:
    host, port = address
    return {
        "name": f"to_{peer}",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": f"to_{peer}",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _UPSTREAM_TLS_TYPE,
                "sni": f"{peer}.{NAMESPACE}",
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(certs["cert"])},
                            "private_key": {"filename": str(certs["key"])},
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"filename": str(certs["ca"])},
                        # The CA vouches for every workload; only this SAN proves it is `peer`.
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": spiffe_id(peer)}}
                        ],
                    },
                },
            },
        },
    }


def collector_config() -> dict[str, Any]:
    """OTLP in (extauthz and the sidecars), traces out to Jaeger, metrics to the log."""
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    # All interfaces: the collector's own default is localhost since 0.104.
                    "grpc": {"endpoint": f"0.0.0.0:{OTLP_GRPC_PORT}"},
                    "http": {"endpoint": f"0.0.0.0:{OTLP_HTTP_PORT}"},
                }
            }
        },
        "processors": {"batch": {}},
        "exporters": {
            "otlp_grpc/jaeger": {
                "endpoint": f"{JAEGER_SERVICE}:{JAEGER_OTLP_PORT}",
                "tls": {"insecure": True},
            },
            # Jaeger stores traces only; the decision metrics are printed, as a sample.
            "debug": {"verbosity": "basic"},
        },
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["otlp_grpc/jaeger"],
                },
                "metrics": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["debug"]},
            }
        },
    }


def published_port(compose: Mapping[str, Any], service: str, container_port: int) -> int:
    """The host port ``docker-compose.yml`` publishes ``service``'s ``container_port`` on."""
    for entry in compose["services"][service].get("ports", []):
        parts = str(entry).split("/")[0].split(":")  # [IP:]HOST:CONTAINER[/PROTO]
        if len(parts) >= 2 and int(parts[-1]) == container_port:
            return int(parts[-2])
    raise ValueError(f"{service} does not publish port {container_port}")


def instructions(gen: Generated, compose: Mapping[str, Any]) -> str:
    """What to run next, with the host ports docker-compose.yml publishes."""
    certs = gen.outdir / "certs"
    orders = published_port(compose, "orders", INBOUND_PORT)
    jaeger = published_port(compose, JAEGER_SERVICE, 16686)
    token = f"$(cat {gen.tokens['alice']})"
    where = ""
    if gen.outdir != DEFAULT_OUTDIR:
        where = f"\nNot the default directory: export {DIR_VARIABLE}={gen.outdir.absolute()}\n"
    return f"""Generated under {gen.outdir}/ (a new CA, SVIDs and IdP key; tokens valid 8 h).
{where}
Start the mesh:   docker compose up --build      (from the repository root)
Restart it after regenerating: docker compose up --build --force-recreate

Call orders' sidecar as frontend, for alice:
  curl --cacert {certs}/ca.pem --cert {certs}/frontend.pem --key {certs}/frontend-key.pem \\
       -H "authorization: Bearer {token}" https://localhost:{orders}/orders/42
From inside a workload, through its sidecar's outbound mTLS (orders -> payments):
  docker compose exec orders python -c 'import urllib.request as u; \\
print(u.urlopen(u.Request("http://127.0.0.1:{OUTBOUND_PORT}/payments/charge", data=b"", \\
headers={{"host": "payments.{NAMESPACE}"}})).read().decode())'
Decisions: docker compose logs -f {EXTAUTHZ_SERVICE}      Traces: http://127.0.0.1:{jaeger}/
"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m extauthz.devtools.compose", description=__doc__)
    ap.add_argument("outdir", type=Path, nargs="?", default=DEFAULT_OUTDIR)
    ap.add_argument(
        "--compose-file", type=Path, default=COMPOSE_FILE, help="checked against the output"
    )
    args = ap.parse_args(argv)
    gen = generate(args.outdir)
    raw = yaml.safe_load(args.compose_file.read_text())
    # What `docker compose` would see with these files: refuse to hand over a broken mesh.
    project = interpolate(raw, {DIR_VARIABLE: str(args.outdir.absolute())})
    dockerfile = (REPO / "Dockerfile").read_text()
    if found := problems(project, project_dir=REPO, dockerfile=dockerfile):
        print(f"{args.compose_file} does not fit the generated files:", file=sys.stderr)
        for problem in found:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(instructions(gen, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
