"""Requests whose bytes are not valid protobuf get INVALID_ARGUMENT ("request is not a valid pollen.v1.X message")
from every RPC of a real shard server and a real dht-node, with one log line and no traceback; a bad message in
the middle of a stream ends that stream only, and the processes keep serving (swarm.handlers)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import pytest
import torch
from google.protobuf.descriptor import MethodDescriptor

from swarm.errors import ERROR_CLASS_KEY
from swarm.net import open_channel
from swarm.pb import common_pb2, dht_pb2, dht_pb2_grpc, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.launcher import Proc, SwarmProcesses
from tests.models import make_tiny_llama

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0
GARBAGE = [
    b"\xff" * 12,  # a varint tag that never ends
    b"\x0a\x40short",  # field 1, length 64, but 5 bytes follow
    b"\x08",  # a tag without its value
]
SHARD = shard_pb2.DESCRIPTOR.services_by_name["Shard"]
DHT = dht_pb2.DESCRIPTOR.services_by_name["Dht"]
HIDDEN = 64  # tiny_llama's hidden size


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SwarmProcesses, Proc, Proc]]:
    model = make_tiny_llama(tmp_path_factory.mktemp("undecodable") / "tiny")
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        server = procs.start_server(model, "0:4", [dht.address], "--num-threads", "1", "--model-id", "tiny")
        try:
            yield procs, dht, server
        except BaseException:
            print(procs.logs())
            raise


async def _raw_call(channel: grpc.aio.Channel, method: MethodDescriptor, payloads: list[bytes]) -> grpc.aio.AioRpcError:
    """Send raw bytes (no serializer) as one call of `method`; the error it ends with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method.client_streaming:
            call = channel.stream_stream(path)(timeout=TIMEOUT_S)
            for payload in payloads:
                await call.write(payload)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(path)(payloads[0], timeout=TIMEOUT_S)
    return info.value


def _check_invalid(error: grpc.aio.AioRpcError, message: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert f"request is not a valid {message} message" in (error.details() or ""), error.details()
    assert (ERROR_CLASS_KEY, "InvalidRequest") in tuple(error.trailing_metadata() or ())


def _forward_request(hidden: torch.Tensor) -> shard_pb2.ForwardRequest:
    blocks = common_pb2.BlockRange(start=0, end=4)
    return shard_pb2.ForwardRequest(model_id="tiny", blocks=blocks, hidden=to_proto(hidden), request_id="r")


def _open_request(max_length: int = 8) -> shard_pb2.InferenceRequest:
    blocks = common_pb2.BlockRange(start=0, end=4)
    session_id = uuid.uuid4().hex
    return shard_pb2.InferenceRequest(
        open=shard_pb2.InferenceOpen(model_id="tiny", blocks=blocks, max_length=max_length, session_id=session_id)
    )


def _step_request(hidden: torch.Tensor, position: int) -> shard_pb2.InferenceRequest:
    step = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=to_proto(hidden))
    return shard_pb2.InferenceRequest(step=step)


def test_garbage_to_every_rpc_gets_invalid_argument(swarm: tuple[SwarmProcesses, Proc, Proc]) -> None:
    _, dht, server = swarm

    async def main() -> None:
        for proc, service in ((server, SHARD), (dht, DHT)):
            async with open_channel(proc.address) as channel:
                for method in service.methods:
                    for garbage in GARBAGE:
                        error = await _raw_call(channel, method, [garbage])
                        _check_invalid(error, method.input_type.full_name)
        # both still serve correct calls
        async with open_channel(server.address) as channel:
            info = await shard_pb2_grpc.ShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=TIMEOUT_S)
            assert info.model_id == "tiny"
            hidden = torch.randn(1, 3, HIDDEN)
            call = shard_pb2_grpc.ShardStub(channel).Forward(timeout=TIMEOUT_S)
            await call.write(_forward_request(hidden))
            reply = await call.read()
            await call.done_writing()
            assert from_proto(reply.hidden).shape == hidden.shape
        async with open_channel(dht.address) as channel:
            pong = await dht_pb2_grpc.DhtStub(channel).Ping(dht_pb2.PingRequest(), timeout=TIMEOUT_S)
            assert pong.address == dht.address

    asyncio.run(main())
    for proc in (server, dht):
        log = proc.log()
        assert "Traceback" not in log and "ERROR" not in log, log[-4000:]
        assert proc.alive()
    assert "Forward rejected: INVALID_ARGUMENT request is not a valid pollen.v1.ForwardRequest" in server.log()


def test_garbage_mid_stream_ends_that_stream_only(swarm: tuple[SwarmProcesses, Proc, Proc]) -> None:
    """A good Forward, then garbage on the same stream: the first reply arrives, then INVALID_ARGUMENT. A bad
    message inside one inference session ends it while another session on the same server goes on."""
    _, _, server = swarm

    async def main() -> None:
        async with open_channel(server.address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            path = "/pollen.v1.Shard/Forward"
            forward = channel.stream_stream(path)(timeout=TIMEOUT_S)
            hidden = torch.randn(1, 2, HIDDEN)
            await forward.write(_forward_request(hidden).SerializeToString())
            assert shard_pb2.ForwardResponse.FromString(await forward.read()).request_id == "r"
            await forward.write(GARBAGE[0])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await forward.read()
            _check_invalid(info.value, "pollen.v1.ForwardRequest")

            # two sessions; the first gets garbage after a step, the second keeps stepping
            other = stub.InferenceStep(timeout=TIMEOUT_S)
            await other.write(_open_request())
            assert (await other.read()).WhichOneof("kind") == "opened"
            victim = channel.stream_stream("/pollen.v1.Shard/InferenceStep")(timeout=TIMEOUT_S)
            await victim.write(_open_request().SerializeToString())
            assert shard_pb2.InferenceResponse.FromString(await victim.read()).WhichOneof("kind") == "opened"
            await victim.write(_step_request(torch.randn(1, 2, HIDDEN), 0).SerializeToString())
            assert shard_pb2.InferenceResponse.FromString(await victim.read()).WhichOneof("kind") == "step"
            await victim.write(GARBAGE[1])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await victim.read()
            _check_invalid(info.value, "pollen.v1.InferenceRequest")

            position = 0
            for n in (3, 1, 1):
                await other.write(_step_request(torch.randn(1, n, HIDDEN), position))
                reply = await other.read()
                position += n
                assert reply.step.position == position
            await other.done_writing()
            assert await other.code() == grpc.StatusCode.OK

    asyncio.run(main())
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-4000:]
    assert server.alive()
