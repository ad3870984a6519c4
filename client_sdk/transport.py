"""gRPC plumbing of the client: one channel and one Shard stub per server address, reused for every
session and call (creating stubs or channels per token would cost more than the hop itself).

Only this module and session.py touch `shard_pb2`; everything else sees domain types.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from swarm.errors import PollenError, from_rpc_error
from swarm.pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # a long prefill of a big model is tens of MiB; the gRPC default is 4 MiB


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Talk to the announced address itself, never through an http_proxy from the environment.
        ("grpc.enable_http_proxy", 0),
    ]


class ChannelPool:
    """Channels by address. Must be used from one event loop (grpc.aio channels are bound to theirs)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}

    def shard(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
            stub = self._stubs[address] = shard_pb2_grpc.ShardStub(channel)
        return stub

    async def info(self, address: str, timeout_s: float) -> shard_pb2.InfoResponse:
        """The server's own view of itself (Info RPC); errors come back as PollenError."""
        try:
            return await self.shard(address).Info(shard_pb2.InfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, address) from e

    async def discard(self, address: str) -> None:
        """Drop a channel to a server that went away, so a later reconnect starts clean."""
        self._stubs.pop(address, None)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._channels)


def rpc_error(err: grpc.RpcError, address: str) -> PollenError:
    """A gRPC error from `address` as the matching PollenError (see swarm/errors.py)."""
    exc = from_rpc_error(err, address)
    log.debug("rpc to %s failed: %s", address, exc)
    return exc
