"""``python -m extauthz.healthcheck HOST:PORT``: exit 0 if extauthz reports SERVING.

For container health checks (the image's HEALTHCHECK), where no grpc_health_probe binary is
installed. Asks ``grpc.health.v1.Health/Check`` over plaintext gRPC, like Kubernetes' native
probe does. Imports only grpc and the health protos: it runs every few seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# extauthz.server.AUTHORIZATION_SERVICE, spelt out so a probe does not import the server.
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m extauthz.healthcheck", description=__doc__)
    ap.add_argument("target", help="HOST:PORT or unix:/path, as given to `serve --listen`")
    ap.add_argument(
        "--service",
        default=AUTHORIZATION_SERVICE,
        help="health service name (default: %(default)s; '' for the server as a whole)",
    )
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds (default: %(default)s)")
    return ap


def check(target: str, service: str, timeout: float) -> str:
    """The status name extauthz reports for ``service``, or why it could not be asked."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"unreachable ({code.name if code else exc})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    if status == "SERVING":
        return 0
    print(f"extauthz at {args.target} ({args.service or 'server'}): {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
