"""The gRPC runtime's floor: a grpc.aio server whose Check answers constant bytes.

No decode, no decision, no telemetry: what remains of a Check's server CPU is grpc.aio's own
(its C core, the asyncio loop, the Python layer between them). ``loadtest.micro --grpc``
runs it beside ``extauthz serve`` to show the runtime's share.

    python -m loadtest.bare_grpc PORT [--uvloop]
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

SERVICE = "envoy.service.auth.v3.Authorization"
ALLOW = external_auth_pb2.CheckResponse(
    ok_response=external_auth_pb2.OkHttpResponse()
).SerializeToString()


async def _check(request: bytes, context: Any) -> bytes:
    return ALLOW


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_check)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),)
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        uvloop.install()
    asyncio.run(serve(int(sys.argv[1])))
