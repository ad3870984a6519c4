"""Fine-tuning on an in-process ShardServer through real grpc.aio stubs: Forward/Backward with deep prompts, client
LoRA and a held adapter return what the backend computes; sessions with different adapters (or none, or their own
LoRA) run batched together; every kind of bad tuning input gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for a
limit) with a clear message, and the server keeps serving a healthy session meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from shard_server import ShardServer, ShardServerConfig
from shard_server.tuning import RequestTuning
from swarm.blocks import BlockRange
from swarm.models.lora import LoraWeights
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.servers import run_queued_together, serve

TIMEOUT_S = 30
HIDDEN = 64
MAX_RANK = 8
MAX_BACKWARD = 64  # tokens
MODULES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "mlp.down_proj": (128, 64)}


def blocks(start: int, end: int) -> common_pb2.BlockRange:
    return common_pb2.BlockRange(start=start, end=end)


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter for the tiny Llama with random non-zero A and B on q_proj and v_proj."""
    path = tmp_path_factory.mktemp("adapter") / "ad1"
    torch.manual_seed(11)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(path)
    return path


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path, adapter: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama),
        blocks=BlockRange(0, 4),
        model_id="tiny",
        cache_tokens=400,
        inference_max_length=64,
        throughput_tps=100.0,
        adapters=(str(adapter), f"second={adapter}"),
        max_lora_rank=MAX_RANK,
        max_backward_tokens=MAX_BACKWARD,
    )
    async for srv in serve(config):
        yield srv


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lora_tensors(block: int, module: str, rank: int = 4, seed: int = 0, **over: Any) -> shard_pb2.LoraTensors:
    fan_in, fan_out = MODULES[module]
    a, b = over.pop("a", rand(rank, fan_in, seed=seed)), over.pop("b", rand(fan_out, rank, seed=seed + 1) * 0.1)
    return shard_pb2.LoraTensors(block=block, module=module, a=to_proto(a), b=to_proto(b), scaling=over.pop("s", 2.0))


def client_lora(start: int = 0, end: int = 4) -> list[shard_pb2.LoraTensors]:
    return [lora_tensors(b, m, seed=10 * b + i) for b in range(start, end) for i, m in enumerate(MODULES)]


def as_request_tuning(msg: shard_pb2.Tuning, server: ShardServer) -> RequestTuning:
    """What the backend gets for `msg` when called in-process (the expected values)."""
    assert server.servicer is not None
    adapter = server.servicer.limits.adapters.get(msg.adapter) if msg.adapter else None
    prompts = from_proto(msg.prompts) if msg.HasField("prompts") else None
    lora = [((e.block, e.module), LoraWeights(from_proto(e.a), from_proto(e.b), e.scaling)) for e in msg.lora]
    return RequestTuning(prompts, lora, adapter)


async def call(method: Any, request: Any) -> Any:
    stream = method()
    await stream.write(request)
    response = await asyncio.wait_for(stream.read(), TIMEOUT_S)
    await stream.done_writing()
    return response


async def expect_error(coro: Any, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(coro, TIMEOUT_S)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for word in words:
        assert word in details, details


# ---- Forward / Backward ----------------------------------------------------------------------------------------


async def test_forward_and_backward_with_tuning(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    backend = server.servicer.backend if server.servicer else None
    assert backend is not None
    hidden, grad = rand(2, 6, HIDDEN, seed=1), rand(2, 6, HIDDEN, seed=2)
    tuning = shard_pb2.Tuning(prompts=to_proto(rand(2, 1, 3, HIDDEN, seed=3)), lora=client_lora(1, 3), adapter="ad1")
    forward = shard_pb2.ForwardRequest(model_id="tiny", blocks=blocks(1, 3), hidden=to_proto(hidden), tuning=tuning)
    out = from_proto((await call(stub.Forward, forward)).hidden)
    expected = backend.forward(BlockRange(1, 3), hidden, None, as_request_tuning(tuning, server))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    plain = backend.forward(BlockRange(1, 3), hidden)
    assert (out - plain).abs().max() > 1e-2  # prompts, LoRA and the adapter all did something

    request = shard_pb2.BackwardRequest(
        model_id="tiny", blocks=blocks(1, 3), hidden=to_proto(hidden), grad_output=to_proto(grad), tuning=tuning
    )
    response = await call(stub.Backward, request)
    want = backend.backward(BlockRange(1, 3), hidden, grad, None, as_request_tuning(tuning, server))
    torch.testing.assert_close(from_proto(response.grad_input), want.grad_input, atol=0, rtol=0)
    assert want.grad_prompts is not None
    torch.testing.assert_close(from_proto(response.grad_prompts), want.grad_prompts, atol=0, rtol=0)
    assert [(g.block, g.module) for g in response.grad_lora] == [(e.block, e.module) for e in tuning.lora]
    for got, (_, da, db) in zip(response.grad_lora, want.grad_lora, strict=True):
        torch.testing.assert_close(from_proto(got.a), da, atol=0, rtol=0)
        torch.testing.assert_close(from_proto(got.b), db, atol=0, rtol=0)


async def test_info_and_record_name_the_adapters(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    info = await stub.Info(shard_pb2.InfoRequest())
    assert list(info.adapters) == ["ad1", "second"]
    assert server.record is not None and server.record.adapters == ["ad1", "second"]


# ---- inference sessions ------------------------------------------------------------------------------------------


class Session:
    def __init__(self, stub: shard_pb2_grpc.ShardStub) -> None:
        self.call = stub.InferenceStep()

    async def open(self, tuning: shard_pb2.Tuning | None = None, max_length: int = 16, batch: int = 1) -> Any:
        msg = shard_pb2.InferenceOpen(
            model_id="tiny", blocks=blocks(0, 4), max_length=max_length, session_id=uuid.uuid4().hex,
            batch_size=batch, tuning=tuning,
        )  # fmt: skip
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        return await asyncio.wait_for(self.call.read(), TIMEOUT_S)

    async def step(
        self, hidden: torch.Tensor, position: int, prompts: torch.Tensor | None = None, **fields: Any
    ) -> torch.Tensor:
        msg = shard_pb2.InferenceStepInput(
            step_id=uuid.uuid4().hex, position=position, hidden=to_proto(hidden), **fields
        )
        if prompts is not None:
            msg.prompts.CopyFrom(to_proto(prompts))
        await self.call.write(shard_pb2.InferenceRequest(step=msg))
        return from_proto((await asyncio.wait_for(self.call.read(), TIMEOUT_S)).step.hidden)

    async def run(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill 4 tokens (with the prompts), then one token per step."""
        outs = [await self.step(hidden[:, :4], 0, prompts)]
        for pos in range(4, hidden.shape[1]):
            outs.append(await self.step(hidden[:, pos : pos + 1], pos))
        return torch.cat(outs, dim=1)

    async def close(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.code(), TIMEOUT_S) == grpc.StatusCode.OK


async def forward(stub: shard_pb2_grpc.ShardStub, hidden: torch.Tensor, tuning: shard_pb2.Tuning) -> torch.Tensor:
    request = shard_pb2.ForwardRequest(model_id="tiny", blocks=blocks(0, 4), hidden=to_proto(hidden), tuning=tuning)
    return from_proto((await call(stub.Forward, request)).hidden)


async def test_sessions_with_different_tuning_batch_together(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    """Four sessions at once (adapter ad1; none; adapter `second` + own LoRA; own LoRA + step prompts): each equals
    a Forward with the same tuning, also when their steps run as one batch."""
    prompts = rand(4, 1, 2, HIDDEN, seed=5)
    tunings = [
        shard_pb2.Tuning(adapter="ad1"),
        None,
        shard_pb2.Tuning(adapter="second", lora=client_lora()),
        shard_pb2.Tuning(lora=client_lora(0, 2)),
    ]
    hidden = [rand(1, 7, HIDDEN, seed=20 + i) for i in range(4)]
    step_prompts = [None, None, None, prompts]
    expected = []
    for h, t, p in zip(hidden, tunings, step_prompts, strict=True):
        full = shard_pb2.Tuning()
        if t is not None:
            full.CopyFrom(t)
        if p is not None:
            full.prompts.CopyFrom(to_proto(p))
        expected.append(await forward(stub, h, full))
    used = server.cache.used_bytes
    sessions = [Session(stub) for _ in tunings]
    for s, t in zip(sessions, tunings, strict=True):
        await s.open(t)
    lora_bytes = sum(4 * (a * 4 + 4 * b) for a, b in MODULES.values()) * (4 + 2)  # fp32 A and B, 4 + 2 blocks
    kv = 4 * 16 * server.cache.token_bytes_per_block * 4  # 4 sessions x 16 tokens x 4 blocks
    assert server.cache.used_bytes - used == kv + lora_bytes  # the client's LoRA counts in the cache budget

    async def prefill(i: int) -> torch.Tensor:
        return await sessions[i].step(hidden[i][:, :4], 0, step_prompts[i])

    firsts = await run_queued_together(server.scheduler, [prefill(i) for i in range(4)])
    for i, s in enumerate(sessions):
        outs = [firsts[i]] + [await s.step(hidden[i][:, p : p + 1], p) for p in range(4, 7)]
        torch.testing.assert_close(torch.cat(outs, dim=1), expected[i], atol=1e-5, rtol=0)
        await s.close()
    assert expected[0].sub(expected[1]).abs().max() > 1e-2 and expected[2].sub(expected[1]).abs().max() > 1e-2


# ---- bad input ---------------------------------------------------------------------------------------------------

GOOD = rand(1, 4, HIDDEN, seed=30)
C = grpc.StatusCode
BAD_TUNING: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "unknown adapter": (dict(adapter="nope"), "INVALID_ARGUMENT", ("'nope'", "ad1, second")),
    "lora block not in request": (dict(lora=[lora_tensors(3, "self_attn.q_proj")]), "INVALID_ARGUMENT",
                                  ("block 3", "outside this request's blocks 0:2")),
    "unknown module": (dict(lora=[shard_pb2.LoraTensors(block=0, module="lm_head", a=to_proto(rand(4, 64)),
                                                        b=to_proto(rand(64, 4)))]),
                       "INVALID_ARGUMENT", ("unknown module", "self_attn.q_proj")),
    "a of wrong shape": (dict(lora=[lora_tensors(0, "self_attn.k_proj", a=rand(4, 32))]), "INVALID_ARGUMENT",
                         ("a must be [rank, 64]", "got a [4, 32]")),
    "b of wrong rank": (dict(lora=[lora_tensors(0, "self_attn.k_proj", b=rand(32, 3))]), "INVALID_ARGUMENT",
                        ("b [32, rank]",)),
    "int64 lora": (dict(lora=[lora_tensors(0, "self_attn.q_proj", a=torch.ones(4, 64, dtype=torch.int64))]),
                   "INVALID_ARGUMENT", ("int64",)),
    "rank over the limit": (dict(lora=[lora_tensors(0, "self_attn.q_proj", rank=MAX_RANK + 1)]), "INVALID_ARGUMENT",
                            ("rank 9", f"1..{MAX_RANK}", "--max-lora-rank")),
    "lora sent twice": (dict(lora=[lora_tensors(0, "mlp.down_proj")] * 2), "INVALID_ARGUMENT", ("sent twice",)),
    "nan scaling": (dict(lora=[lora_tensors(0, "mlp.down_proj", s=float("nan"))]), "INVALID_ARGUMENT",
                    ("scaling must be finite",)),
    "prompts for other blocks": (dict(prompts=to_proto(rand(4, 1, 2, HIDDEN))), "INVALID_ARGUMENT",
                                 ("[2 (blocks 0:2)", "got [4, 1, 2, 64]")),
    "prompts of wrong hidden": (dict(prompts=to_proto(rand(2, 1, 2, 32))), "INVALID_ARGUMENT", ("64]",)),
    "prompts of wrong batch": (dict(prompts=to_proto(rand(2, 3, 2, HIDDEN))), "INVALID_ARGUMENT",
                               ("[2 (blocks 0:2), 1, pre",)),
    "int32 prompts": (dict(prompts=to_proto(torch.ones(2, 1, 2, HIDDEN, dtype=torch.int32))), "INVALID_ARGUMENT",
                      ("int32",)),
    "prompts longer than the input": (dict(prompts=to_proto(rand(2, 1, 5, HIDDEN))), "INVALID_ARGUMENT",
                                      ("pre_seq_len=5", "only 4 tokens")),
}  # fmt: skip


@pytest.mark.parametrize("rpc", ["Forward", "Backward"])
@pytest.mark.parametrize("case", list(BAD_TUNING))
async def test_bad_tuning_is_invalid_argument(stub: shard_pb2_grpc.ShardStub, rpc: str, case: str) -> None:
    fields, code, words = BAD_TUNING[case]
    tuning = shard_pb2.Tuning(**fields)
    common = dict(model_id="tiny", blocks=blocks(0, 2), hidden=to_proto(GOOD), tuning=tuning)
    if rpc == "Forward":
        request: Any = shard_pb2.ForwardRequest(**common)
        await expect_error(call(stub.Forward, request), getattr(C, code), *words)
    else:
        request = shard_pb2.BackwardRequest(**common, grad_output=to_proto(GOOD))
        await expect_error(call(stub.Backward, request), getattr(C, code), *words)


async def test_limits_and_bad_sessions_keep_the_server_serving(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    """A healthy tuned session goes on through every failure below; the cache budget is whole afterwards."""
    healthy = Session(stub)
    await healthy.open(shard_pb2.Tuning(adapter="ad1", lora=client_lora(0, 1)))
    hidden = rand(1, 7, HIDDEN, seed=40)
    first = await healthy.step(hidden[:, :4], 0)
    used = server.cache.used_bytes

    big = rand(2, MAX_BACKWARD // 2 + 1, HIDDEN)
    backward = shard_pb2.BackwardRequest(model_id="tiny", hidden=to_proto(big), grad_output=to_proto(big))
    await expect_error(call(stub.Backward, backward), C.RESOURCE_EXHAUSTED, f"limit of {MAX_BACKWARD} tokens", "split")
    backward = shard_pb2.BackwardRequest(model_id="tiny", hidden=to_proto(GOOD), grad_output=to_proto(rand(1, 3, 64)))
    await expect_error(call(stub.Backward, backward), C.INVALID_ARGUMENT, "grad_output shape")
    await expect_error(Session(stub).open(shard_pb2.Tuning(adapter="x")), C.INVALID_ARGUMENT, "'x'", "ad1, second")
    await expect_error(
        Session(stub).open(shard_pb2.Tuning(prompts=to_proto(rand(4, 1, 2, HIDDEN)))),
        C.INVALID_ARGUMENT,
        "send them with the step",
    )
    await expect_error(
        Session(stub).open(shard_pb2.Tuning(lora=[lora_tensors(0, "self_attn.q_proj", rank=MAX_RANK + 1)])),
        C.INVALID_ARGUMENT,
        "--max-lora-rank",
    )

    async def bad_step(*words: str, position: int = 0, **step: Any) -> None:
        s = Session(stub)
        await s.open()
        if position:
            await s.step(rand(1, position, HIDDEN), 0)
        await expect_error(s.step(GOOD, position, **step), C.INVALID_ARGUMENT, *words)

    await bad_step("[4 (blocks 0:4), 1, pre_seq_len >= 1, 64]", prompts=rand(2, 1, 2, HIDDEN))
    await bad_step("float32, float16 or bfloat16", prompts=torch.ones(4, 1, 2, HIDDEN, dtype=torch.int64))
    await bad_step("cover slots [0, 2)", "writes slots [4, 8)", position=4, prompts=rand(4, 1, 2, HIDDEN))
    hop = shard_pb2.NextHop(address="127.0.0.1:1", session_id="x")
    await bad_step("cannot be pushed", prompts=rand(4, 1, 2, HIDDEN), next_servers=[hop])

    assert server.cache.used_bytes == used  # every failed open gave its reservation back
    rest = [await healthy.step(hidden[:, p : p + 1], p) for p in range(4, 7)]
    expected = await forward(stub, hidden, shard_pb2.Tuning(adapter="ad1", lora=client_lora(0, 1)))
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), expected, atol=1e-5, rtol=0)
    await healthy.close()
