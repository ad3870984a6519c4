"""In-process DhtNodes on loopback (small k, so lookups take several hops), driven through the gRPC service
with swarm.dht_client.DhtClient, as shard servers and clients use it."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kademlia.utils import digest

from dht_node.node import DhtNode
from swarm.dht_client import DhtClient as _DhtClient
from swarm.errors import InvalidRequest
from swarm.pb import dht_pb2, dht_pb2_grpc
from tests.integration.dht_support import HANG_S, ManualClock, UdpPeer, garbage_datagrams, wait_until

T = TypeVar("T")
N_NODES = 6
KSIZE = 3  # fewer replicas than nodes: every lookup has to find the holders
DEADLINE_S = HANG_S  # every await is bounded so that a hang fails; no test depends on speed
SOON = time.time() + 3600  # a valid expiration for the parametrized bad requests


async def bounded(aw: Awaitable[T], timeout_s: float = DEADLINE_S) -> T:
    return await asyncio.wait_for(aw, timeout_s)


async def start_swarm(n: int, mesh: bool = False, **kwargs: Any) -> list[DhtNode]:
    """A chain (each node joins through the previous one, so no node starts out knowing everyone), or with
    `mesh` each node joins through all earlier ones, so every routing table is complete. These tests store
    plain sub-keys; signed records and the strict default are covered in test_dht_swarm.py."""
    kwargs.setdefault("require_signatures", False)
    first = DhtNode(host="127.0.0.1", port=0, **kwargs)
    await bounded(first.start())
    nodes = [first]
    for i in range(1, n):
        peers = [node.address for node in nodes] if mesh else [nodes[i - 1].address]
        node = DhtNode(host="127.0.0.1", port=0, initial_peers=peers, **kwargs)
        await bounded(node.start())
        nodes.append(node)
    return nodes


async def stop_all(nodes: list[DhtNode]) -> None:
    await bounded(asyncio.gather(*(node.stop(grace_s=0) for node in nodes)))


@pytest_asyncio.fixture(scope="module")
async def swarm() -> AsyncIterator[list[DhtNode]]:
    # nobody dies in this swarm: a generous timeout keeps a loaded CI machine from "killing" live nodes
    nodes = await start_swarm(N_NODES, ksize=KSIZE, alpha=2, rpc_timeout_s=2.0)
    yield nodes
    await stop_all(nodes)


@pytest_asyncio.fixture
async def clients(swarm: list[DhtNode]) -> AsyncIterator[list[_DhtClient]]:
    """One single-address client per node, so each call is answered by that very node."""
    out = [DhtClient([node.address], timeout_s=5.0) for node in swarm]
    yield out
    await bounded(asyncio.gather(*(c.close() for c in out)))


def DhtClient(addresses: list[str], timeout_s: float = 5.0) -> _DhtClient:  # noqa: N802 - stands in for the class
    """These tests store plain sub-keys on `require_signatures=False` nodes: the client must return them too."""
    return _DhtClient(addresses, timeout_s, allow_unsigned=True)


def unique(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


async def test_ping_and_same_port_for_udp_and_grpc(swarm: list[DhtNode], clients: list[_DhtClient]) -> None:
    reply = await bounded(clients[2].ping())
    assert reply.address == swarm[2].address
    assert reply.node_id == swarm[2].node_id and len(reply.node_id) == 40
    assert reply.peers >= 1
    assert reply.version
    udp_port = swarm[2].protocol.transport.get_extra_info("sockname")[1]
    assert swarm[2].address == f"127.0.0.1:{udp_port}"


async def test_record_stored_via_one_node_is_found_at_every_node(
    swarm: list[DhtNode], clients: list[_DhtClient]
) -> None:
    key = unique("model.block.7")
    expiration = time.time() + 60
    assert await bounded(clients[1].store(key, "peer-a", b"hello", expiration))
    holders = sum(1 for node in swarm if node.storage.get_record(digest(key)))
    assert 1 <= holders <= KSIZE + 1
    latencies = []
    for client in clients:
        t0 = time.perf_counter()
        record = await bounded(client.get(key))
        latencies.append(time.perf_counter() - t0)
        assert record["peer-a"].value == b"hello"
        assert record["peer-a"].expiration == pytest.approx(expiration)
    print(f"get over {N_NODES} nodes (k={KSIZE}): median {statistics.median(latencies) * 1e3:.1f} ms")


async def test_store_reports_replicas(swarm: list[DhtNode]) -> None:
    item = dht_pb2.SubkeyValue(subkey="s", value=b"v", expiration=time.time() + 30)
    async with grpc.aio.insecure_channel(swarm[0].address) as channel:
        stub = dht_pb2_grpc.DhtStub(channel)
        reply = await bounded(stub.Store(dht_pb2.StoreRequest(key=unique("replicas"), items=[item]), timeout=5))
    assert reply.stored
    assert 1 <= reply.replicas <= KSIZE


async def test_subkeys_written_through_different_nodes_merge(swarm: list[DhtNode], clients: list[_DhtClient]) -> None:
    key = unique("merge")
    expiration = time.time() + 60
    await bounded(asyncio.gather(*(c.store(key, f"peer-{i}", b"%d" % i, expiration) for i, c in enumerate(clients))))
    for client in clients:
        record = await bounded(client.get(key))
        assert {sk: e.value for sk, e in record.items()} == {f"peer-{i}": b"%d" % i for i in range(N_NODES)}


async def test_later_expiration_wins_across_nodes(clients: list[_DhtClient]) -> None:
    key = unique("newer")
    now = time.time()
    await bounded(clients[0].store(key, "s", b"newer", now + 60))
    await bounded(clients[3].store(key, "s", b"older", now + 30))
    for client in clients:
        assert (await bounded(client.get(key)))["s"].value == b"newer"
    await bounded(clients[5].store(key, "s", b"newest", now + 90))
    for client in clients:
        assert (await bounded(client.get(key)))["s"].value == b"newest"


async def test_expired_subkeys_vanish() -> None:
    # The nodes' clock is the test's: "short" expires when the clock is moved past it, however slow the machine.
    clock = ManualClock()
    nodes = await start_swarm(4, ksize=2, alpha=2, rpc_timeout_s=2.0, clock=clock)
    clients = [DhtClient([node.address]) for node in nodes]
    try:
        key = unique("expiry")
        now = clock()
        await bounded(clients[0].store(key, "short", b"s", now + 60))
        await bounded(clients[0].store(key, "long", b"l", now + 3600))
        for client in clients:
            assert set(await bounded(client.get(key))) == {"short", "long"}
        clock.advance(61)
        for client in clients:
            assert set(await bounded(client.get(key))) == {"long"}
        held = [node for node in nodes if node.storage.get_record(digest(key))]
        assert held and all(set(node.storage.get_record(digest(key))) == {"long"} for node in held)
    finally:
        await bounded(asyncio.gather(*(c.close() for c in clients)))
        await stop_all(nodes)


async def test_batch_get_keeps_request_order(clients: list[_DhtClient]) -> None:
    keys = [unique(f"batch{i}") for i in range(5)]
    expiration = time.time() + 60
    for i, key in enumerate(keys):
        if i != 2:  # keys[2] stays missing
            await bounded(clients[i % len(clients)].store(key, "s", key.encode(), expiration))
    query = [keys[4], keys[2], keys[0], keys[3], keys[1], keys[0]]
    records = await bounded(clients[5].batch_get(query))
    assert [r["s"].value.decode() if r else None for r in records] == [
        keys[4],
        None,
        keys[0],
        keys[3],
        keys[1],
        keys[0],
    ]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (dht_pb2.StoreRequest(key="", items=[dht_pb2.SubkeyValue(subkey="s", value=b"v", expiration=SOON)]), "key"),
        (dht_pb2.StoreRequest(key="k"), "at least one item"),
        (dht_pb2.StoreRequest(key="k", items=[dht_pb2.SubkeyValue(subkey="", value=b"v", expiration=SOON)]), "sub-key"),
        (dht_pb2.StoreRequest(key="k", items=[dht_pb2.SubkeyValue(subkey="s", value=b"v", expiration=1.0)]), "future"),
        (dht_pb2.StoreRequest(key="k", items=[dht_pb2.SubkeyValue(subkey="s", value=b"v", expiration=1e15)]), "ahead"),
        (
            dht_pb2.StoreRequest(key="k", items=[dht_pb2.SubkeyValue(subkey="s", value=b"x" * 5000, expiration=SOON)]),
            "max-value-bytes",
        ),
        (
            dht_pb2.StoreRequest(
                key="k", items=[dht_pb2.SubkeyValue(subkey="s", value=b"v", expiration=SOON) for _ in range(2)]
            ),
            "twice",
        ),
    ],
)
async def test_malformed_store_is_invalid_argument_and_node_keeps_serving(
    swarm: list[DhtNode], clients: list[_DhtClient], request_: dht_pb2.StoreRequest, message: str
) -> None:
    async with grpc.aio.insecure_channel(swarm[1].address) as channel:
        stub = dht_pb2_grpc.DhtStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bounded(stub.Store(request_, timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (info.value.details() or "")
    key = unique("after-bad-store")
    await bounded(clients[1].store(key, "s", b"ok", time.time() + 30))
    assert (await bounded(clients[2].get(key)))["s"].value == b"ok"


async def test_bad_gets_are_invalid_argument(clients: list[_DhtClient]) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        await bounded(clients[0].get(""))
    with pytest.raises(InvalidRequest, match="at most"):
        await bounded(clients[0].batch_get([f"k{i}" for i in range(1000)]))


async def test_garbage_datagrams_do_not_break_a_node(swarm: list[DhtNode], clients: list[_DhtClient]) -> None:
    victim = swarm[3]
    peers_before = victim.peer_count()
    peer = await UdpPeer.open()
    try:
        for i, datagram in enumerate(garbage_datagrams(random.Random(0), victim.node.id)):
            peer.send(datagram, victim.port)
            if i % 20 == 19:
                await peer.barrier(victim.port)  # the node has read everything so far: its buffer never overflows
        await peer.barrier(victim.port)
    finally:
        peer.close()
    # nothing the garbage said made its sender a contact, and none of its stores landed
    assert victim.peer_count() == peers_before
    assert all(n.port != peer.port for b in victim.protocol.router.buckets for n in b.get_nodes())
    assert not victim.storage.get_record(b"k" * 20)
    key = unique("after-garbage")
    await bounded(clients[3].store(key, "s", b"still here", time.time() + 30))
    for client in clients:
        assert (await bounded(client.get(key)))["s"].value == b"still here"
    assert (await bounded(clients[3].ping())).peers >= 1


async def test_taken_port_is_a_clear_error() -> None:
    with socket.socket() as tcp:  # TCP taken, UDP free: the node must not end up on two port numbers
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        node = DhtNode(host="127.0.0.1", port=tcp.getsockname()[1])
        with pytest.raises(OSError, match="cannot bind gRPC"):
            await bounded(node.start())
        await node.stop()


def test_config_validates_peers_and_limits() -> None:
    assert DhtNode(initial_peers="127.0.0.1:1,127.0.0.1:2").config.initial_peers == ("127.0.0.1:1", "127.0.0.1:2")
    with pytest.raises(ValueError, match="HOST:PORT"):
        DhtNode(initial_peers=["nohost"])
    with pytest.raises(ValueError, match="8 KiB"):
        DhtNode(max_value_bytes=10_000)


async def test_client_fails_over_when_the_first_node_is_dead(swarm: list[DhtNode]) -> None:
    with socket.socket() as s:  # a port on loopback that nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = DhtClient([dead, swarm[4].address], timeout_s=2.0)
    try:
        key = unique("failover")
        assert await bounded(client.store(key, "s", b"v", time.time() + 30))
        assert (await bounded(client.get(key)))["s"].value == b"v"
        assert (await bounded(client.ping())).address == swarm[4].address
    finally:
        await client.close()


async def test_speed_test_never_amplifies_and_measures(swarm: list[DhtNode]) -> None:
    async with grpc.aio.insecure_channel(swarm[1].address) as channel:
        stub = dht_pb2_grpc.DhtStub(channel)
        reply = await bounded(stub.SpeedTest(dht_pb2.SpeedTestRequest(payload=b"x" * 1000, reply_bytes=10**6)))
        assert reply.received_bytes == 1000 and len(reply.payload) == 1000  # clamped to what was sent
        reply = await bounded(stub.SpeedTest(dht_pb2.SpeedTestRequest(payload=b"x" * 1000, reply_bytes=10)))
        assert len(reply.payload) == 10
    client = DhtClient([swarm[1].address])
    try:
        mbps = await bounded(client.measure_mbps(payload_bytes=256 * 1024, rounds=2))
        assert 0 < mbps < float("inf")  # a measurement, not a speed requirement (the machine may be busy)
    finally:
        await client.close()


async def test_health_and_reflection_services(swarm: list[DhtNode]) -> None:
    async with grpc.aio.insecure_channel(swarm[0].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await bounded(health.Check(health_pb2.HealthCheckRequest(service="pollen.v1.Dht"), timeout=5))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = []
        async for response in call:
            names += [s.name for s in response.list_services_response.service]
        assert "pollen.v1.Dht" in names and "grpc.health.v1.Health" in names


async def test_records_survive_churn_through_republish() -> None:
    # k=2 of 5 nodes: stop every original holder; the record lives on only if republish moved it. Complete
    # routing tables (mesh) make the lookup's success depend on republish alone, not on who knows whom.
    nodes = await start_swarm(5, mesh=True, ksize=2, alpha=2, rpc_timeout_s=2.0, republish_period_s=0.3)
    clients: list[_DhtClient] = []
    try:
        key = unique("churn")
        clients.append(DhtClient([nodes[0].address]))
        await bounded(clients[0].store(key, "s", b"survivor", time.time() + 3600))
        holders = [n for n in nodes if n.storage.get_record(digest(key))]
        others = [n for n in nodes if n not in holders]
        assert 1 <= len(holders) <= 2
        for node in holders[1:]:
            await bounded(node.stop(grace_s=0))
        await wait_until(
            lambda: any(n.storage.get_record(digest(key)) for n in others), "republish copied the record elsewhere"
        )
        await bounded(holders[0].stop(grace_s=0))
        # Every original holder is gone: the record lives only where republish put it. The survivors' own
        # republish then brings it to the k nodes now closest to the key, where every lookup converges.
        readers = [DhtClient([node.address]) for node in others]
        clients += readers

        async def everyone_reads_it() -> bool:
            records = await bounded(asyncio.gather(*(reader.get(key) for reader in readers)))
            return all(r.get("s") is not None and r["s"].value == b"survivor" for r in records)

        await wait_until(everyone_reads_it, "every remaining node finds the record")
    finally:
        await bounded(asyncio.gather(*(c.close() for c in clients)))
        await stop_all(nodes)


async def test_late_joiner_receives_records_it_is_close_to() -> None:
    nodes = await start_swarm(3, ksize=2, alpha=2, rpc_timeout_s=2.0)
    client = DhtClient([nodes[0].address])
    try:
        keys = [unique(f"late{i}") for i in range(20)]
        for key in keys:
            await bounded(client.store(key, "s", b"v", time.time() + 60))
        late = DhtNode(host="127.0.0.1", port=0, initial_peers=[nodes[2].address], ksize=2, rpc_timeout_s=2.0,
                       require_signatures=False)  # fmt: skip
        await bounded(late.start())
        nodes.append(late)
        # with 20 keys and k=2 of 4 nodes it is among the closest of some
        await wait_until(lambda: len(late.storage) > 0, "the late joiner got a record handed over")
        async with grpc.aio.insecure_channel(late.address) as channel:
            reply = await bounded(dht_pb2_grpc.DhtStub(channel).BatchGet(dht_pb2.BatchGetRequest(keys=keys), timeout=5))
        assert all(len(r.items) == 1 for r in reply.records)
    finally:
        await client.close()
        await stop_all(nodes)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_addresses_work_end_to_end() -> None:
    """Bracketed "[::1]:PORT" addresses: joining, the gRPC front door and the client all parse them alike."""
    first = DhtNode(host="::1", port=0, require_signatures=False)
    await bounded(first.start())
    nodes = [first]
    client = None
    try:
        second = DhtNode(host="::1", port=0, initial_peers=[first.address], require_signatures=False)
        nodes.append(second)
        await bounded(second.start())
        assert first.address == f"[::1]:{first.port}" and second.peer_count() == 1
        client = DhtClient([second.address, first.address])
        key = unique("v6")
        assert await bounded(client.store(key, "s", b"six", time.time() + 60))
        assert (await bounded(first.get(key)))["s"].value == b"six"
    finally:
        if client is not None:
            await client.close()
        await stop_all(nodes)
