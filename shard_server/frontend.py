"""The gRPC front of a shard server: the Shard service, the standard health service (NOT_SERVING while loading,
moving or draining) and server reflection (so grpcurl can list and describe it), on one port.

Built by swarm.net like every Pollen server: with a swarm key every call but health checks needs a proof of it
(UNAUTHENTICATED otherwise), with TLS certificates it serves TLS, and each IP gets a call rate and a cap of
unary calls in flight (RESOURCE_EXHAUSTED beyond). Messages over `max_receive_bytes` are refused by gRPC from
their length prefix, before their body is read."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shard_server.startup import ConfigError
from swarm.access import CallLimits
from swarm.handlers import add_servicer
from swarm.net import PLAINTEXT, Security, bind_server, create_server, format_address
from swarm.pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

SHARD_SERVICE = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name  # "pollen.v1.Shard"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
STOP_GRACE_S = 0.5  # streams still open after the drain are cancelled after this


class GrpcFront:
    def __init__(
        self,
        servicer: shard_pb2_grpc.ShardServicer,
        host: str,
        port: int,
        max_message_bytes: int,
        *,
        security: Security = PLAINTEXT,
        limits: CallLimits | None = None,
        max_receive_bytes: int | None = None,
    ) -> None:
        self._health = health.aio.HealthServicer()
        self._server = create_server(
            max_message_bytes, security=security, limits=limits, max_receive_bytes=max_receive_bytes
        )
        # not the generated add_ShardServicer_to_server: undecodable requests get INVALID_ARGUMENT (swarm.handlers)
        add_servicer(self._server, servicer, shard_pb2.DESCRIPTOR.services_by_name["Shard"])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SHARD_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        bind = format_address(host, port)
        try:
            self.port = bind_server(self._server, bind, security)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {bind}: {e}") from None

    @property
    def server(self) -> grpc.aio.Server:
        """The gRPC server, for services added before `start` (the Relay service with --relay)."""
        return self._server

    async def start(self) -> None:
        await self.set_serving(False)  # loading
        await self._server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SHARD_SERVICE):
            await self._health.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        await self._server.stop(grace=STOP_GRACE_S)
