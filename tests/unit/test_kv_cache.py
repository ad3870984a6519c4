"""Preallocated KV caches (shard_server/kv_cache.py) and the server's KV memory manager (shard_server/cache.py):
exact outputs against transformers' DynamicCache, exact byte accounting, waiting opens, timeouts, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from shard_server.backend import BlockBackend
from shard_server.cache import SessionCache
from shard_server.kv_cache import CacheOverflow, cache_nbytes, kv_bytes_per_token_estimate
from shard_server.loader import inspect_model, load_span
from swarm.blocks import BlockRange
from swarm.errors import CacheExhausted, ServerDraining

ALL = BlockRange(0, 4)


@pytest.fixture(scope="module")
def backend(tiny_llama: Path) -> BlockBackend:
    info = inspect_model(str(tiny_llama), ALL)
    span = load_span(info, ALL, torch.device("cpu"), torch.float32, progress=False)
    return BlockBackend(info, span, torch.device("cpu"), torch.float32)


def test_preallocated_cache_equals_dynamic_cache_with_rollback_and_beams(backend: BlockBackend) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt, steps = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 4, 64, generator=gen)
    dynamic, fixed = backend.new_cache(ALL), backend.new_cache(ALL, max_length=16)
    for cache in (dynamic, fixed):
        backend.inference_step(ALL, cache, 0, prompt)
    beams = torch.tensor([1, 1])
    for pos in range(5, 9):
        hypo = beams if pos == 7 else None
        want = backend.inference_step(ALL, dynamic, pos, steps[:, pos - 5 : pos - 4], hypo_ids=hypo)
        got = backend.inference_step(ALL, fixed, pos, steps[:, pos - 5 : pos - 4], hypo_ids=hypo)
        assert torch.equal(got, want)
    # roll back two tokens and redo them: same numbers as the first time
    redo = backend.inference_step(ALL, fixed, 7, steps[:, 2:4])
    assert torch.equal(redo, backend.inference_step(ALL, dynamic, 7, steps[:, 2:4]))
    assert fixed.get_seq_length() == 9


def test_cache_bytes_are_exactly_the_reservation(backend: BlockBackend) -> None:
    per_token_block = backend.measure_kv_bytes_per_token()
    cfg = backend.info.config
    assert per_token_block == kv_bytes_per_token_estimate(cfg, 4) == 2 * 2 * 16 * 4  # k+v, 2 kv heads, dim 16, fp32
    cache = backend.new_cache(ALL, max_length=10)
    backend.inference_step(ALL, cache, 0, torch.randn(3, 2, 64))
    assert cache_nbytes(cache) == 10 * 3 * per_token_block * len(ALL)  # allocated once, for max_length x batch
    with pytest.raises(CacheOverflow):
        backend.inference_step(ALL, cache, 2, torch.randn(3, 9, 64))


async def test_open_waits_for_room_then_fails_with_sizes() -> None:
    cache = SessionCache(budget_bytes=1000, token_bytes_per_block=1, held_blocks=10, alloc_timeout_s=0.2)
    assert cache.budget_tokens == 100
    first = await cache.open("a", BlockRange(0, 10), 60, 1)
    with pytest.raises(CacheExhausted) as err:
        await cache.open("b", BlockRange(0, 10), 60, 1)
    assert "asks for 60 cache tokens" in str(err.value) and "only 40 of 100 are free" in str(err.value)
    assert "after waiting 0.2 s" in str(err.value)
    # a waiting open is granted as soon as room appears
    waiting = asyncio.create_task(cache.open("c", BlockRange(0, 10), 60, 1, timeout_s=5))
    await asyncio.sleep(0.05)
    assert cache.waiting == 1
    cache.release(first)
    second = await asyncio.wait_for(waiting, 1)
    assert cache.used_bytes == 600 and cache.waiting == 0
    # a prefix session reserves only its own layers
    prefix = await cache.open("d", BlockRange(0, 5), 80, 1)
    assert prefix.reserved_bytes == 400 and cache.tokens_left == 0
    with pytest.raises(CacheExhausted, match="can never fit"):
        await cache.open("e", BlockRange(0, 10), 101, 1)
    cache.release(second)
    cache.release(prefix)
    assert cache.used_bytes == 0 and cache.tokens_left == 100


async def test_session_limit_fifo_cancel_and_draining() -> None:
    cache = SessionCache(budget_bytes=10**6, max_sessions=2, alloc_timeout_s=5)
    a = await cache.open("a", ALL, 4, 1)
    await cache.open("b", ALL, 4, 1)
    third = asyncio.create_task(cache.open("c", ALL, 4, 1))
    fourth = asyncio.create_task(cache.open("d", ALL, 4, 1))
    await asyncio.sleep(0.05)
    assert cache.waiting == 2
    third.cancel()  # a client that gives up does not keep a place in the queue
    await asyncio.gather(third, return_exceptions=True)
    cache.release(a)
    d = await asyncio.wait_for(fourth, 1)
    assert cache.active_sessions == 2 and d.session_id == "d"
    late = asyncio.create_task(cache.open("e", ALL, 4, 1))
    await asyncio.sleep(0.05)
    cache.start_draining()  # waiting opens fail at once with UNAVAILABLE
    with pytest.raises(ServerDraining):
        await late
    with pytest.raises(ServerDraining):
        await cache.open("f", ALL, 4, 1)


async def test_idle_sessions_are_closed() -> None:
    cache = SessionCache(budget_bytes=10**6)
    session = await cache.open("idle", ALL, 4, 1)

    async def stream() -> None:
        await asyncio.sleep(60)

    session.task = asyncio.create_task(stream())
    assert cache.close_idle(timeout_s=10) == 0
    assert cache.close_idle(timeout_s=10, now=session.last_active + 11) == 1
    with pytest.raises(asyncio.CancelledError):
        await session.task
    assert "idle for more than 10 s" in session.closed_reason
