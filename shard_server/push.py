"""Server-to-server push, sending side: after a step, forward its output to the next server of the session's
chain (the `Push` RPC), so a token travels client -> A -> B -> client instead of client -> A -> client -> B ->
client. The receiving side is just the next session's inbox (inbox.py): a pushed step queues there like a step
from the client.
"""

from __future__ import annotations

import logging

import grpc

from swarm.net import ChannelCache
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 10.0


class Pusher:
    def __init__(self, max_message_bytes: int) -> None:
        self._channels = ChannelCache(max_message_bytes)

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
        try:
            stub = shard_pb2_grpc.ShardStub(self._channels.get(hop.address))
            await stub.Push(shard_pb2.PushRequest(session_id=hop.session_id, step=pushed), timeout=PUSH_TIMEOUT_S)
        except ValueError as e:  # a malformed address from the client
            return f"INVALID_ARGUMENT: {e}"
        except grpc.aio.AioRpcError as e:
            log.info("push of step %s to %s failed: %s", step.step_id, hop.address, e.code().name)
            return f"{e.code().name}: {e.details()}"
        return None

    async def close(self) -> None:
        await self._channels.close()
