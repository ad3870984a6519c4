"""The scheduler's worker thread uses the torch thread count set in the event loop's thread (--num-threads).

torch.set_num_threads binds only the calling thread (OpenMP's and MKL's settings are per thread): a worker
started without its own call runs every op on one OpenMP thread per core, and those spin between steps. The
check is on CPU time, not wall clock: with one thread, the process's CPU during the worker's matmuls is the
worker thread's own CPU (the event loop idles meanwhile).
"""

from __future__ import annotations

import time

import pytest
import torch

from shard_server.scheduler import Scheduler


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
