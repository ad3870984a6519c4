"""Server-to-server push between two in-process servers (blocks 0:2 and 2:4): a step sent to the first server
with `next_servers` arrives in the second server's session by itself, its output equals running both spans
in turn, a copy of the same step sent by the client as well runs only once, and a push that cannot be
delivered gives the client a `push_failed` notice instead of a timeout."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import torch
from transformers import LlamaForCausalLM

from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.net import open_channel
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.reference import pre_norm_hidden
from tests.servers import WAIT_TIMEOUT_S, running

HIDDEN = 64


@pytest_asyncio.fixture(scope="module")
async def chain(tiny_llama: Path) -> AsyncIterator[list[ShardServer]]:
    configs = [
        ShardServerConfig(
            model=str(tiny_llama), blocks=BlockRange(a, b), model_id="tiny", throughput_tps=1.0, cache_tokens=1000
        )  # fmt: skip
        for a, b in ((0, 2), (2, 4))
    ]
    async with running(configs[0]) as first, running(configs[1]) as second:
        yield [first, second]


class Stream:
    def __init__(self, server: ShardServer, channel: object) -> None:
        self.server = server
        self.call = shard_pb2_grpc.ShardStub(channel).InferenceStep()
        self.session_id = uuid.uuid4().hex

    async def open(self) -> None:
        blocks = self.server.blocks
        assert blocks is not None
        msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=blocks.start, end=blocks.end),
                                      max_length=16, session_id=self.session_id)  # fmt: skip
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        assert (await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)).HasField("opened")

    async def send(self, step: shard_pb2.InferenceStepInput) -> None:
        await self.call.write(shard_pb2.InferenceRequest(step=step))

    async def read(self) -> shard_pb2.InferenceResponse:
        return await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)


async def test_push_delivers_each_step_once_and_reports_failures(chain: list[ShardServer], tiny_llama: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    hidden = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    first, second = chain
    async with open_channel(first.address) as c1, open_channel(second.address) as c2:
        a, b = Stream(first, c1), Stream(second, c2)
        await a.open()
        await b.open()
        hop = shard_pb2.NextHop(address=second.address, session_id=b.session_id)
        outputs = []
        for position, chunk in ((0, hidden[:, :4]), (4, hidden[:, 4:])):
            step = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=to_proto(chunk),
                                                next_servers=[hop])  # fmt: skip
            await a.send(step)
            reply_a = await a.read()  # the first server still answers the client
            assert reply_a.step.step_id == step.step_id
            reply_b = await b.read()  # ...and the second server got the step from the first one
            assert reply_b.step.step_id == step.step_id and reply_b.step.position == position + chunk.shape[1]
            outputs.append(from_proto(reply_b.step.hidden))
            if position == 0:
                # The client re-sends the same step to the second server (as after a push_failed it could not
                # yet see): it must not run twice. The next reply on b's stream must be the next step's.
                resent = shard_pb2.InferenceStepInput(step_id=step.step_id, position=0, hidden=reply_a.step.hidden)
                await b.send(resent)
        expected = pre_norm_hidden(model, hidden)
        torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-5, rtol=0)

        # A push to a session the next server does not have: the client hears about it on its stream.
        lost = shard_pb2.NextHop(address=second.address, session_id="no-such-session")
        step = shard_pb2.InferenceStepInput(step_id="lost", position=5, hidden=to_proto(hidden[:, :1]),
                                            next_servers=[lost])  # fmt: skip
        await a.send(step)
        kinds = {(await a.read()).WhichOneof("kind") for _ in range(2)}
        assert kinds == {"step", "push_failed"}
        for stream in (a, b):
            await stream.call.done_writing()
            await asyncio.wait_for(stream.call.code(), WAIT_TIMEOUT_S)
    assert first.cache.active_sessions == 0 and second.cache.active_sessions == 0
