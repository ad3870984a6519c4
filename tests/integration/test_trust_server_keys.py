"""Private swarms on shard servers (in-process): two swarms with different keys on one machine, each a keyed
dht-node and keyed shard servers; swarm A also serves gRPC over TLS with a CA made here.

A keyed server refuses calls without its key (UNAUTHENTICATED, also with the other swarm's key) and serves keyed
ones; health checks stay open. Its own calls carry the key and verify TLS: it announces to its keyed dht-node
(or it would not have started), pushes to the next server of its swarm, and cannot be reached by the other
swarm, whose records it never sees.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dht_node.node import DhtNode
from shard_server import ShardServer, ShardServerConfig
from swarm.auth import SwarmKey
from swarm.blocks import BlockRange, block_key
from swarm.dht_client import DhtClient
from swarm.net import Security, TlsFiles, open_channel
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.records import decode_server_records
from swarm.tensors import to_proto
from tests.integration.dht_support import make_tls_files
from tests.servers import WAIT_TIMEOUT_S, running

HIDDEN = 64


@dataclass
class TwoSwarms:
    a: Security  # key A, TLS (clients verify against the test CA)
    b: Security  # key B, plaintext
    dht_a: DhtNode
    dht_b: DhtNode
    a1: ShardServer  # 0:2 in swarm A
    a2: ShardServer  # 2:4 in swarm A
    b1: ShardServer  # 2:4 in swarm B


@pytest_asyncio.fixture(scope="module")
async def swarms(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TwoSwarms]:
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    a = Security(SwarmKey.generate(), TlsFiles(tls["cert"], tls["key"], tls["ca"]))
    b = Security(SwarmKey.generate())
    dht_a = DhtNode(host="127.0.0.1", port=0, security=a)
    dht_b = DhtNode(host="127.0.0.1", port=0, security=b)
    await asyncio.wait_for(asyncio.gather(dht_a.start(), dht_b.start()), WAIT_TIMEOUT_S)

    def config(blocks: tuple[int, int], security: Security, dht: DhtNode) -> ShardServerConfig:
        return ShardServerConfig(model=str(tiny_llama), blocks=BlockRange(*blocks), model_id="tiny",
                                 throughput_tps=1.0, network_mbps=1000.0, cache_tokens=1000,
                                 initial_peers=(dht.address,), security=security)  # fmt: skip

    try:
        async with (
            running(config((0, 2), a, dht_a)) as a1,
            running(config((2, 4), a, dht_a)) as a2,
            running(config((2, 4), b, dht_b)) as b1,
        ):
            yield TwoSwarms(a, b, dht_a, dht_b, a1, a2, b1)
    finally:
        await asyncio.gather(dht_a.stop(grace_s=0), dht_b.stop(grace_s=0))


async def info(address: str, security: Security) -> shard_pb2.InfoResponse:
    async with open_channel(address, security=security) as channel:
        return await asyncio.wait_for(shard_pb2_grpc.ShardStub(channel).Info(shard_pb2.InfoRequest()), WAIT_TIMEOUT_S)


async def refused_code(address: str, security: Security) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await info(address, security)
    return err.value.code()


async def test_a_keyed_server_serves_its_swarm_only_and_health_stays_open(swarms: TwoSwarms, tmp_path: Path) -> None:
    ca_only = TlsFiles(ca=swarms.a.tls.ca if swarms.a.tls else None)
    assert (await info(swarms.a1.address, swarms.a)).peer_id == swarms.a1.peer_id
    assert (await info(swarms.b1.address, swarms.b)).peer_id == swarms.b1.peer_id
    C = grpc.StatusCode
    assert await refused_code(swarms.a1.address, Security(tls=ca_only)) == C.UNAUTHENTICATED  # TLS, no key
    assert await refused_code(swarms.a1.address, Security(swarms.b.swarm_key, ca_only)) == C.UNAUTHENTICATED
    assert await refused_code(swarms.b1.address, Security()) == C.UNAUTHENTICATED
    assert await refused_code(swarms.b1.address, Security(swarms.a.swarm_key)) == C.UNAUTHENTICATED
    # TLS: plaintext cannot talk to it, and a client verifies its certificate against the CA
    assert await refused_code(swarms.a1.address, Security(swarms.a.swarm_key)) == C.UNAVAILABLE
    other_ca = make_tls_files(tmp_path)["ca"]  # another CA, same names
    assert await refused_code(swarms.a1.address, Security(swarms.a.swarm_key, TlsFiles(ca=other_ca))) == C.UNAVAILABLE
    # Inference streams need the key as well
    async with open_channel(swarms.b1.address) as channel:
        call = shard_pb2_grpc.ShardStub(channel).InferenceStep()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S)
        assert err.value.code() == C.UNAUTHENTICATED
    for address, security in ((swarms.a1.address, Security(tls=ca_only)), (swarms.b1.address, Security())):
        async with open_channel(address, security=security) as channel:  # orchestrators' probes need no key
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_two_keyed_swarms_share_a_machine_without_seeing_each_other(swarms: TwoSwarms) -> None:
    for dht, security, mine, theirs in (
        (swarms.dht_a, swarms.a, {swarms.a2.peer_id}, swarms.b1.peer_id),
        (swarms.dht_b, swarms.b, {swarms.b1.peer_id}, swarms.a2.peer_id),
    ):
        client = DhtClient([dht.address], security=security)
        try:
            key = block_key("tiny", 2)
            (entries,) = await client.batch_get([key])
            assert set(decode_server_records(key, entries)) == mine and theirs not in entries
        finally:
            await client.close()


async def test_open_channel_signs_streaming_calls(swarms: TwoSwarms) -> None:
    async with open_channel(swarms.b1.address, security=swarms.b) as channel:
        call = shard_pb2_grpc.ShardStub(channel).InferenceStep()
        msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=2, end=4), max_length=4)
        await call.write(shard_pb2.InferenceRequest(open=msg))
        assert (await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S)).HasField("opened")
        call.cancel()


async def test_keyed_tls_servers_push_to_each_other_but_not_across_swarms(swarms: TwoSwarms) -> None:
    x = torch.randn(1, 3, HIDDEN)

    async def open_stream(server: ShardServer, channel: grpc.aio.Channel) -> tuple[Any, shard_pb2.NextHop]:
        call, sid, token = shard_pb2_grpc.ShardStub(channel).InferenceStep(), uuid.uuid4().hex, os.urandom(16)
        blocks = common_pb2.BlockRange(start=server.blocks.start, end=server.blocks.end)  # type: ignore[union-attr]
        open_msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=blocks, max_length=8, session_id=sid,
                                           push_token=token)  # fmt: skip
        await call.write(shard_pb2.InferenceRequest(open=open_msg))
        assert (await asyncio.wait_for(call.read(), WAIT_TIMEOUT_S)).HasField("opened")
        return call, shard_pb2.NextHop(address=server.address, session_id=sid, push_token=token)

    async with (
        open_channel(swarms.a1.address, security=swarms.a) as c1,
        open_channel(swarms.a2.address, security=swarms.a) as c2,
        open_channel(swarms.b1.address, security=swarms.b) as cb,
    ):
        (first, _), (second, hop), (stranger, stranger_hop) = [
            await open_stream(s, c) for s, c in ((swarms.a1, c1), (swarms.a2, c2), (swarms.b1, cb))
        ]
        step = shard_pb2.InferenceStepInput(step_id="s1", position=0, hidden=to_proto(x), next_servers=[hop])
        await first.write(shard_pb2.InferenceRequest(step=step))
        pushed = await asyncio.wait_for(second.read(), WAIT_TIMEOUT_S)
        assert pushed.step.step_id == "s1" and pushed.step.position == 3  # over TLS, with the key
        assert (await asyncio.wait_for(first.read(), WAIT_TIMEOUT_S)).HasField("step")
        # Swarm B's server is in no record of swarm A: A does not push there.
        step = shard_pb2.InferenceStepInput(step_id="s2", position=0, hidden=to_proto(x), next_servers=[stranger_hop])
        await first.write(shard_pb2.InferenceRequest(step=step))
        kinds = {}
        for _ in range(2):
            reply = await asyncio.wait_for(first.read(), WAIT_TIMEOUT_S)
            kinds[reply.WhichOneof("kind")] = reply
        assert kinds["push_failed"].push_failed.error.startswith("PERMISSION_DENIED")
        for call in (first, second, stranger):
            await call.done_writing()
            assert await asyncio.wait_for(call.code(), WAIT_TIMEOUT_S) == grpc.StatusCode.OK
