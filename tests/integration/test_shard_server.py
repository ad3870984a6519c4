"""An in-process ShardServer (standalone, no DHT) on 127.0.0.1:0, driven through real grpc.aio stubs:
outputs equal plain transformers, and every kind of bad input gets a clear status without hurting others.
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaForCausalLM

from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.servers import serve, wait_until

TIMEOUT_S = 30
HIDDEN = 64
BUDGET = 400  # cache tokens: small so the over-budget case is cheap to hit
MAX_LENGTH = 64  # --inference-max-length
MAX_TOKENS = 512  # --max-batch-size


def blocks(start: int, end: int) -> common_pb2.BlockRange:
    return common_pb2.BlockRange(start=start, end=end)


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama),
        blocks=BlockRange(0, 4),
        model_id="tiny",
        inference_max_length=MAX_LENGTH,
        cache_tokens=BUDGET,
        max_batch_size=MAX_TOKENS,
        throughput_tps=100.0,  # skip the measurement: start-up speed matters more here
    )
    async for srv in serve(config):
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


def local_hidden(model: LlamaForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(input embeddings, hidden after each layer) — the last one captured before the final norm."""
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
    finally:
        hook.remove()
    per_layer = list(out.hidden_states[1:-1]) + [captured[0]]  # [-1] of hidden_states is already normed
    return out.hidden_states[0], per_layer


async def forward(stub: shard_pb2_grpc.ShardStub, hidden: torch.Tensor, start: int = 0, end: int = 4) -> torch.Tensor:
    request = shard_pb2.ForwardRequest(model_id="tiny", blocks=blocks(start, end), hidden=to_proto(hidden))
    return await asyncio.wait_for(_one_forward(stub, request), TIMEOUT_S)


async def _one_forward(stub: shard_pb2_grpc.ShardStub, request: shard_pb2.ForwardRequest) -> torch.Tensor:
    call = stub.Forward()
    await call.write(request)
    response = await call.read()
    await call.done_writing()
    return from_proto(response.hidden)


class Session:
    """A thin test client over one InferenceStep stream."""

    def __init__(self, stub: shard_pb2_grpc.ShardStub) -> None:
        self.call = stub.InferenceStep()

    async def open(self, max_length: int = 32, start: int = 0, end: int = 4, batch_size: int = 1, **kw: Any) -> Any:
        msg = shard_pb2.InferenceOpen(
            model_id=kw.get("model_id", "tiny"),
            blocks=blocks(start, end),
            max_length=max_length,
            session_id=uuid.uuid4().hex,
            batch_size=batch_size,
        )
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        return await asyncio.wait_for(self.call.read(), TIMEOUT_S)

    async def step(self, hidden: torch.Tensor | common_pb2.Tensor, position: int, **fields: Any) -> torch.Tensor:
        wire = hidden if isinstance(hidden, common_pb2.Tensor) else to_proto(hidden)
        msg = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=wire, **fields)
        await self.call.write(shard_pb2.InferenceRequest(step=msg))
        response = await asyncio.wait_for(self.call.read(), TIMEOUT_S)
        assert response.step.step_id == msg.step_id
        assert response.step.position == position + from_proto(wire).shape[1]
        return from_proto(response.step.hidden)

    async def close(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.code(), TIMEOUT_S) == grpc.StatusCode.OK


# ---- correctness ------------------------------------------------------------------------------------------


async def test_forward_equals_local_model(stub: shard_pb2_grpc.ShardStub, reference: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    embeds, per_layer = local_hidden(reference, ids)
    torch.testing.assert_close(await forward(stub, embeds), per_layer[3], atol=1e-5, rtol=0)
    # any sub-range is fine for the stateless Forward
    torch.testing.assert_close(await forward(stub, embeds, 0, 2), per_layer[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(await forward(stub, per_layer[1], 2, 4), per_layer[3], atol=1e-5, rtol=0)


async def test_inference_session_equals_forward(stub: shard_pb2_grpc.ShardStub) -> None:
    hidden = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(2))
    expected = await forward(stub, hidden)
    session = Session(stub)
    opened = await session.open(max_length=32)
    assert opened.opened.max_length == 32
    outputs = [await session.step(hidden[:, :7], 0)]  # prefill
    for pos in range(7, 12):
        outputs.append(await session.step(hidden[:, pos : pos + 1], pos))
    await session.close()
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=0)


async def test_prefix_sub_range_session(stub: shard_pb2_grpc.ShardStub) -> None:
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    expected = await forward(stub, hidden, 0, 2)
    session = Session(stub)
    await session.open(max_length=8, end=2)
    out = [await session.step(hidden[:, :4], 0), await session.step(hidden[:, 4:], 4)]
    await session.close()
    torch.testing.assert_close(torch.cat(out, dim=1), expected, atol=1e-5, rtol=0)


async def test_rollback_and_client_dtype(stub: shard_pb2_grpc.ShardStub) -> None:
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(4))
    other = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(5))
    session = Session(stub)
    await session.open(max_length=16)
    await session.step(hidden, 0)
    await session.step(other, 6)  # this token is then replaced: position 6 again rolls the cache back
    redone = await session.step(hidden[:, 5:6], 5)
    bf16 = await session.step(other.to(torch.bfloat16), 6)  # replies in the dtype the client sent
    await session.close()
    full = await forward(stub, torch.cat([hidden, other], dim=1))
    torch.testing.assert_close(redone, full[:, 5:6], atol=1e-5, rtol=0)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), full[:, 6:7], atol=0.1, rtol=0.05)


async def test_backward_equals_local_autograd(stub: shard_pb2_grpc.ShardStub, reference: LlamaForCausalLM) -> None:
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, HIDDEN, generator=gen)
    grad_output = torch.randn(2, 5, HIDDEN, generator=gen)
    x = hidden.clone().requires_grad_(True)
    h, positions = x, torch.arange(5).unsqueeze(0)
    position_embeddings = reference.model.rotary_emb(h, positions)
    for layer in reference.model.layers:
        h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
    (expected,) = torch.autograd.grad(h, x, grad_output)

    call = stub.Backward()
    request = shard_pb2.BackwardRequest(
        model_id="tiny", blocks=blocks(0, 4), hidden=to_proto(hidden), grad_output=to_proto(grad_output)
    )
    await call.write(request)
    response = await asyncio.wait_for(call.read(), TIMEOUT_S)
    await call.done_writing()
    torch.testing.assert_close(from_proto(response.grad_input), expected, atol=1e-5, rtol=0)


async def test_info_describes_the_server(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    info = await asyncio.wait_for(stub.Info(shard_pb2.InfoRequest()), TIMEOUT_S)
    assert (info.model_id, info.blocks.start, info.blocks.end, info.state) == ("tiny", 0, 4, "online")
    assert info.peer_id == server.peer_id and info.inference_max_length == MAX_LENGTH
    assert b'"address":"127.0.0.1:' in info.record_json


# ---- bad input: every case is a status with a message, never a crash --------------------------------------


def tensor_bytes(t: torch.Tensor, cut: int = 0) -> common_pb2.Tensor:
    msg = to_proto(t)
    if cut:
        msg.data = msg.data[:-cut]
    return msg


GOOD = torch.randn(1, 3, HIDDEN)
FORWARD_CASES = {
    "wrong hidden size": (dict(hidden=to_proto(torch.randn(1, 3, 32))), "INVALID_ARGUMENT", "[batch, seq, 64]"),
    "int64 hidden": (dict(hidden=to_proto(torch.ones(1, 3, HIDDEN, dtype=torch.int64))), "INVALID_ARGUMENT", "int64"),
    "truncated bytes": (dict(hidden=tensor_bytes(GOOD, cut=5)), "INVALID_ARGUMENT", "bytes"),
    "missing hidden": (dict(), "INVALID_ARGUMENT", "dtype"),
    "blocks not held": (dict(blocks=blocks(2, 6)), "FAILED_PRECONDITION", "holds 0:4"),
    "empty range": (dict(blocks=blocks(3, 3)), "INVALID_ARGUMENT", "3:3"),
    "model mismatch": (dict(model_id="other"), "FAILED_PRECONDITION", "'other'"),
    "too many tokens": (dict(hidden=to_proto(torch.randn(9, 64, HIDDEN))), "RESOURCE_EXHAUSTED", "max_batch_size"),
    "mask shape": (dict(attention_mask=to_proto(torch.ones(1, 2, dtype=torch.int64))), "INVALID_ARGUMENT", "[1, 3]"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
async def test_forward_rejects_bad_input(stub: shard_pb2_grpc.ShardStub, case: str) -> None:
    fields, code, words = FORWARD_CASES[case]
    request = shard_pb2.ForwardRequest(
        **{"model_id": "tiny", "blocks": blocks(0, 4), "hidden": to_proto(GOOD), **fields}
    )
    if case == "missing hidden":
        request.ClearField("hidden")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await forward_raw(stub, request)
    assert err.value.code().name == code, err.value.details()
    assert words in err.value.details()


async def forward_raw(stub: shard_pb2_grpc.ShardStub, request: shard_pb2.ForwardRequest) -> None:
    call = stub.Forward()
    await call.write(request)
    await asyncio.wait_for(call.read(), TIMEOUT_S)


async def test_backward_rejects_mismatched_grad(stub: shard_pb2_grpc.ShardStub) -> None:
    call = stub.Backward()
    await call.write(
        shard_pb2.BackwardRequest(
            model_id="tiny", hidden=to_proto(GOOD), grad_output=to_proto(torch.randn(1, 2, HIDDEN))
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grad_output shape" in err.value.details()


async def expect_error(coro: Any, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(coro, TIMEOUT_S)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for word in words:
        assert word in details, details
    return details


async def test_inference_rejects_bad_input_and_keeps_serving(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    # A healthy session stays open through all the failures below and must be unaffected by them.
    hidden = torch.randn(1, 8, HIDDEN, generator=torch.Generator().manual_seed(7))
    healthy = Session(stub)
    await healthy.open(max_length=16)
    first = await healthy.step(hidden[:, :4], 0)

    step_first = Session(stub)
    await step_first.call.write(
        shard_pb2.InferenceRequest(step=shard_pb2.InferenceStepInput(position=0, hidden=to_proto(GOOD)))
    )
    await expect_error(step_first.call.read(), grpc.StatusCode.NOT_FOUND, "no open session")

    C = grpc.StatusCode
    await expect_error(Session(stub).open(start=1, end=4), C.FAILED_PRECONDITION, "1:4", "holds 0:4")
    await expect_error(Session(stub).open(end=5), C.FAILED_PRECONDITION, "0:5", "holds 0:4")
    await expect_error(Session(stub).open(model_id="llama-70b"), C.FAILED_PRECONDITION, "'llama-70b'", "'tiny'")
    await expect_error(Session(stub).open(max_length=MAX_LENGTH + 1), C.RESOURCE_EXHAUSTED, "inference_max_length")
    await expect_error(Session(stub).open(max_length=0), C.INVALID_ARGUMENT, "max_length")
    free = BUDGET - 16
    await expect_error(
        Session(stub).open(max_length=64, batch_size=8),
        C.RESOURCE_EXHAUSTED,
        "asks for 512",
        f"only {free} of {BUDGET}",
    )

    async def bad_step(*words: str, code: grpc.StatusCode = C.INVALID_ARGUMENT, **step: Any) -> None:
        s = Session(stub)
        await s.open(max_length=8)
        await expect_error(s.step(**step), code, *words)

    await bad_step("over the session's max_length 8", hidden=torch.randn(1, 9, HIDDEN), position=0)  # prefill too long
    await bad_step("position 3", "ahead of the 0 tokens", hidden=GOOD, position=3)
    await bad_step("[batch, seq, 64]", hidden=torch.randn(1, 2, 65), position=0)
    await bad_step("int64", hidden=torch.ones(1, 2, HIDDEN, dtype=torch.int64), position=0)
    await bad_step("needs", "bytes", hidden=tensor_bytes(GOOD, cut=3), position=0)
    await bad_step("batch 2", "batch_size 1", hidden=torch.randn(2, 1, HIDDEN), position=0)
    await bad_step("hypo_ids", hidden=GOOD, position=0, hypo_ids=to_proto(torch.tensor([3])))
    await bad_step("attention_mask", hidden=GOOD, position=0, attention_mask=to_proto(torch.ones(1, 2)))

    # A second `open` on a stream that has one, and a stream that carries garbage bytes.
    twice = Session(stub)
    await twice.open()
    await twice.call.write(shard_pb2.InferenceRequest(open=shard_pb2.InferenceOpen(model_id="tiny", max_length=4)))
    await expect_error(twice.call.read(), C.INVALID_ARGUMENT, "already has an open session")
    await expect_garbage_rejected(server.address)

    # Every failed stream gave its reservation back; the healthy session continues exactly.
    second = await healthy.step(hidden[:, 4:], 4)
    await healthy.close()
    torch.testing.assert_close(torch.cat([first, second], dim=1), await forward(stub, hidden), atol=1e-5, rtol=0)
    assert server.cache.active_sessions == 0 and server.cache.tokens_left == BUDGET


async def expect_garbage_rejected(address: str) -> None:
    """Bytes that are not an InferenceRequest: grpc itself answers (INTERNAL, 'deserializing')."""
    async with grpc.aio.insecure_channel(address) as channel:
        raw = channel.stream_stream("/pollen.v1.Shard/InferenceStep", lambda b: b, lambda b: b)
        call = raw()
        await call.write(b"\xff\xff\xff\xff garbage")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)


async def test_cancelled_stream_frees_its_cache(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    session = Session(stub)
    await session.open(max_length=32)
    await session.step(GOOD, 0)
    assert server.cache.active_sessions == 1
    session.call.cancel()
    await wait_until(lambda: server.cache.active_sessions == 0, "the cancelled session to be released")
    assert server.cache.tokens_left == BUDGET


async def test_concurrent_sessions_are_independent(stub: shard_pb2_grpc.ShardStub) -> None:
    gen = torch.Generator().manual_seed(8)
    inputs = [torch.randn(1, 5, HIDDEN, generator=gen) for _ in range(3)]
    expected = [await forward(stub, h) for h in inputs]

    async def run(h: torch.Tensor) -> torch.Tensor:
        s = Session(stub)
        await s.open(max_length=8)
        out = [await s.step(h[:, :2], 0)] + [await s.step(h[:, p : p + 1], p) for p in range(2, 5)]
        await s.close()
        return torch.cat(out, dim=1)

    results = await asyncio.gather(*(run(h) for h in inputs))
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


async def test_unexpected_error_is_internal_and_logged(
    stub: shard_pb2_grpc.ShardStub,
    server: ShardServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert server.servicer is not None and server.servicer.backend is not None
    backend = server.servicer.backend

    def boom(*args: Any) -> torch.Tensor:
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(backend, "step", boom)
    session = Session(stub)
    await session.open(max_length=8)
    await expect_error(session.step(GOOD, 0), grpc.StatusCode.INTERNAL, "simulated kernel failure")
    assert "simulated kernel failure" in caplog.text and "in session" in caplog.text  # traceback names the session
    monkeypatch.undo()
    assert server.cache.active_sessions == 0
    torch.testing.assert_close(await forward(stub, GOOD), await forward(stub, GOOD))  # still serving


async def test_drain_lets_open_sessions_finish(tiny_llama: Path) -> None:
    config = ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 2), model_id="tiny", throughput_tps=1.0)
    srv = ShardServer(config)
    await asyncio.wait_for(srv.start(), TIMEOUT_S)
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        session = Session(stub)
        await session.open(max_length=8, end=2)
        await session.step(GOOD, 0)
        # A drain timeout far longer than this test may take: stop() can only return early by following the
        # session's end.
        stopping = asyncio.create_task(srv.stop(drain_timeout_s=3600))
        await wait_until(lambda: srv.state.value != "online", "the server to start draining")
        health = health_pb2_grpc.HealthStub(channel)
        status = await asyncio.wait_for(health.Check(health_pb2.HealthCheckRequest()), TIMEOUT_S)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await expect_error(Session(stub).open(end=2), grpc.StatusCode.UNAVAILABLE, "shutting down")
        await session.step(GOOD[:, :1], 3)  # the running session still works while draining
        assert not stopping.done()
        await session.close()
        await asyncio.wait_for(stopping, TIMEOUT_S)
