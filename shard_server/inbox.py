"""StepInbox: the steps of one inference session, in arrival order, from its two possible sources: the client's
own stream, and the previous server of the chain (the `Push` RPC puts them here). A step may arrive both ways
(the client re-sends a step whose push failed); it runs once, later copies of its step_id are dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import grpc

from swarm.errors import InvalidRequest
from swarm.pb import shard_pb2

_EOF = object()


class StepInbox:
    def __init__(self, context: grpc.aio.ServicerContext, session_id: str) -> None:
        self.session_id = session_id
        self.write_lock = asyncio.Lock()  # replies and push_failed notices share the client's stream
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._seen: deque[str] = deque(maxlen=8)
        self._reader = asyncio.create_task(self._read_client(context), name=f"read-{session_id[:8]}")

    def put(self, step: shard_pb2.InferenceStepInput) -> None:
        """A step pushed by the previous server."""
        self._queue.put_nowait(step)

    async def next(self) -> shard_pb2.InferenceStepInput | None:
        """The next new step; None once the client has closed its side of the stream."""
        while True:
            item = await self._queue.get()
            if item is _EOF:
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

    async def _read_client(self, context: grpc.aio.ServicerContext) -> None:
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                if request.WhichOneof("kind") != "step":
                    raise InvalidRequest(f"session {self.session_id}: the stream already has an open session")
                self._queue.put_nowait(request.step)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — handed to the session's handler, which raises it
            self._queue.put_nowait(e)
            return
        self._queue.put_nowait(_EOF)
