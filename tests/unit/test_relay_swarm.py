"""Reachability and relaying inside one process, on 127.0.0.1: the dht-node's dial-back (CheckReachable) and
shard servers reached only through a relay (`use_relay="always"`), generating token-exact against transformers.

The netns e2e test (tests/e2e/test_relay_netns.py) covers a server that truly cannot be dialled; here the
relay is forced, which exercises the same path (announce the lent address, clients and pushes dial it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sdk import AsyncSwarmClient
from dht_node.node import DhtNode
from dht_node.reachability import ReachabilityProbe
from shard_server import ShardServerConfig
from shard_server.reachability import check_reachable
from swarm.blocks import BlockRange
from swarm.errors import InvalidRequest, Overloaded
from swarm.net import bind_server, create_server
from swarm.relay import RelayLimits
from tests.reference import greedy_references
from tests.servers import WAIT_TIMEOUT_S, running

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
NEW_TOKENS = 12


@pytest.fixture
async def dht() -> AsyncIterator[DhtNode]:
    node = DhtNode(host="127.0.0.1", port=0)
    await asyncio.wait_for(node.start(), WAIT_TIMEOUT_S)
    yield node
    await node.stop(grace_s=0)


async def test_check_reachable_dials_back_the_callers_port(dht: DhtNode) -> None:
    server = create_server()
    port = bind_server(server, "127.0.0.1:0")
    await server.start()  # a gRPC server with no services: any gRPC answer counts
    try:
        answer = await check_reachable([dht.address], port)
        assert answer is not None and answer.reachable and answer.observed_address == f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
    answer = await check_reachable([dht.address], port)  # nobody listens there any more
    assert answer is not None and not answer.reachable and "cannot connect" in answer.error


async def test_probe_dials_one_at_a_time_per_ip_and_only_tcp_peers() -> None:
    probe = ReachabilityProbe()
    release = asyncio.Event()

    async def slow_dial(ip: str, port: int, address: str) -> str:
        await release.wait()
        return ""

    probe._dial = slow_dial  # type: ignore[method-assign]
    first = asyncio.create_task(probe.check("ipv4:10.1.2.3:5555", 4000))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="already running"):
        await probe.check("ipv4:10.1.2.3:6666", 4001)
    release.set()
    assert (await first).observed_address == "10.1.2.3:4000"
    with pytest.raises(InvalidRequest):
        await probe.check("unix:/tmp/x", 4000)
    with pytest.raises(InvalidRequest):
        await probe.check("ipv4:10.1.2.3:5555", 0)


def _reference(model_path: Path) -> list[int]:
    return greedy_references(model_path, [PROMPT], NEW_TOKENS)[0]


def _config(model: Path, blocks: tuple[int, int], dht: DhtNode, **extra: object) -> ShardServerConfig:
    return ShardServerConfig(model=str(model), blocks=BlockRange(*blocks), throughput_tps=1.0, network_mbps=1000.0,
                             cache_tokens=1000, initial_peers=(dht.address,), **extra)  # type: ignore[arg-type]  # fmt: skip


async def _generate(dht: DhtNode, model: Path) -> list[int]:
    async with AsyncSwarmClient([dht.address], model) as client:
        out = await client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    return list(out)


async def test_servers_reached_only_through_the_dht_nodes_relay_generate_exactly(tiny_llama: Path) -> None:
    node = DhtNode(host="127.0.0.1", port=0, relay=RelayLimits())
    await asyncio.wait_for(node.start(), WAIT_TIMEOUT_S)
    try:
        async with (
            running(_config(tiny_llama, (0, 2), node, use_relay="always")) as a,
            running(_config(tiny_llama, (2, 4), node, use_relay="always")) as b,
        ):
            for server in (a, b):
                record = server.record
                assert record is not None and not record.reachable and record.relay == node.address
                assert record.address != server.address and record.address in node.relay.attached  # type: ignore[union-attr]
            assert await _generate(node, tiny_llama) == _reference(tiny_llama)
            assert a.servicer is not None and b.record is not None
            assert a.servicer.pusher.peers == [b.record.address]  # a pushed to b at its relayed address
            # every byte of the generation went through the relay (push from a to b included)
            assert all(mux.bytes_in and mux.bytes_out for mux in node.relay.attached.values())  # type: ignore[union-attr]
    finally:
        await node.stop(grace_s=0)


async def test_a_server_with_relay_lends_a_port_when_the_dht_node_does_not(dht: DhtNode, tiny_llama: Path) -> None:
    async with running(_config(tiny_llama, (0, 2), dht, use_relay="never", relay=RelayLimits())) as helper:
        async with running(_config(tiny_llama, (2, 4), dht, use_relay="always")) as relayed:
            record = relayed.record
            assert record is not None and record.relay == helper.address and not record.reachable
            assert await _generate(dht, tiny_llama) == _reference(tiny_llama)


async def test_auto_announces_reachable_servers_directly_and_public_address_wins(tiny_llama: Path) -> None:
    node = DhtNode(host="127.0.0.1", port=0, relay=RelayLimits())
    await asyncio.wait_for(node.start(), WAIT_TIMEOUT_S)
    with socket.socket() as s:  # a port nobody listens on: the "forwarded" port that does not work
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        async with (
            running(_config(tiny_llama, (0, 2), node)) as direct,
            running(_config(tiny_llama, (2, 4), node, public_address=closed)) as forwarded,
        ):
            record = direct.record
            assert record is not None and record.reachable and record.relay == "" and record.address == direct.address
            record = forwarded.record
            assert record is not None and not record.reachable and record.relay == "" and record.address == closed
            assert node.relay is not None and not node.relay.attached
    finally:
        await node.stop(grace_s=0)
