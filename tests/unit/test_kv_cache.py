"""The backend's one step routine over a session's KV handle (explicit positions, rollback by overwriting, beam
reorder, batch of several sessions) against transformers, and the server's KV memory manager
(shard_server/cache.py): exact byte accounting, waiting opens, timeouts, limits, idle sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from shard_server.backend import BlockBackend, KvHandle, StepItem
from shard_server.cache import SessionCache
from shard_server.loader import inspect_model, load_span
from swarm.blocks import BlockRange
from swarm.errors import CacheExhausted, ServerDraining
from swarm.models.base import CacheOverflow
from tests.reference import pre_norm_hidden

ALL = BlockRange(0, 4)
EXACT = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def backend(tiny_llama: Path) -> BlockBackend:
    info = inspect_model(str(tiny_llama), ALL)
    return BlockBackend(load_span(info, ALL, torch.device("cpu"), torch.float32), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


def test_steps_with_rollback_and_beams_equal_transformers(backend: BlockBackend, reference: LlamaForCausalLM) -> None:
    gen = torch.Generator().manual_seed(0)
    prompt, steps = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 4, 64, generator=gen)
    kv = KvHandle(ALL, batch=2, max_length=16)
    out = backend.step([StepItem(kv, 0, prompt)])[0]
    torch.testing.assert_close(out, pre_norm_hidden(reference, prompt), **EXACT)
    history = prompt  # what each row's cache holds: [2, length, hidden]
    for pos in range(5, 9):
        new = steps[:, pos - 5 : pos - 4]
        reorder = torch.tensor([1, 1]) if pos == 7 else None  # beam search: both rows continue row 1
        if reorder is not None:
            history = history[reorder]
        out = backend.step([StepItem(kv, pos, new, reorder=reorder)])[0]
        history = torch.cat([history, new], dim=1)
        torch.testing.assert_close(out, pre_norm_hidden(reference, history)[:, -1:], **EXACT)
    # roll back two tokens and write others there: the cache is overwritten from position 7, nothing is cropped
    other = torch.randn(2, 2, 64, generator=gen)
    out = backend.step([StepItem(kv, 7, other)])[0]
    history = torch.cat([history[:, :7], other], dim=1)
    torch.testing.assert_close(out, pre_norm_hidden(reference, history)[:, -2:], **EXACT)


def test_one_step_of_several_sessions_equals_each_alone(backend: BlockBackend) -> None:
    """Prefill, decode and a left-padded step of three sessions in one span.forward == each run alone."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randn(b, t, 64, generator=gen) for b, t in ((1, 3), (2, 4), (1, 6))]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False  # session 1, row 0: left-padded by two
    alone, together = [KvHandle(ALL, p.shape[0], 8) for p in prompts], [KvHandle(ALL, p.shape[0], 8) for p in prompts]
    for kvs in (alone, together):
        backend.step([StepItem(kvs[0], 0, prompts[0]), StepItem(kvs[1], 0, prompts[1], mask[:, :4])])

    def items(kvs: list[KvHandle]) -> list[StepItem]:  # the same three steps for both sets of caches
        return [
            StepItem(kvs[0], 3, prompts[0][:, :1]),  # decode
            StepItem(kvs[1], 4, prompts[1][:, :1], mask),  # padded decode
            StepItem(kvs[2], 0, prompts[2]),  # prefill
        ]

    expected = [backend.step([item])[0] for item in items(alone)]
    for got, want in zip(backend.step(items(together)), expected, strict=True):
        torch.testing.assert_close(got, want, **EXACT)


def test_cache_bytes_are_exactly_the_reservation(backend: BlockBackend) -> None:
    per_token_block = backend.kv_bytes_per_token()
    assert per_token_block == backend.span.family.kv_bytes_per_token(4) == 2 * 2 * 16 * 4  # k+v, 2 heads, dim 16
    kv = KvHandle(ALL, batch=3, max_length=10)
    assert kv.nbytes == 0  # nothing is allocated before the first step
    backend.step([StepItem(kv, 0, torch.randn(3, 2, 64))])
    assert kv.nbytes == 10 * 3 * per_token_block * len(ALL)  # allocated once, for max_length x batch
    with pytest.raises(CacheOverflow):
        backend.step([StepItem(kv, 2, torch.randn(3, 9, 64))])


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
