"""Server-to-server push between in-process servers announced in one in-process dht-node.

A (blocks 0:2) pushes a step sent with `next_servers` to B (2:4): it arrives in B's session by itself, its output
equals running both spans in turn, a copy of the same step sent by the client as well runs only once, and a push
that cannot be delivered gives the client a `push_failed` notice instead of a timeout.

Push is not an open proxy: A dials only addresses that signed records announce for the same model and model hash
with blocks starting where A's session ends (not an unannounced server, not a server of another model hash, not
for a session ending elsewhere), a standalone server pushes nowhere, and B takes a push only with the token the
client gave that session, so nobody can inject steps or take over another's pushes by reusing a session id.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from transformers import LlamaForCausalLM

from dht_node.node import DhtNode
from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.net import open_channel
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.reference import pre_norm_hidden
from tests.servers import WAIT_TIMEOUT_S, running, wait_until

HIDDEN = 64


@dataclass
class Swarm:
    a: ShardServer  # 0:2, announced
    b: ShardServer  # 2:4, announced
    lone: ShardServer  # 0:2, standalone (in no record)
    other_hash: ShardServer  # 2:4 of a model with the same id but another config: announced, another model hash


@pytest_asyncio.fixture(scope="module")
async def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Swarm]:
    other = tmp_path_factory.mktemp("other-config") / "tiny"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10  # same weights, another model hash
    (other / "config.json").write_text(json.dumps(config))

    dht = DhtNode(host="127.0.0.1", port=0)
    await asyncio.wait_for(dht.start(), WAIT_TIMEOUT_S)

    def config_for(model: Path, blocks: tuple[int, int], announced: bool = True) -> ShardServerConfig:
        return ShardServerConfig(model=str(model), blocks=BlockRange(*blocks), model_id="tiny", throughput_tps=1.0,
                                 network_mbps=1000.0, cache_tokens=1000,
                                 initial_peers=(dht.address,) if announced else ())  # fmt: skip

    try:
        async with (
            running(config_for(tiny_llama, (0, 2))) as a,
            running(config_for(tiny_llama, (2, 4))) as b,
            running(config_for(tiny_llama, (0, 2), announced=False)) as lone,
            running(config_for(other, (2, 4))) as other_hash,
        ):
            yield Swarm(a, b, lone, other_hash)
    finally:
        await dht.stop(grace_s=0)


class Stream:
    """One InferenceStep stream to `server`, opened over `blocks` (default: all it holds) with a push token."""

    def __init__(self, server: ShardServer, channel: object, session_id: str | None = None) -> None:
        self.server = server
        self.call = shard_pb2_grpc.ShardStub(channel).InferenceStep()
        self.session_id = session_id or uuid.uuid4().hex
        self.token = os.urandom(16)

    async def open(self, blocks: tuple[int, int] | None = None, token: bytes | None = None) -> None:
        held = self.server.blocks
        assert held is not None
        start, end = blocks or (held.start, held.end)
        self.token = self.token if token is None else token
        msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=start, end=end),
                                      max_length=16, session_id=self.session_id, push_token=self.token)  # fmt: skip
        await self.call.write(shard_pb2.InferenceRequest(open=msg))
        assert (await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)).HasField("opened")

    def hop(self, token: bytes | None = None) -> shard_pb2.NextHop:
        return shard_pb2.NextHop(address=self.server.address, session_id=self.session_id,
                                 push_token=self.token if token is None else token)  # fmt: skip

    async def send(self, step: shard_pb2.InferenceStepInput) -> None:
        await self.call.write(shard_pb2.InferenceRequest(step=step))

    async def read(self) -> shard_pb2.InferenceResponse:
        return await asyncio.wait_for(self.call.read(), WAIT_TIMEOUT_S)

    async def close(self) -> None:
        await self.call.done_writing()
        await asyncio.wait_for(self.call.code(), WAIT_TIMEOUT_S)


def step_to(hop: shard_pb2.NextHop, hidden: torch.Tensor, position: int = 0) -> shard_pb2.InferenceStepInput:
    return shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=to_proto(hidden),
                                        next_servers=[hop])  # fmt: skip


async def refused_push(stream: Stream) -> str:
    """The step's reply and its push_failed notice (either order): the notice's error."""
    replies = [await stream.read() for _ in range(2)]
    assert sorted(r.WhichOneof("kind") for r in replies) == ["push_failed", "step"]
    return next(r.push_failed.error for r in replies if r.HasField("push_failed"))


def session_lengths(server: ShardServer, session_id: str) -> list[int]:
    return sorted(s.length for s in server.cache.sessions if s.session_id == session_id)


async def test_push_delivers_each_step_once_and_reports_failures(swarm: Swarm, tiny_llama: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    hidden = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    first, second = swarm.a, swarm.b
    async with open_channel(first.address) as c1, open_channel(second.address) as c2:
        a, b = Stream(first, c1), Stream(second, c2)
        await a.open()
        await b.open()
        outputs = []
        for position, chunk in ((0, hidden[:, :4]), (4, hidden[:, 4:])):
            step = step_to(b.hop(), chunk, position)
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
        lost = shard_pb2.NextHop(address=second.address, session_id="no-such-session", push_token=b.token)
        assert (await refused_push_of(a, lost, hidden[:, :1], 5)).startswith("NOT_FOUND")
        for stream in (a, b):
            await stream.close()
    await wait_until(lambda: first.cache.active_sessions == 0 and second.cache.active_sessions == 0, "sessions closed")


async def refused_push_of(stream: Stream, hop: shard_pb2.NextHop, hidden: torch.Tensor, position: int = 0) -> str:
    await stream.send(step_to(hop, hidden, position))
    return await refused_push(stream)


async def test_push_goes_only_to_next_servers_that_signed_records_vouch_for(swarm: Swarm) -> None:
    x = torch.randn(1, 2, HIDDEN)
    async with (
        open_channel(swarm.a.address) as ca,
        open_channel(swarm.lone.address) as cl,
        open_channel(swarm.other_hash.address) as co,
        open_channel(swarm.b.address) as cb,
    ):
        a, lone, other, b = (
            Stream(swarm.a, ca),
            Stream(swarm.lone, cl),
            Stream(swarm.other_hash, co),
            Stream(swarm.b, cb),
        )
        for stream in (a, lone, other, b):
            await stream.open()
        # An address that no record announces (a live server with a session and its token, all the same), an
        # address announced for the model id but with another model hash, and any host:port at all.
        nowhere = shard_pb2.NextHop(address="127.0.0.1:9", session_id="x", push_token=os.urandom(16))
        for hop, position in ((lone.hop(), 0), (other.hop(), 2), (nowhere, 4)):
            error = await refused_push_of(a, hop, x, position)
            assert error.startswith("PERMISSION_DENIED") and "no signed record announces" in error, error
            assert hop.address not in swarm.a.servicer.pusher.peers  # type: ignore[union-attr]  # never dialled
        assert session_lengths(swarm.lone, lone.session_id) == [0]
        assert session_lengths(swarm.other_hash, other.session_id) == [0]

        # B is a next server of a session over 0:2, not of one over 0:1 (its chain continues at block 1).
        short = Stream(swarm.a, ca)
        await short.open(blocks=(0, 1))
        assert (await refused_push_of(short, b.hop(), x)).startswith("PERMISSION_DENIED")
        # A standalone server has no records to check an address against: it pushes nowhere.
        error = await refused_push_of(lone, b.hop(), x, 0)
        assert error.startswith("PERMISSION_DENIED") and "standalone" in error, error
        assert session_lengths(swarm.b, b.session_id) == [0]
        # ...while the real next server gets the push.
        await a.send(step_to(b.hop(), x))
        assert (await b.read()).step.position == 2 and (await a.read()).HasField("step")
        for stream in (a, lone, other, b, short):
            await stream.close()


async def test_push_needs_the_sessions_token_and_session_ids_cannot_be_taken_over(swarm: Swarm) -> None:
    x = torch.randn(1, 2, HIDDEN)
    async with open_channel(swarm.a.address) as ca, open_channel(swarm.b.address) as cb:
        a, victim = Stream(swarm.a, ca), Stream(swarm.b, cb)
        await a.open()
        await victim.open()
        # Others open sessions under the victim's session id: one with its own token, one with none.
        intruders = [Stream(swarm.b, cb, victim.session_id), Stream(swarm.b, cb, victim.session_id)]
        await intruders[0].open()
        await intruders[1].open(token=b"")
        for token in (os.urandom(16), b""):  # a wrong token, and none
            assert (await refused_push_of(a, victim.hop(token), x)).startswith("NOT_FOUND")
        # With an intruder's own token, a push reaches that intruder's own session only.
        await a.send(step_to(victim.hop(intruders[0].token), x))
        assert (await intruders[0].read()).step.position == 2 and (await a.read()).HasField("step")
        # The client's step with the victim's token reaches the victim's session, not an intruder's.
        await a.send(step_to(victim.hop(), x))
        assert (await victim.read()).step.position == 2 and (await a.read()).HasField("step")
        assert session_lengths(swarm.b, victim.session_id) == [0, 2, 2]  # victim 2, intruder 0 and 2
        # A push without a token never reaches a session opened without one either.
        assert (await refused_push_of(a, intruders[1].hop(b""), x, 2)).startswith("NOT_FOUND")
        # A token must be a real secret: 16 to 64 bytes.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Stream(swarm.b, cb).open(token=b"short")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "push_token must be 16-64 random bytes" in (refused.value.details() or "")
        for stream in (a, victim, *intruders):
            await stream.close()
