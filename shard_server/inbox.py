"""StepInbox: the steps of one inference session, in arrival order, from its two possible sources: the client's
own stream, and the previous server of the chain (the `Push` RPC puts them here). A step may arrive both ways
(the client re-sends a step whose push failed); it runs once, later copies of its step_id are dropped.

Only a push carrying the session's `push_token` (chosen by the client at open and handed to the previous
server in NextHop) is accepted: a session id alone, which shows up in logs, is not enough to inject steps.

The inbox is bounded in bytes (serialized size of the queued steps): a push that does not fit is refused with
Overloaded (the pushing server then tells the client, who sends the step itself), and the client's stream is
not read further while the inbox is full (gRPC's flow control then holds the client back). One step is always
let in when the inbox is empty, so a prefill larger than the bound (but within the message limit) still runs.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import deque
from typing import Any

import grpc

from swarm.errors import InvalidRequest, Overloaded
from swarm.pb import shard_pb2

_EOF = object()


class StepInbox:
    def __init__(
        self, context: grpc.aio.ServicerContext, session_id: str, push_token: bytes = b"", max_bytes: int = 1 << 24
    ) -> None:
        self.session_id = session_id
        self.push_token = push_token
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.write_lock = asyncio.Lock()  # replies and push_failed notices share the client's stream
        self._items: deque[tuple[Any, int]] = deque()  # (step | exception | _EOF, its bytes)
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._seen: deque[str] = deque(maxlen=8)
        self._reader = asyncio.create_task(self._read_client(context), name=f"read-{session_id[:8]}")

    def accepts(self, push_token: bytes) -> bool:
        """Whether a push with this token belongs here (constant time; never without a token)."""
        return bool(self.push_token) and hmac.compare_digest(self.push_token, push_token)

    def put(self, step: shard_pb2.InferenceStepInput) -> None:
        """A step pushed by the previous server; Overloaded when it does not fit the inbox's byte bound."""
        size = step.ByteSize()
        if self.queued_bytes and self.queued_bytes + size > self.max_bytes:
            raise Overloaded(
                f"session {self.session_id}: {self.queued_bytes} bytes of steps are waiting (limit "
                f"{self.max_bytes}); the client sends this step itself"
            )
        self._add(step, size)

    async def next(self) -> shard_pb2.InferenceStepInput | None:
        """The next new step; None once the client has closed its side of the stream."""
        while True:
            while not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            item, size = self._items.popleft()
            self.queued_bytes -= size
            if self.queued_bytes < self.max_bytes:
                self._room.set()
            if item is _EOF:
                self._items.appendleft((_EOF, 0))  # stays the answer for any later call
                return None
            if isinstance(item, BaseException):
                raise item
            if item.step_id:
                if item.step_id in self._seen:
                    continue  # arrived twice (pushed and re-sent by the client)
                self._seen.append(item.step_id)
            return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self._reader.cancel()

    def _add(self, item: Any, size: int) -> None:
        self._items.append((item, size))
        self.queued_bytes += size
        self._arrived.set()

    async def _read_client(self, context: grpc.aio.ServicerContext) -> None:
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                if request.WhichOneof("kind") != "step":
                    raise InvalidRequest(f"session {self.session_id}: the stream already has an open session")
                self._add(request.step, request.ByteSize())
                del request  # the step (and its bytes) stays alive only in the inbox
                while self.queued_bytes >= self.max_bytes:  # full: stop reading until a step is taken out
                    self._room.clear()
                    await self._room.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — handed to the session's handler, which raises it
            self._add(e, 0)
            return
        self._add(_EOF, 0)
