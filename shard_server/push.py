"""Server-to-server push (the `Push` RPC): a server forwards its output to the next server of a session's
chain, so a token needs client -> A -> B -> client instead of client -> A -> client -> B -> client.

`PushHub` owns the sessions that may receive pushes (by the session_id their client opened) and merges, per
session, the steps arriving on the client's stream with the steps pushed by the previous server
(`requests`). A step is processed once even if it arrives both ways (the client re-sends a step itself when
a push failed, and a late push of the same step is ignored by step_id). `push_after` sends one step's
output on; when that fails it tells the client with `push_failed`, so the client never waits on a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc

from swarm.errors import InvalidRequest, SessionNotFound
from swarm.pb import shard_pb2, shard_pb2_grpc

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 10.0
_EOF = object()


class _Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.write_lock = asyncio.Lock()  # replies and push_failed notices share the client's stream


class PushHub:
    def __init__(self, max_message_bytes: int) -> None:
        self._inboxes: dict[str, _Inbox] = {}
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_http_proxy", 0),
        ]
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    # ---- receiving side ---------------------------------------------------------------------------------

    async def requests(self, context: grpc.aio.ServicerContext, session_id: str) -> AsyncIterator[Any]:
        """The session's step requests, from the client's stream and from pushes, each step_id once."""
        inbox = self._inboxes[session_id] = _Inbox()  # a reopened session (same id) takes over pushes

        async def read_client() -> None:
            try:
                while (request := await context.read()) is not grpc.aio.EOF:
                    inbox.queue.put_nowait(request)
            except BaseException as e:  # noqa: BLE001 — handed to the handler, which re-raises it
                inbox.queue.put_nowait(e)
                return
            inbox.queue.put_nowait(_EOF)

        reader = asyncio.create_task(read_client(), name=f"read-{session_id[:8]}")
        seen: deque[str] = deque(maxlen=8)
        try:
            while (item := await inbox.queue.get()) is not _EOF:
                if isinstance(item, BaseException):
                    raise item
                if item.WhichOneof("kind") == "step":
                    if item.step.step_id and item.step.step_id in seen:
                        continue  # arrived twice (pushed and re-sent by the client)
                    seen.append(item.step.step_id)
                yield item
        finally:
            reader.cancel()
            if self._inboxes.get(session_id) is inbox:
                del self._inboxes[session_id]

    def write_lock(self, session_id: str) -> asyncio.Lock:
        inbox = self._inboxes.get(session_id)
        return inbox.write_lock if inbox is not None else asyncio.Lock()

    def accept(self, request: shard_pb2.PushRequest) -> shard_pb2.PushResponse:
        """Handler of the Push RPC: queue the step for its session."""
        inbox = self._inboxes.get(request.session_id)
        if inbox is None:
            raise SessionNotFound(f"no open session {request.session_id!r} on this server to push to")
        if not request.HasField("step"):
            raise InvalidRequest("push without a step")
        inbox.queue.put_nowait(shard_pb2.InferenceRequest(step=request.step))
        return shard_pb2.PushResponse()

    # ---- sending side -----------------------------------------------------------------------------------

    async def push_after(
        self,
        context: grpc.aio.ServicerContext,
        session_id: str,
        step: shard_pb2.InferenceStepInput,
        output: Any,  # common_pb2.Tensor: this server's output = the next server's input
    ) -> None:
        """Send the step on to `step.next_servers[0]`; on failure notify the client on its stream."""
        hop, rest = step.next_servers[0], step.next_servers[1:]
        pushed = shard_pb2.InferenceStepInput(
            step_id=step.step_id, position=step.position, hidden=output, next_servers=rest
        )
        if step.HasField("attention_mask"):
            pushed.attention_mask.CopyFrom(step.attention_mask)
        if step.HasField("hypo_ids"):
            pushed.hypo_ids.CopyFrom(step.hypo_ids)
        try:
            await self._stub(hop.address).Push(
                shard_pb2.PushRequest(session_id=hop.session_id, step=pushed), timeout=PUSH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            log.info("push of step %s to %s failed: %s", step.step_id, hop.address, e.code().name)
            notice = shard_pb2.PushFailed(step_id=step.step_id, error=f"{e.code().name}: {e.details()}")
            async with self.write_lock(session_id):
                await context.write(shard_pb2.InferenceResponse(push_failed=notice))

    def _stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels.append(channel)
            stub = self._stubs[address] = shard_pb2_grpc.ShardStub(channel)
        return stub

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._stubs.clear()
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
