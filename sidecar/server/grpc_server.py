"""The gRPC server: our services, standard health checking and reflection, graceful stop."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 1024 * 1024


async def start(
    handlers: Sequence[grpc.GenericRpcHandler],
    service_names: Sequence[str],
    listen: str,
    *,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Bind ``listen`` (port 0 picks a free one), start, and report SERVING.

    ``reuse_port`` lets several worker processes share the port (SO_REUSEPORT: the kernel
    spreads connections over them). Off by default, so a port already taken is an error.

    Returns the server, the bound port and the health servicer (to report NOT_SERVING on stop).
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    server.add_generic_rpc_handlers(tuple(handlers))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # what grpcio raises now for a port it cannot bind (it returned 0)
        port = 0
    if port == 0:
        raise OSError("in use, or not an address of this host")  # the caller names it
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
