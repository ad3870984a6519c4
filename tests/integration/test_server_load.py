"""An in-process ShardServer under load and at its limits: sessions far beyond the cache budget fail cleanly
without the budget ever being exceeded, inference steps go ahead of queued training work (and training still
runs after its maximum wait), limits give clear errors, idle sessions are closed, /metrics + health + Info
report it all. Everything waits on conditions (the worker's order, the queue, the cache), never on time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.net import open_channel
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord
from swarm.tensors import to_proto
from tests.servers import WAIT_TIMEOUT_S, StepStream, running, serve, wait_until

HIDDEN = 64
MAX_LENGTH = 32
SESSIONS_IN_BUDGET = 10


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
        throughput_tps=100.0,
        metrics_port=0,
    )
    async for srv in serve(config):
        yield srv


async def test_sessions_far_beyond_the_budget_fail_cleanly(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    budget = server.cache.budget_bytes
    server.cache.alloc_timeout_s = 0.3  # waiting opens give up quickly in this test
    peak = [0]
    held: list[StepStream] = []

    async def greedy_client(i: int) -> str:
        s = StepStream(stub)
        try:
            await s.open(MAX_LENGTH, batch_size=1 + i % 4)
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
        info = await stub.Info(shard_pb2.InfoRequest())  # still serving, and reports the load
        assert info.active_sessions == len(held)
    finally:
        server.cache.alloc_timeout_s = 20.0
        for s in held:
            s.call.cancel()
    await wait_until(lambda: server.cache.active_sessions == 0, "the cancelled sessions to be released")
    assert server.cache.used_bytes == 0


async def test_inference_goes_ahead_of_queued_training_which_still_runs(
    stub: shard_pb2_grpc.ShardStub, server: ShardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the worker busy, six Forward requests queue, then one inference step: the step runs first. Once
    training has waited longer than its maximum wait (0 here), it runs before waiting steps (it never starves)."""
    backend = server.servicer.backend  # type: ignore[union-attr]
    order: list[str] = []  # what the worker ran, in order (appended on the worker thread)
    forward, step = backend.forward, backend.step
    monkeypatch.setattr(backend, "forward", lambda *a: (order.append("forward"), forward(*a))[1])
    monkeypatch.setattr(backend, "step", lambda items: (order.append("step"), step(items))[1])
    session = StepStream(stub)
    await session.open(MAX_LENGTH)
    await session.step(torch.randn(1, 2, HIDDEN))
    big = torch.randn(2, 64, HIDDEN)

    async def one_forward() -> None:
        call = stub.Forward()
        await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=to_proto(big)))
        await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S)
        await call.done_writing()

    scheduler = server.scheduler
    for max_wait, expected in ((1e9, ["step"] + ["forward"] * 6), (0.0, ["forward"] * 6 + ["step"])):
        scheduler.training_max_wait_s = max_wait
        order.clear()
        entered, gate = threading.Event(), threading.Event()

        def hold(entered: threading.Event = entered, gate: threading.Event = gate) -> None:
            entered.set()
            gate.wait(WAIT_TIMEOUT_S)

        blocker = asyncio.create_task(scheduler.run(hold))
        await wait_until(entered.is_set, "the worker to hold")
        forwards = [asyncio.create_task(one_forward()) for _ in range(6)]
        await wait_until(lambda: scheduler.queued == 6, "six Forward requests to queue")
        stepping = asyncio.create_task(session.step(torch.randn(1, 1, HIDDEN)))
        await wait_until(lambda: scheduler.queued == 7, "the step to queue behind them")
        gate.set()
        await asyncio.gather(blocker, stepping, *forwards)
        assert order == expected, max_wait
    scheduler.training_max_wait_s = 1.0
    await session.close()


async def expect(coro: Any, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(coro, WAIT_TIMEOUT_S)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in (err.value.details() or ""), err.value.details()


async def test_limits_give_clear_errors(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    C = grpc.StatusCode
    await expect(StepStream(stub).open(MAX_LENGTH + 1), C.RESOURCE_EXHAUSTED, "inference_max_length")
    s = StepStream(stub)
    await s.open(MAX_LENGTH, batch_size=9)
    await expect(s.step(torch.randn(9, 29, HIDDEN)), C.RESOURCE_EXHAUSTED, "9x29 = 261 tokens", "max_batch_size of 256")
    # Over the server's message limit (64 MiB by default): gRPC itself refuses it. A plain channel, whose send
    # limit is unbounded, so it is the server that refuses.
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = shard_pb2_grpc.ShardStub(channel).Forward()
        await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=common_pb2.Tensor(data=b"\0" * (65 << 20))))
        await expect(call.read(), C.RESOURCE_EXHAUSTED)
    server.scheduler.max_queued = 0  # a full Forward/Backward queue: Overloaded, a retryable RESOURCE_EXHAUSTED
    try:
        call = stub.Forward()
        await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=to_proto(torch.randn(1, 2, HIDDEN))))
        await expect(call.read(), C.RESOURCE_EXHAUSTED, "Forward/Backward requests are queued")
        assert dict(await call.trailing_metadata()).get("pollen-error") == "Overloaded"
    finally:
        server.scheduler.max_queued = 64
    server.cache.max_sessions, server.cache.alloc_timeout_s = 1, 0.1
    try:
        first = StepStream(stub)
        await first.open(4)
        await expect(StepStream(stub).open(4), C.RESOURCE_EXHAUSTED, "1 sessions are open (limit 1)")
        await first.close()
    finally:
        server.cache.max_sessions, server.cache.alloc_timeout_s = 64, 20.0


async def test_idle_session_is_closed(tiny_llama: Path) -> None:
    config = ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 2), model_id="tiny", throughput_tps=1.0,
                               cache_tokens=1000, session_timeout_s=0.3)  # fmt: skip
    async with running(config) as srv, open_channel(srv.address) as channel:
        s = StepStream(shard_pb2_grpc.ShardStub(channel))
        await s.open(8, end=2)
        await s.step(torch.randn(1, 2, HIDDEN))
        assert srv.cache.active_sessions == 1
        await wait_until(lambda: srv.cache.active_sessions == 0, "the idle session to be closed")
        assert srv.cache.used_bytes == 0
        assert await s.call.code() == grpc.StatusCode.NOT_FOUND  # the stream ended with a reason
        assert "idle for more than 0 s" in (await s.call.details())


async def http_get(port: int, path: str, headers: int = 1) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"X-{i}: y\r\n" for i in range(headers - 1))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
    data = await asyncio.wait_for(reader.read(), WAIT_TIMEOUT_S)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_health_and_info(stub: shard_pb2_grpc.ShardStub, server: ShardServer) -> None:
    s = StepStream(stub)
    await s.open(MAX_LENGTH)
    await s.step(torch.randn(1, 3, HIDDEN))
    await expect(StepStream(stub).open(MAX_LENGTH + 1), grpc.StatusCode.RESOURCE_EXHAUSTED)
    status, body = await http_get(server.metrics_port, "/metrics")
    assert status == 200
    for name in ('pollen_rpcs_total{code="OK",rpc="Info"}', 'pollen_request_seconds_count{rpc="InferenceStep"}',
                 'pollen_tokens_processed_total{kind="inference"}', "pollen_active_sessions 1.0",
                 "pollen_cache_bytes_used", "pollen_cache_bytes_free", "pollen_batch_rows_bucket",
                 "pollen_batch_sessions_bucket", 'pollen_rpcs_total{code="RESOURCE_EXHAUSTED",rpc="InferenceStep"}',
                 "pollen_rss_bytes"):  # fmt: skip
        assert name in body, name
    # prometheus_client's server parses requests with the standard library's limits: a request with too many
    # headers or an over-long line is refused (the hand-written server before it read any number of them)
    assert (await http_get(server.metrics_port, "/metrics", headers=500))[0] == 431
    assert (await http_get(server.metrics_port, "/" + "m" * 70_000))[0] == 414
    assert (await http_get(server.metrics_port, "/metrics"))[0] == 200
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
        gate.wait(WAIT_TIMEOUT_S)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server_module, "load_span", slow_load)
    srv = ShardServer(ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 1), throughput_tps=1.0))
    starting = asyncio.create_task(srv.start())
    try:
        await wait_until(lambda: srv.port != 0, "the gRPC port to be bound")
        async with open_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            gate.set()
            await asyncio.wait_for(starting, WAIT_TIMEOUT_S)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        await asyncio.gather(starting, return_exceptions=True)
        await srv.stop()
