"""Server-to-server push, sending side: after a step, forward its output to the next server of the session's
chain (the `Push` RPC), so a token travels client -> A -> B -> client instead of client -> A -> client -> B ->
client. The receiving side is just the next session's inbox (inbox.py): a pushed step queues there like a step
from the client.

Who may be pushed to is decided before this (next_hops.py: only servers the swarm's signed records place right
after the session). The push carries the token the client gave the next session at open (NextHop.push_token),
which is what lets that session accept it. Channels go through swarm.net (the swarm key and TLS of this
server) and are kept for at most MAX_PEERS addresses, least recently used first out.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import grpc

from swarm.net import PLAINTEXT, ChannelCache, Security
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 10.0
MAX_PEERS = 64  # open channels to next servers; a chain continues on a handful of them


class Pusher:
    def __init__(self, max_message_bytes: int, security: Security = PLAINTEXT, max_peers: int = MAX_PEERS) -> None:
        self._channels = ChannelCache(max_message_bytes, security)
        self._stubs: OrderedDict[str, shard_pb2_grpc.ShardStub] = OrderedDict()  # address -> stub, LRU order
        self.max_peers = max_peers

    async def push(self, step: shard_pb2.InferenceStepInput, output: common_pb2.Tensor) -> str | None:
        """Send `step` with this server's `output` as its hidden states to `step.next_servers[0]`.
        Returns None when the next server took it, else why not (for the client's `push_failed` notice)."""
        hop, rest = step.next_servers[0], step.next_servers[1:]
        pushed = shard_pb2.InferenceStepInput(
            step_id=step.step_id, position=step.position, hidden=output, next_servers=rest
        )
        if step.HasField("attention_mask"):
            pushed.attention_mask.CopyFrom(step.attention_mask)
        if step.HasField("hypo_ids"):
            pushed.hypo_ids.CopyFrom(step.hypo_ids)
        request = shard_pb2.PushRequest(session_id=hop.session_id, step=pushed, push_token=hop.push_token)
        try:
            stub = await self._stub(hop.address)
            await stub.Push(request, timeout=PUSH_TIMEOUT_S)
        except ValueError as e:  # a malformed address from the client
            return f"INVALID_ARGUMENT: {e}"
        except grpc.aio.AioRpcError as e:
            log.info("push of step %s to %s failed: %s", step.step_id, hop.address, e.code().name)
            return f"{e.code().name}: {e.details()}"
        return None

    async def _stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is not None:
            self._stubs.move_to_end(address)
            return stub
        stub = shard_pb2_grpc.ShardStub(self._channels.get(address))  # ValueError for a malformed address
        self._stubs[address] = stub
        while len(self._stubs) > self.max_peers:
            oldest, _ = self._stubs.popitem(last=False)
            await self._channels.discard(oldest)
        return stub

    @property
    def peers(self) -> list[str]:
        """Addresses with a channel open now (at most max_peers), least recently used first."""
        return list(self._stubs)

    async def close(self) -> None:
        self._stubs.clear()
        await self._channels.close()
