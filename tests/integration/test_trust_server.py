"""What a peer can make one shard server hold, at its bounds (an in-process server, no DHT): a session's inbox in
bytes (a push beyond it is refused with Overloaded; a client sending far ahead is not read further), the
Forward/Backward queue in bytes, open streams per IP, calls per IP, and messages over the receive limit (refused
by gRPC from their length prefix). Everything waits on conditions (the worker held, the queue), never on time.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
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
from swarm.tensors import to_proto
from tests.servers import WAIT_TIMEOUT_S, running, serve, wait_until

HIDDEN = 64
INBOX_BYTES = 4096  # about 3 steps of 4 tokens (1 KiB of float32 each, plus the message's fields)
QUEUED_BYTES = 8192  # one Forward of 2 x 16 tokens
STREAMS_PER_IP = 3


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama), blocks=BlockRange(0, 4), model_id="tiny", throughput_tps=1.0, network_mbps=1000.0,
        cache_tokens=1000, max_inbox_bytes=INBOX_BYTES, max_queued_bytes=QUEUED_BYTES,
        max_streams_per_ip=STREAMS_PER_IP, max_receive_bytes=1 << 20,
    )  # fmt: skip
    async for srv in serve(config):
        yield srv


@asynccontextmanager
async def held_worker(server: ShardServer) -> AsyncIterator[None]:
    """The worker busy with a job that waits for the block to end: requests queue meanwhile."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(WAIT_TIMEOUT_S)

    blocker = asyncio.create_task(server.scheduler.run(hold))
    try:
        await wait_until(entered.is_set, "the worker to hold")
        yield
    finally:
        gate.set()
        await blocker


async def open_session(stub: shard_pb2_grpc.ShardStub, token: bytes = b"") -> tuple[Any, str]:
    call, session_id = stub.InferenceStep(), uuid.uuid4().hex
    msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=0, end=4), max_length=16,
                                  session_id=session_id, push_token=token)  # fmt: skip
    await call.write(shard_pb2.InferenceRequest(open=msg))
    assert (await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S)).HasField("opened")
    return call, session_id


def a_step(tokens: int = 4) -> shard_pb2.InferenceStepInput:
    return shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=0,
                                        hidden=to_proto(torch.randn(1, tokens, HIDDEN)))  # fmt: skip


async def refusal(aw: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(aw, WAIT_TIMEOUT_S)
    return err.value


async def test_a_sessions_inbox_is_bounded_in_bytes(server: ShardServer, stub: shard_pb2_grpc.ShardStub) -> None:
    token = os.urandom(16)
    call, session_id = await open_session(stub, token)
    assert server.servicer is not None
    (inbox,) = server.servicer._inboxes[session_id]
    peak = [0]
    add = inbox._add

    def add_and_watch(item: Any, size: int) -> None:
        add(item, size)
        peak[0] = max(peak[0], inbox.queued_bytes)

    inbox._add = add_and_watch  # type: ignore[method-assign]
    step_bytes = a_step().ByteSize()
    sent = 1
    async with held_worker(server):
        # The first push goes to the worker's queue (the session waits for it); the next ones wait in the inbox
        # until it is full: then the previous server is told Overloaded (and would tell the client).
        await stub.Push(shard_pb2.PushRequest(session_id=session_id, step=a_step(), push_token=token))
        await wait_until(lambda: server.scheduler.queued == 1, "the first step to reach the worker's queue")
        for _ in range(INBOX_BYTES // step_bytes + 2):
            push = stub.Push(shard_pb2.PushRequest(session_id=session_id, step=a_step(), push_token=token))
            try:
                await asyncio.wait_for(push, WAIT_TIMEOUT_S)
                sent += 1
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert dict(await push.trailing_metadata()).get("pollen-error") == "Overloaded"
                assert "the client sends this step itself" in (e.details() or "")
                break
        else:
            pytest.fail("the inbox took every push")
        assert inbox.queued_bytes <= INBOX_BYTES
        # The client sends 20 steps ahead: the server stops reading its stream while the inbox is full.
        for _ in range(20):
            await call.write(shard_pb2.InferenceRequest(step=a_step()))
        await wait_until(lambda: inbox.queued_bytes >= INBOX_BYTES, "the client's steps to fill the inbox")
        assert not inbox._room.is_set()  # the reader waits for room
    # Released: every accepted step runs, in order, and the inbox never held more than its bound plus one step.
    replies = [await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S) for _ in range(sent + 20)]
    assert all(r.HasField("step") for r in replies)
    assert peak[0] <= INBOX_BYTES + step_bytes
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), WAIT_TIMEOUT_S) == grpc.StatusCode.OK


async def test_forward_backward_queue_is_bounded_in_bytes(server: ShardServer, stub: shard_pb2_grpc.ShardStub) -> None:
    async with held_worker(server):
        big = await forward(stub, torch.randn(2, 16, HIDDEN))  # 8 KiB: the bound; an empty queue takes one anyway
        first = asyncio.ensure_future(big.read())
        await wait_until(lambda: server.scheduler.queued == 1, "the first Forward to queue")
        assert server.scheduler.training_bytes == QUEUED_BYTES
        err = await refusal((await forward(stub, torch.randn(1, 1, HIDDEN))).read())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes of Forward/Backward input are queued" in (err.details() or "")
    assert (await asyncio.wait_for(first, WAIT_TIMEOUT_S)).HasField("hidden")
    assert server.scheduler.training_bytes == 0
    await big.done_writing()
    await asyncio.wait_for(big.code(), WAIT_TIMEOUT_S)


async def forward(stub: shard_pb2_grpc.ShardStub, hidden: torch.Tensor) -> Any:
    call = stub.Forward()
    await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=to_proto(hidden)))
    return call


async def test_open_streams_are_limited_per_ip(server: ShardServer, stub: shard_pb2_grpc.ShardStub) -> None:
    calls = [(await open_session(stub))[0] for _ in range(STREAMS_PER_IP)]
    err = await refusal(open_session(stub))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit {STREAMS_PER_IP} per address" in (err.details() or "")
    refused = await forward(stub, torch.randn(1, 1, HIDDEN))  # Forward/Backward streams count too
    assert (await refusal(refused.read())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await calls[0].done_writing()
    await asyncio.wait_for(calls[0].code(), WAIT_TIMEOUT_S)
    calls[0] = (await open_session(stub))[0]  # a closed stream frees its place
    for call in calls:
        call.cancel()
    await wait_until(lambda: server.cache.active_sessions == 0, "the sessions to close")


async def test_messages_over_the_receive_limit_are_refused(server: ShardServer) -> None:
    # A plain channel (its send limit is unbounded), so it is the server that refuses, from the length prefix.
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = shard_pb2_grpc.ShardStub(channel).Forward()
        await call.write(shard_pb2.ForwardRequest(model_id="tiny", hidden=common_pb2.Tensor(data=b"\0" * (2 << 20))))
        assert (await refusal(call.read())).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def slow_rate(tiny_llama: Path) -> Iterator[ShardServerConfig]:
    yield ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(0, 1), model_id="tiny", throughput_tps=1.0,
                            network_mbps=1000.0, cache_tokens=100, calls_per_ip_s=0.2)  # fmt: skip


async def test_calls_are_rate_limited_per_ip_but_health_stays_open(slow_rate: ShardServerConfig) -> None:
    async with running(slow_rate) as srv, open_channel(srv.address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        await stub.Info(shard_pb2.InfoRequest())  # the burst: 5 s worth of 0.2 calls/s = 1 call
        codes = []
        for _ in range(5):
            try:
                await stub.Info(shard_pb2.InfoRequest())
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_stop_waits_for_the_step_the_worker_is_running(slow_rate: ShardServerConfig) -> None:
    """A process must not exit while torch runs on the worker thread (it aborted with SIGABRT at exit): stop()
    returns only once the worker has finished its current item and exited."""
    async with running(slow_rate) as srv:
        entered, gate = threading.Event(), threading.Event()

        def busy() -> None:  # stands for a long step
            entered.set()
            gate.wait(WAIT_TIMEOUT_S)

        job = asyncio.ensure_future(srv.scheduler.run(busy))
        await wait_until(entered.is_set, "the worker to start the job")
        stopping = asyncio.create_task(srv.stop())
        await wait_until(lambda: srv.scheduler._closed, "stop() to close the scheduler")
        assert not stopping.done() and srv.scheduler.worker_alive
        gate.set()  # the step ends: now stop() can finish
        await asyncio.wait_for(stopping, WAIT_TIMEOUT_S)
        assert not srv.scheduler.worker_alive
        await asyncio.gather(job, return_exceptions=True)
