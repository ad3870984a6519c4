"""Cross-session batching on an in-process ShardServer: steps of different sessions that wait together run as
one batch, whatever they are (decode, prefill, left-padded with an attention mask, batch 1 or 2), and each
session gets exactly what it gets alone and what transformers computes; 16 concurrent greedy sessions equal
sequential runs and transformers' own `generate`.

Batches are counted through the scheduler's on_batch hook, and made deterministic by holding the worker while
the steps queue (`run_queued_together`), never by sleeping. Tolerance: a batched step differs from the same
step alone only through GEMM row blocking (measured <= 3e-7 in fp32); we assert atol 1e-5 and equal tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from transformers import LlamaForCausalLM

from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.pb import shard_pb2_grpc
from tests.reference import pre_norm_hidden
from tests.servers import StepStream, batch_log, run_queued_together, serve

HIDDEN = 64
MAX_LENGTH = 32
SESSIONS_IN_BUDGET = 10  # the cache budget holds this many MAX_LENGTH sessions; 16 concurrent ones must queue
EXACT = dict(atol=1e-5, rtol=0)


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama),
        blocks=BlockRange(0, 4),
        model_id="tiny",
        inference_max_length=MAX_LENGTH,
        cache_tokens=SESSIONS_IN_BUDGET * MAX_LENGTH,
        max_batch_size=256,
        alloc_timeout_s=60.0,
        max_sessions=64,
        throughput_tps=100.0,  # skip the measurement; batching "auto" is then on
    )
    async for srv in serve(config):
        yield srv


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


async def generate(stub: shard_pb2_grpc.ShardStub, model: LlamaForCausalLM, prompt: torch.Tensor, new: int) -> Any:
    """Greedy generation through the server: local embeddings, remote blocks, local norm + head."""
    session = StepStream(stub)
    await session.open(MAX_LENGTH)
    tokens, outputs = [], []
    # no `with torch.no_grad()` around the awaits: grad mode is per thread, and interleaved coroutines leaving
    # it in another order than they entered would leave it off for the rest of the test session
    hidden = await session.step(model.model.embed_tokens(prompt).detach())
    for _ in range(new):
        with torch.no_grad():
            token = model.lm_head(model.model.norm(hidden[:, -1:])).argmax(-1)  # [1, 1]
            embedded = model.model.embed_tokens(token)
        tokens.append(int(token))
        hidden = await session.step(embedded)
        outputs.append(hidden)
    await session.close()
    return tokens, torch.cat(outputs, dim=1)


async def test_sixteen_concurrent_sessions_equal_sequential_runs_and_transformers(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer, model: LlamaForCausalLM
) -> None:
    prompts = [torch.randint(0, 128, (1, 3 + i % 5), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    sequential = [await generate(stub, model, p, 12) for p in prompts]
    for prompt, (tokens, _) in zip(prompts, sequential, strict=True):
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == expected[0, prompt.shape[1] :].tolist()

    budget, peak = server.cache.budget_bytes, [0, 0]

    async def watch() -> None:  # samples the budget figures while the sessions run (an observer, not a sync)
        while True:
            peak[0] = max(peak[0], server.cache.used_bytes)
            peak[1] = max(peak[1], server.cache.allocated_bytes())
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        with batch_log(server.scheduler) as log:
            concurrent = await asyncio.gather(*(generate(stub, model, p, 12) for p in prompts))
    finally:
        watcher.cancel()
    for (seq_tokens, seq_hidden), (tokens, hidden) in zip(sequential, concurrent, strict=True):
        assert tokens == seq_tokens
        torch.testing.assert_close(hidden, seq_hidden, **EXACT)
    assert 0 < peak[1] <= peak[0] <= budget  # 16 sessions, room for 10: some waited, none overflowed
    assert log.steps == 16 * 13 and len(log.batches) < log.steps, "steps were never batched"
    assert server.cache.active_sessions == 0 and server.cache.used_bytes == 0


async def test_decode_steps_waiting_together_run_as_one_batch(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 4, HIDDEN, generator=gen) for _ in range(6)]
    tokens = [torch.randn(1, 1, HIDDEN, generator=gen) for _ in range(6)]
    alone = []
    for p, t in zip(prompts, tokens, strict=True):
        s = StepStream(stub)
        await s.open(MAX_LENGTH)
        await s.step(p)
        alone.append(await s.step(t))
        await s.close()
    sessions = [StepStream(stub) for _ in prompts]
    for s, p in zip(sessions, prompts, strict=True):
        await s.open(MAX_LENGTH)
        await s.step(p)
    with batch_log(server.scheduler) as log:
        batched = await run_queued_together(server.scheduler, [s.step(t) for s, t in zip(sessions, tokens)])
    assert log.batches == [(6, 6)]  # one batch of all six
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(b, a, **EXACT)
    for s in sessions:
        await s.close()


def padded_inputs(i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Session i: 2 rows of embeddings [2, prompt + 2, hidden], row 0 left-padded by i + 1; (hidden, mask, prompt)."""
    prompt = 5 + i
    gen = torch.Generator().manual_seed(10 + i)
    hidden = torch.randn(2, prompt + 2, HIDDEN, generator=gen)
    mask = torch.ones(2, prompt + 2, dtype=torch.bool)
    mask[0, : i + 1] = False
    return hidden, mask, prompt


async def test_padded_steps_and_prefills_batch_across_sessions_exactly(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer, model: LlamaForCausalLM
) -> None:
    """Four left-padded batch-2 sessions (different lengths and padding) and one plain session: their prefills
    run as one batch, then a batch mixes one prefill with four masked decode steps, then five decode steps.
    Each output equals the same session run alone, and transformers on the real (unpadded) tokens."""
    inputs = [padded_inputs(i) for i in range(4)]
    plain = torch.randn(1, 7, HIDDEN, generator=torch.Generator().manual_seed(20))  # prefill 6, then 1 decode

    async def run_alone(i: int) -> list[torch.Tensor]:
        hidden, mask, prompt = inputs[i]
        s = StepStream(stub)
        await s.open(MAX_LENGTH, batch_size=2)
        out = [await s.step(hidden[:, :prompt], mask[:, :prompt])]
        for t in (prompt, prompt + 1):
            out.append(await s.step(hidden[:, t : t + 1], mask[:, : t + 1]))
        await s.close()
        return out

    alone = [await run_alone(i) for i in range(4)]

    padded = [StepStream(stub) for _ in inputs]
    for s in padded:
        await s.open(MAX_LENGTH, batch_size=2)
    other = StepStream(stub)
    await other.open(MAX_LENGTH)

    def decode(i: int) -> Any:  # the next single-token step of padded session i
        hidden, mask, _ = inputs[i]
        t = padded[i].position
        return padded[i].step(hidden[:, t : t + 1], mask[:, : t + 1])

    with batch_log(server.scheduler) as log:
        prefills = await run_queued_together(
            server.scheduler, [s.step(h[:, :p], m[:, :p]) for s, (h, m, p) in zip(padded, inputs, strict=True)]
        )
        mixed = await run_queued_together(server.scheduler, [other.step(plain[:, :6]), *(decode(i) for i in range(4))])
        last = await run_queued_together(server.scheduler, [other.step(plain[:, 6:]), *(decode(i) for i in range(4))])
    prompt_rows = sum(2 * p for _, _, p in inputs)
    assert log.batches == [(4, prompt_rows), (5, 6 + 4 * 2), (5, 1 + 4 * 2)]  # three batches, nothing alone

    for i, (hidden, mask, _) in enumerate(inputs):
        ours = [prefills[i], mixed[i + 1], last[i + 1]]
        for got, want in zip(ours, alone[i], strict=True):
            torch.testing.assert_close(got, want, **EXACT)
        expected = pre_norm_hidden(model, hidden, mask)  # [2, prompt + 2, hidden]
        real = mask.clone()  # padding rows produce meaningless outputs: compare real tokens only
        torch.testing.assert_close(torch.cat(ours, dim=1)[real], expected[real], **EXACT)
    expected_plain = pre_norm_hidden(model, plain, torch.ones(1, 7, dtype=torch.bool))
    torch.testing.assert_close(torch.cat([mixed[0], last[0]], dim=1), expected_plain, **EXACT)
    for s in [*padded, other]:
        await s.close()


async def test_batches_stay_within_max_batch_tokens(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    """Five prefills of 60 rows wait together: the 256-row limit splits them 4 + 1, in arrival order."""
    sessions = [StepStream(stub) for _ in range(5)]
    for s in sessions:
        await s.open(MAX_LENGTH, batch_size=2)
    prompts = [torch.randn(2, 30, HIDDEN, generator=torch.Generator().manual_seed(30 + i)) for i in range(5)]
    with batch_log(server.scheduler) as log:
        await run_queued_together(server.scheduler, [s.step(p) for s, p in zip(sessions, prompts, strict=True)])
    assert log.batches == [(4, 240), (1, 60)]
    for s in sessions:
        await s.close()
