"""gRPC plumbing of the client: one channel and one Shard stub per server address, reused for every
session and call (creating stubs or channels per token would cost more than the hop itself).

Channels come from swarm.net (the project's one channel factory and option list). `call_once` is the one
place a stateless Forward/Backward travels (fine-tuning's remote calls and the verifier's checks both use it).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from swarm.errors import PollenError, StepTimeout, from_rpc_error
from swarm.net import DEFAULT_MAX_MESSAGE_BYTES, PLAINTEXT, ChannelCache, Security
from swarm.pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "ChannelPool", "rpc_error"]


class ChannelPool:
    """Shard stubs by address. Must be used from one event loop (grpc.aio channels are bound to theirs).
    `security`: the swarm key's per-call proofs and TLS of the client's private swarm (swarm.net)."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Security = PLAINTEXT) -> None:
        self.security = security
        self._channels = ChannelCache(max_message_bytes, security)
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}

    def shard(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = shard_pb2_grpc.ShardStub(self._channels.get(address))
        return stub

    async def info(self, address: str, timeout_s: float) -> shard_pb2.InfoResponse:
        """The server's own view of itself (Info RPC); errors come back as PollenError."""
        try:
            return await self.shard(address).Info(shard_pb2.InfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, address) from e

    async def call_once(
        self, address: str, request: shard_pb2.ForwardRequest | shard_pb2.BackwardRequest, timeout_s: float
    ) -> shard_pb2.ForwardResponse | shard_pb2.BackwardResponse:
        """One stateless Forward or Backward (by the request's type): the request, its one reply, within
        `timeout_s`. Raises StepTimeout, the call's PollenError, or a retryable PollenError when the server
        ends the stream without replying (its fault: another server may do better)."""
        stub = self.shard(address)
        forward = isinstance(request, shard_pb2.ForwardRequest)
        kind = "forward" if forward else "backward"
        call = stub.Forward() if forward else stub.Backward()
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        try:
            async with asyncio.timeout(timeout_s):
                await call.write(request)
                reply = await call.read()
                await call.done_writing()
        except TimeoutError:
            call.cancel()
            raise StepTimeout(f"{address} did not answer {kind} in {timeout_s} s") from None
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, address) from e
        if reply is grpc.aio.EOF:
            exc = PollenError(f"{address} ended the {kind} stream without a reply")
            exc.retryable = True
            raise exc
        return reply  # type: ignore[no-any-return]

    async def discard(self, address: str) -> None:
        """Drop a channel to a server that went away, so a later reconnect starts clean."""
        self._stubs.pop(address, None)
        await self._channels.discard(address)

    async def close(self) -> None:
        self._stubs.clear()
        await self._channels.close()

    def __len__(self) -> int:
        return len(self._channels)


def rpc_error(err: grpc.RpcError, address: str) -> PollenError:
    """A gRPC error from `address` as the matching PollenError (see swarm/errors.py)."""
    exc = from_rpc_error(err, address)
    log.debug("rpc to %s failed: %s", address, exc)
    return exc
