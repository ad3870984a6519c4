"""In-process shard servers for integration tests, and the tools to observe them without sleeping: wait for a
condition, record the batches the worker runs, hold the worker while requests queue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import torch

from shard_server import ShardServer, ShardServerConfig
from shard_server.scheduler import Scheduler
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto

START_STOP_TIMEOUT_S = 30
WAIT_TIMEOUT_S = 60.0  # generous: conditions usually hold within milliseconds, but the CI machine is busy
T = TypeVar("T")


async def serve(config: ShardServerConfig) -> AsyncIterator[ShardServer]:
    """Start an in-process server, yield it, stop it (for module fixtures: `async for s in serve(cfg): yield s`)."""
    srv = ShardServer(config)
    await asyncio.wait_for(srv.start(), START_STOP_TIMEOUT_S)
    try:
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), START_STOP_TIMEOUT_S)


running = contextlib.asynccontextmanager(serve)  # `async with running(cfg) as server:` inside one test


async def wait_until(condition: Callable[[], bool], what: str = "condition", timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` on the event loop until it holds; fail after `timeout_s` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class BatchLog:
    """The inference batches a scheduler ran, as (steps, rows), recorded through its on_batch hook."""

    batches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s for s, _ in self.batches)

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.batches)


@contextlib.contextmanager
def batch_log(scheduler: Scheduler) -> Iterator[BatchLog]:
    """Record every batch the worker runs inside the block (the hook already set, e.g. metrics, still runs)."""
    log = BatchLog()
    before = scheduler.on_batch

    def hook(steps: int, rows: int, seconds: float) -> None:
        log.batches.append((steps, rows))  # list.append is atomic: the worker thread calls this
        if before is not None:
            before(steps, rows, seconds)

    scheduler.on_batch = hook
    try:
        yield log
    finally:
        scheduler.on_batch = before


async def run_queued_together(scheduler: Scheduler, steps: Sequence[Awaitable[T]]) -> list[T]:
    """Hold the worker, start `steps` (coroutines that each send one inference step) until all of them wait in
    the queue, then release the worker: the scheduler sees them all at once, as under load."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(WAIT_TIMEOUT_S)

    blocker = asyncio.create_task(scheduler.run(hold))
    tasks: list[asyncio.Task[T]] = []
    try:
        await wait_until(entered.is_set, "the worker to hold")
        tasks = [asyncio.ensure_future(s) for s in steps]
        await wait_until(lambda: scheduler.queued >= len(tasks), f"{len(tasks)} steps to queue")
    finally:
        gate.set()
    await blocker
    return list(await asyncio.gather(*tasks))


class StepStream:
    """One InferenceStep stream (= one session on the server), driven by hand: open, steps, close."""

    def __init__(self, stub: shard_pb2_grpc.ShardStub, model_id: str = "tiny") -> None:
        self.call = stub.InferenceStep()
        self.model_id = model_id
        self.position = 0  # where the next step writes unless told otherwise

    async def open(self, max_length: int, batch_size: int = 1, end: int = 4) -> shard_pb2.InferenceResponse:
        blocks = common_pb2.BlockRange(start=0, end=end)
        msg = shard_pb2.InferenceOpen(
            model_id=self.model_id,
            blocks=blocks,
            max_length=max_length,
            session_id=uuid.uuid4().hex,
            batch_size=batch_size,
        )
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        return await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Send `hidden` [batch, tokens, hidden] at `self.position` (with a padding mask over all slots so far)."""
        msg = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=self.position, hidden=to_proto(hidden))
        if mask is not None:
            msg.attention_mask.CopyFrom(to_proto(mask.long()))
        await self.call.write(shard_pb2.InferenceRequest(step=msg))
        response = await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)
        self.position += hidden.shape[1]
        return from_proto(response.step.hidden)

    async def close(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.code(), WAIT_TIMEOUT_S) == grpc.StatusCode.OK
