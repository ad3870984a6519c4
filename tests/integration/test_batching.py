"""In-process ShardServer under concurrent load: cross-session batching is exact, 16 concurrent greedy sessions
equal sequential runs, sessions far beyond the cache budget fail cleanly without the budget ever being exceeded,
training traffic cannot starve inference, limits give clear errors, and /metrics + health + Info report it all.

Tolerance: a batched step differs from the same step run alone only through GEMM row blocking (measured
<= 3e-7 in fp32); we assert atol 1e-5 on hidden states and identical greedy tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
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
from swarm.records import ServerRecord
from swarm.tensors import from_proto, to_proto
from tests.servers import serve

TIMEOUT_S = 30
HIDDEN = 64
MAX_LENGTH = 32
SESSIONS_IN_BUDGET = 10  # the cache budget holds this many MAX_LENGTH sessions; 16 concurrent ones must queue


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama),
        blocks=BlockRange(0, 4),
        model_id="tiny",
        inference_max_length=MAX_LENGTH,
        cache_tokens=SESSIONS_IN_BUDGET * MAX_LENGTH,
        max_batch_size=256,
        alloc_timeout_s=20.0,
        max_sessions=64,
        throughput_tps=100.0,  # skip the measurement; batching "auto" is then on for Llama
        metrics_port=0,
    )
    async for srv in serve(config):
        yield srv


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


def batch_stat(server: ShardServer, what: str) -> float:
    return server.metrics.registry.get_sample_value(f"pollen_batch_rows_{what}") or 0.0


class Session:
    def __init__(self, stub: shard_pb2_grpc.ShardStub) -> None:
        self.call = stub.InferenceStep()
        self.position = 0

    async def open(self, max_length: int = MAX_LENGTH, batch_size: int = 1, end: int = 4) -> None:
        blocks = common_pb2.BlockRange(start=0, end=end)
        msg = shard_pb2.InferenceOpen(
            model_id="tiny", blocks=blocks, max_length=max_length, session_id=uuid.uuid4().hex, batch_size=batch_size
        )
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        await asyncio.wait_for(self.call.read(), TIMEOUT_S)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        msg = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=self.position, hidden=to_proto(hidden))
        await self.call.write(shard_pb2.InferenceRequest(step=msg))
        response = await asyncio.wait_for(self.call.read(), TIMEOUT_S)
        self.position += hidden.shape[1]
        return from_proto(response.step.hidden)

    async def close(self) -> None:
        await self.call.done_writing()
        assert await asyncio.wait_for(self.call.code(), TIMEOUT_S) == grpc.StatusCode.OK


async def generate(stub: shard_pb2_grpc.ShardStub, model: LlamaForCausalLM, prompt: torch.Tensor, new: int) -> Any:
    """Greedy generation through the server: local embeddings, remote blocks, local norm + head."""
    session = Session(stub)
    await session.open()
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


async def test_sixteen_concurrent_sessions_equal_sequential_runs_within_budget(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer, model: LlamaForCausalLM
) -> None:
    prompts = [torch.randint(0, 128, (1, 3 + i % 5), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    sequential = [await generate(stub, model, p, 12) for p in prompts]
    rows_before = batch_stat(server, "sum")
    batches_before = batch_stat(server, "count")

    budget, peak = server.cache.budget_bytes, [0, 0]

    async def watch() -> None:
        while True:
            peak[0] = max(peak[0], server.cache.used_bytes)
            peak[1] = max(peak[1], server.cache.allocated_bytes())
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        concurrent = await asyncio.gather(*(generate(stub, model, p, 12) for p in prompts))
    finally:
        watcher.cancel()
    for (seq_tokens, seq_hidden), (tokens, hidden) in zip(sequential, concurrent, strict=True):
        assert tokens == seq_tokens
        torch.testing.assert_close(hidden, seq_hidden, atol=1e-5, rtol=0)
    assert 0 < peak[1] <= peak[0] <= budget  # 16 sessions, room for 10: some waited, none overflowed
    rows = batch_stat(server, "sum") - rows_before
    batches = batch_stat(server, "count") - batches_before
    assert rows / batches > 1.5, f"{rows} rows in {batches} batches: steps were not batched"
    assert server.cache.active_sessions == 0 and server.cache.used_bytes == 0


async def test_batched_step_equals_the_same_step_alone(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 4, HIDDEN, generator=gen) for _ in range(6)]
    tokens = [torch.randn(1, 1, HIDDEN, generator=gen) for _ in range(6)]
    # alone: one session at a time
    alone = []
    for p, t in zip(prompts, tokens, strict=True):
        s = Session(stub)
        await s.open()
        await s.step(p)
        alone.append(await s.step(t))
        await s.close()
    # batched: hold the worker while all six steps queue, so they run as one batch of 6 rows
    sessions = [Session(stub) for _ in prompts]
    for s, p in zip(sessions, prompts, strict=True):
        await s.open()
        await s.step(p)
    gate = threading.Event()
    blocker = asyncio.create_task(server.scheduler.run(gate.wait, 10))
    batches_before = batch_stat(server, "count")
    steps = [asyncio.create_task(s.step(t)) for s, t in zip(sessions, tokens, strict=True)]
    while server.scheduler.queued < len(steps):  # the worker holds the gate; the steps queue behind it
        await asyncio.sleep(0.005)
    gate.set()
    batched = await asyncio.gather(*steps)
    await blocker
    assert batch_stat(server, "count") - batches_before == 1  # one batch of all six
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for s in sessions:
        await s.close()


async def test_sessions_far_beyond_the_budget_fail_cleanly(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    budget = server.cache.budget_bytes
    server.cache.alloc_timeout_s = 0.3  # waiting opens give up quickly in this test
    peak = [0]
    held: list[Session] = []

    async def greedy_client(i: int) -> str:
        s = Session(stub)
        try:
            await s.open(batch_size=1 + i % 4)
            await s.step(torch.randn(1 + i % 4, MAX_LENGTH, HIDDEN))  # fill the whole reservation
            peak[0] = max(peak[0], server.cache.allocated_bytes())
            held.append(s)  # never closes: keeps its cache until the end of the test
            return "OK"
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "asks for" in (e.details() or "") and "free" in (e.details() or "")
            return "RESOURCE_EXHAUSTED"

    try:
        results = await asyncio.gather(*(greedy_client(i) for i in range(60)))
        assert results.count("OK") >= 1 and results.count("RESOURCE_EXHAUSTED") >= 40
        assert peak[0] <= budget and server.cache.used_bytes <= budget
        assert server.cache.allocated_bytes() <= budget
        # still serving: a Forward works and Info reports the load
        info = await stub.Info(shard_pb2.InfoRequest())
        assert info.active_sessions == len(held)
    finally:
        server.cache.alloc_timeout_s = 20.0
        for s in held:
            s.call.cancel()
    for _ in range(200):
        if server.cache.active_sessions == 0:
            break
        await asyncio.sleep(0.01)
    assert server.cache.used_bytes == 0


async def test_training_traffic_does_not_starve_inference(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    big = torch.randn(2, 128, HIDDEN)  # one Forward of 256 tokens
    t0 = time.perf_counter()
    call = stub.Forward()
    await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=to_proto(big)))
    await call.read()
    forward_s = time.perf_counter() - t0
    stop = asyncio.Event()
    done = [0]

    async def trainer() -> None:
        call = stub.Forward()
        while not stop.is_set():
            await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=to_proto(big)))
            await call.read()
            done[0] += 1
        await call.done_writing()

    trainers = [asyncio.create_task(trainer()) for _ in range(6)]
    await asyncio.sleep(0.1)
    s = Session(stub)
    await s.open()
    await s.step(torch.randn(1, 2, HIDDEN))
    latencies = []
    for _ in range(10):
        t = time.perf_counter()
        await s.step(torch.randn(1, 1, HIDDEN))
        latencies.append(time.perf_counter() - t)
    await s.close()
    stop.set()
    await asyncio.gather(*trainers)
    assert done[0] > 0  # training still makes progress
    # a step waits for at most the one Forward already running, not for the six queued ones
    assert max(latencies) < 3 * forward_s + 0.05, (latencies, forward_s)


async def expect(coro: Any, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(coro, TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in (err.value.details() or ""), err.value.details()


async def test_limits_give_clear_errors(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    C = grpc.StatusCode
    await expect(Session(stub).open(max_length=MAX_LENGTH + 1), C.RESOURCE_EXHAUSTED, "inference_max_length")
    s = Session(stub)
    await s.open(max_length=MAX_LENGTH, batch_size=9)
    await expect(s.step(torch.randn(9, 29, HIDDEN)), C.RESOURCE_EXHAUSTED, "9x29 = 261 tokens", "max_batch_size of 256")
    async with grpc.aio.insecure_channel(server.address) as channel:  # over --max-message-bytes: gRPC refuses it
        call = shard_pb2_grpc.ShardStub(channel).Forward()
        huge = shard_pb2.ForwardRequest(model_id="tiny", hidden=common_pb2.Tensor(data=b"\0" * (65 << 20)))
        await call.write(huge)
        await expect(call.read(), C.RESOURCE_EXHAUSTED)
    server.cache.max_sessions, server.cache.alloc_timeout_s = 1, 0.1
    try:
        first = Session(stub)
        await first.open(max_length=4)
        await expect(Session(stub).open(max_length=4), C.RESOURCE_EXHAUSTED, "1 sessions are open (limit 1)")
        await first.close()
    finally:
        server.cache.max_sessions, server.cache.alloc_timeout_s = 64, 20.0


async def test_idle_session_is_closed(tiny_llama: Path) -> None:
    config = ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 2), model_id="tiny", throughput_tps=1.0,
                               cache_tokens=1000, session_timeout_s=0.3)  # fmt: skip
    srv = ShardServer(config)
    await asyncio.wait_for(srv.start(), TIMEOUT_S)
    try:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            s = Session(shard_pb2_grpc.ShardStub(channel))
            await s.open(max_length=8, end=2)
            await s.step(torch.randn(1, 2, HIDDEN))
            assert srv.cache.active_sessions == 1
            await asyncio.sleep(0.8)
            assert srv.cache.active_sessions == 0 and srv.cache.used_bytes == 0
            assert await s.call.code() == grpc.StatusCode.NOT_FOUND  # the stream ended with a reason
            assert "idle for more than 0 s" in (await s.call.details())
    finally:
        await srv.stop()


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_health_and_info(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    s = Session(stub)
    await s.open()
    await s.step(torch.randn(1, 3, HIDDEN))
    status, body = await http_get(server.metrics_port, "/metrics")
    assert status == 200
    for name in ('pollen_rpcs_total{code="OK",rpc="Info"}', 'pollen_request_seconds_count{rpc="InferenceStep"}',
                 'pollen_tokens_processed_total{kind="inference"}', "pollen_active_sessions 1.0",
                 "pollen_cache_bytes_used", "pollen_cache_bytes_free", "pollen_batch_rows_bucket",
                 'pollen_rpcs_total{code="RESOURCE_EXHAUSTED",rpc="InferenceStep"}', "pollen_rss_bytes"):  # fmt: skip
        assert name in body, name
    assert (await http_get(server.metrics_port, "/other"))[0] == 404
    info = await stub.Info(shard_pb2.InfoRequest())
    record = ServerRecord.decode(info.record_json)
    assert record is not None and (record.start, record.end, record.dtype) == (0, 4, "float32")
    assert info.active_sessions == 1 and record.throughput_tps == 100.0 and record.network_tps > 0
    assert record.cache_tokens_left == server.cache.tokens_left < SESSIONS_IN_BUDGET * MAX_LENGTH
    await s.close()


async def test_health_is_not_serving_while_loading(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shard_server.server as server_module

    gate = threading.Event()
    real_load = server_module.load_span

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_module, "load_span", slow_load)
    srv = ShardServer(ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 1), throughput_tps=1.0))
    starting = asyncio.create_task(srv.start())
    try:
        while srv.port == 0:
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            gate.set()
            await asyncio.wait_for(starting, TIMEOUT_S)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        await asyncio.gather(starting, return_exceptions=True)
        await srv.stop()
