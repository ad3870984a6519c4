"""The scheduler's worker and its shortcut for a lone session's step.

The worker thread uses the torch thread count set in the event loop's thread (--num-threads): torch's setting is
per thread (OpenMP's and MKL's), so a worker started without its own call runs every op on one OpenMP thread per
core, and those spin between steps. The check is on CPU time, not wall clock: with one thread, the process's CPU
during the worker's matmuls is the worker thread's own CPU (the event loop idles meanwhile).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from shard_server.backend import KvHandle, StepItem
from shard_server.scheduler import INLINE_MAX_ROWS, Scheduler
from swarm.blocks import BlockRange


def _matmuls() -> tuple[int, float, float]:
    """On the worker: (torch's thread count here, this thread's CPU s, the whole process's CPU s) over matmuls
    big enough to be split across OpenMP threads."""
    a = torch.randn(384, 384)
    thread0, process0 = time.thread_time(), time.process_time()
    for _ in range(60):
        a = torch.tanh(a @ a)  # [384, 384]; tanh keeps the values finite
    return torch.get_num_threads(), time.thread_time() - thread0, time.process_time() - process0


@pytest.mark.asyncio
async def test_worker_follows_the_event_loop_thread_count() -> None:
    before = torch.get_num_threads()
    scheduler = Scheduler(max_batch_tokens=64)  # created before the count is set, as the server does
    try:
        torch.set_num_threads(1)
        threads, own_cpu, process_cpu = await scheduler.run(_matmuls)
        assert threads == 1
        # A second OpenMP thread would add about as much CPU again as the worker's own.
        assert process_cpu < 1.3 * own_cpu + 0.02, (own_cpu, process_cpu)
        if before > 1:  # and a later change reaches the worker too
            torch.set_num_threads(2)
            threads, _, _ = await scheduler.run(_matmuls)
            assert threads == 2
    finally:
        torch.set_num_threads(before)
        scheduler.close()
        assert await scheduler.join(10.0)


class _Backend:
    """Stands in for BlockBackend: records the thread each step ran on; output = input + 1."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def step(self, items: list[StepItem]) -> list[torch.Tensor]:
        self.threads.append(threading.current_thread().name)
        return [item.hidden + 1 for item in items]


def _item(tokens: int) -> StepItem:
    return StepItem(KvHandle(BlockRange(0, 1), 1, 64), 0, torch.zeros(1, tokens, 4))


@pytest.mark.asyncio
async def test_run_now_runs_a_small_step_here_only_when_the_worker_is_free() -> None:
    scheduler = Scheduler(max_batch_tokens=64)
    backend: Any = _Backend()
    batches: list[tuple[int, int]] = []
    scheduler.on_batch = lambda steps, rows, seconds: batches.append((steps, rows))
    try:
        out = scheduler.run_now(backend, _item(1))
        assert out is not None and torch.equal(out, torch.ones(1, 1, 4))
        assert backend.threads == [threading.current_thread().name] and batches == [(1, 1)]
        assert scheduler.run_now(backend, _item(INLINE_MAX_ROWS + 1)) is None  # a long prefill: the worker's

        entered, gate = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            gate.wait(30)

        blocker = asyncio.ensure_future(scheduler.run(hold))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        assert scheduler.run_now(backend, _item(1)) is None  # the worker is busy: queue instead
        pending = scheduler.submit(backend, _item(1))
        assert scheduler.run_now(backend, _item(1)) is None  # and never overtakes a queued step
        gate.set()
        await blocker
        assert torch.equal(await pending.result(), torch.ones(1, 1, 4))
        assert backend.threads[-1] == "shard-torch"
    finally:
        scheduler.close()
        assert await scheduler.join(10.0)
