"""A public-swarm DHT on loopback: 50 in-process nodes with signed announcements, forgery attempts, churn
(20% of the nodes die, the bootstrap node among them), client mode, silent expiry, and a datagram fuzzer.

Everything binds 127.0.0.1. Waits are on conditions (node upkeep rounds, a barrier ping, a clock the test
moves); time bounds only catch hangs."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
import umsgpack
from kademlia.node import Node
from kademlia.utils import digest

from dht_node.node import DhtNode
from dht_node.protocol import STORE_BURST, STORE_RATE_PER_S
from dht_node.storage import Entry, Record
from swarm.access import RateLimiter
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import InvalidRequest
from swarm.identity import Identity
from swarm.records import ServerRecord
from tests.integration.dht_support import HANG_S, ManualClock, UdpPeer, fuzz_datagrams, wait_until

T = TypeVar("T")
MODEL = "swarm-test"
# All 50 nodes share one event loop on 2 cores: the reply timeout allows for that loop's queueing delay.
FAST = {"ksize": 8, "alpha": 3, "rpc_timeout_s": 1.5, "republish_period_s": 5.0}
WAVE = 10  # nodes doing their batch lookups at once (each looks up every key concurrently, like BatchGet)


async def bounded(aw: Awaitable[T], timeout_s: float = HANG_S) -> T:
    return await asyncio.wait_for(aw, timeout_s)


def signed(identity: Identity, key: str, value: bytes, expiration: float) -> Record:
    sig = identity.sign(key, identity.peer_id, value, expiration)
    return {identity.peer_id: Entry(value, expiration, identity.public_key, sig)}


def server_value(identity: Identity, start: int, end: int, address: str = "127.0.0.1:9") -> bytes:
    return ServerRecord(peer_id=identity.peer_id, address=address, model_id=MODEL, start=start, end=end).encode()


async def start_nodes(n: int, seed: int, **kwargs: Any) -> list[DhtNode]:
    """Each node joins through a random earlier one, so routing tables are built by lookups, not given."""
    rng = random.Random(seed)
    nodes = [DhtNode(host="127.0.0.1", port=0, **kwargs)]
    await bounded(nodes[0].start())
    for _ in range(1, n):
        node = DhtNode(host="127.0.0.1", port=0, initial_peers=[rng.choice(nodes).address], **kwargs)
        await bounded(node.start())
        nodes.append(node)
    return nodes


async def stop_all(nodes: list[DhtNode]) -> None:
    await bounded(asyncio.gather(*(node.stop(grace_s=0) for node in nodes)))


Miss = tuple[DhtNode, str]  # (node, key) whose lookup did not return exactly the expected sub-keys


async def lookup_misses(pairs: list[Miss], expected: dict[str, dict[str, bytes]]) -> list[Miss]:
    """Run the lookups of `pairs`, WAVE nodes at a time (each node looks up all its keys at once, like
    BatchGet); returns the pairs that missed a sub-key or saw an unexpected one."""
    misses: list[Miss] = []

    async def one(node: DhtNode, keys: list[str]) -> None:
        records = await asyncio.gather(*(node.get(key, timeout_s=10) for key in keys))
        for key, record in zip(keys, records, strict=True):
            if {subkey: entry.value for subkey, entry in record.items()} != expected[key]:
                misses.append((node, key))

    by_node: dict[DhtNode, list[str]] = {}
    for node, key in pairs:
        by_node.setdefault(node, []).append(key)
    batch = list(by_node.items())
    for i in range(0, len(batch), WAVE):
        await bounded(asyncio.gather(*(one(node, keys) for node, keys in batch[i : i + WAVE])))
    return misses


async def everyone_finds(nodes: list[DhtNode], expected: dict[str, dict[str, bytes]]) -> list[str]:
    """Every node looks up every key; returns the misses as readable lines."""
    misses = await lookup_misses([(node, key) for node in nodes for key in expected], expected)
    return [f"{node.address} {key}" for node, key in misses]


async def eventually_everyone_finds(nodes: list[DhtNode], expected: dict[str, dict[str, bytes]]) -> list[str]:
    """everyone_finds, given two republish periods to settle: a store whose crawl met incomplete routing tables
    can land beside the true k closest nodes; republish moves it there, as in any Kademlia (clients re-read the
    DHT periodically, so this bounded delay is what they see). The delay is counted in the nodes' own upkeep
    rounds, not in seconds, so a slow machine gets as many republish chances as a fast one."""
    pairs = await lookup_misses([(node, key) for node in nodes for key in expected], expected)
    if not pairs:
        return []
    print(f"{len(pairs)} lookups missed before republish, e.g. {pairs[0][0].address} {pairs[0][1]}")
    # a record is republished at the first upkeep tick after it is a period old: 2 periods + 1 tick suffice
    rounds = 2 * math.ceil(FAST["republish_period_s"] / nodes[0].upkeep_period_s) + 1
    last_round = min(node.upkeep_rounds for node in nodes) + rounds
    while pairs:
        out_of_rounds = min(node.upkeep_rounds for node in nodes) > last_round  # then this is the last check
        await asyncio.sleep(nodes[0].upkeep_period_s / 2)  # poll at half a tick
        pairs = await lookup_misses(pairs, expected)
        if out_of_rounds:
            break
    return [f"{node.address} {key}" for node, key in pairs]


async def test_fifty_nodes_signed_records_forgery_and_churn() -> None:
    t0 = time.monotonic()
    nodes = await start_nodes(50, seed=1, **FAST)
    extra: list[DhtNode] = []
    client = DhtClient([nodes[7].address])
    try:
        servers = [Identity.generate() for _ in range(4)]  # blocks 0..8, overlapping by one
        expiration = time.time() + 120
        expected: dict[str, dict[str, bytes]] = {}
        for s, identity in enumerate(servers):
            start = 2 * s
            value = server_value(identity, start, start + 3)
            for block in range(start, start + 3):
                key = block_key(MODEL, block)
                expected.setdefault(key, {})[identity.peer_id] = value
                if s % 2:  # half through the gRPC front door, half in-process through different nodes
                    assert await bounded(client.store_signed(identity, key, value, expiration))
                else:
                    assert await bounded(
                        nodes[(s * 11 + block) % 50].store(key, signed(identity, key, value, expiration))
                    )
        assert await eventually_everyone_finds(nodes, expected) == []

        # Forgery: an attacker replaces server 0's announcement of block 0 with its own signature.
        victim, attacker = servers[0], Identity.generate()
        key = block_key(MODEL, 0)
        evil_value = server_value(victim, 0, 3, address="127.0.0.1:6666")
        later = expiration + 60  # a later expiration would win the merge if it were accepted
        forged = {victim.peer_id: Entry(evil_value, later, attacker.public_key,
                                        attacker.sign(key, victim.peer_id, evil_value, later))}  # fmt: skip
        with pytest.raises(InvalidRequest, match="not owned"):
            await bounded(client.store(key, victim.peer_id, evil_value, later, attacker.public_key,
                                       forged[victim.peer_id].signature))  # fmt: skip
        # ... and straight over UDP to every node, bypassing the front door: all of them refuse it.
        dkey = digest(key)
        for node in nodes[1:]:
            contact = Node(node.node.id, "127.0.0.1", node.port)
            wire = {victim.peer_id: list(forged[victim.peer_id])}
            ok, accepted = await bounded(nodes[0].protocol.call_store(contact, dkey, wire, key))
            assert ok and accepted is False
        # A lying node that holds the forgery anyway (its storage was written directly) cannot make others
        # return it: lookups verify the copies they merge.
        liar = nodes[3]
        liar.storage.merge(dkey, forged, key)
        assert all(r.get(victim.peer_id, Entry(b"", 0)).value == expected[key][victim.peer_id]
                   for r in await bounded(asyncio.gather(*(n.get(key) for n in nodes if n is not liar))))  # fmt: skip
        liar.storage.cull()
        liar.storage._slots.pop(dkey, None)  # the liar stops lying, so the checks below test churn only

        # Churn: 20% of the nodes die without a goodbye, the bootstrap node among them.
        rng = random.Random(2)
        dead = [nodes[0], *rng.sample(nodes[1:], 9)]
        await stop_all(dead)
        alive = [n for n in nodes if n not in dead]
        assert await eventually_everyone_finds(alive, expected) == []

        # The bootstrap node is not special: a newcomer joins through any live node and finds everything.
        newcomer = DhtNode(host="127.0.0.1", port=0, initial_peers=[alive[-1].address], **FAST)
        await bounded(newcomer.start())
        extra.append(newcomer)
        assert newcomer.peer_count() > 0
        assert await everyone_finds([newcomer], expected) == []
        print(f"50-node scenario took {time.monotonic() - t0:.1f} s")
    finally:
        await client.close()
        await stop_all([n for n in nodes + extra if not n._stopped])


async def test_silently_dead_server_disappears_once_expired_and_records_outlive_a_holder() -> None:
    # The nodes' wall clock is the test's, so "the dead server's record expires" happens when the test moves the
    # clock, not when a busy machine happens to get there.
    clock = ManualClock()
    ksize = 3
    nodes = await start_nodes(8, seed=3, ksize=ksize, alpha=2, rpc_timeout_s=2.0, republish_period_s=0.5, clock=clock)
    try:
        stays, dies = Identity.generate(), Identity.generate()
        key = block_key(MODEL, 1)
        now = clock()
        await bounded(nodes[1].store(key, signed(stays, key, server_value(stays, 0, 2), now + 3600)))
        await bounded(nodes[2].store(key, signed(dies, key, server_value(dies, 1, 2), now + 30)))
        assert set(await bounded(nodes[5].get(key))) == {stays.peer_id, dies.peer_id}
        # One holder dies: republish (its neighbours notice the silence) brings the key back to k live copies.
        holder = next(n for n in nodes[1:] if n.storage.get_record(digest(key)))
        await bounded(holder.stop(grace_s=0))
        alive = [n for n in nodes if n is not holder]
        await wait_until(
            lambda: sum(bool(n.storage.get_record(digest(key))) for n in alive) >= ksize,
            f"{ksize} live nodes hold the key again",
        )
        clock.advance(60)  # the dead server never refreshed its 30 s announcement
        for node in alive:
            assert set(await bounded(node.get(key))) == {stays.peer_id}
    finally:
        await stop_all(nodes)


async def test_a_record_held_only_by_slow_nodes_is_found_not_reported_missing() -> None:
    """Every holder of a key answers later than its measured round trip (a loaded host: its datagrams are
    handled 0.5 s late) while the other nodes answer at once without a copy. A get must wait for the slow
    holders, and ask them even once they are suspect, rather than end with the prompt empty answers: "nobody
    serves this block" sends clients away."""
    ksize = 3
    nodes = await start_nodes(8, seed=12, ksize=ksize, alpha=2, rpc_timeout_s=5.0)
    try:
        server, key = Identity.generate(), block_key(MODEL, 7)
        assert await bounded(nodes[0].store(key, signed(server, key, server_value(server, 7, 8), time.time() + 3600)))
        holders = [n for n in nodes if n.storage.get_record(digest(key))]
        others = [n for n in nodes if n not in holders]
        assert holders and others
        loop = asyncio.get_running_loop()
        for holder in holders:
            handle = holder.protocol.datagram_received
            holder.protocol.datagram_received = (  # type: ignore[method-assign]
                lambda data, addr, handle=handle: loop.call_later(0.5, handle, data, addr)
            )
        for node in others:
            assert set(await bounded(node.get(key))) == {server.peer_id}, f"{node.address} found no copy"
        assert sum(n.lookup_stats.waited_for_value for n in others) > 0  # they were slow past the lookups' waits
        # Once a lookup gave up waiting on them, the holders are suspect (not asked, not handed out): concurrent
        # lookups must still ask them before answering that the key has no copy.
        for node in others:
            for holder in holders:
                node.protocol.liveness.mark_suspect(("127.0.0.1", holder.port))
        for node in others:
            assert set(await bounded(node.get(key))) == {server.peer_id}, f"{node.address} skipped the suspects"
        assert sum(n.lookup_stats.asked_suspects for n in others) > 0
    finally:
        await stop_all(nodes)


async def test_client_mode_queries_and_stores_but_is_never_a_contact() -> None:
    nodes = await start_nodes(5, seed=4, ksize=4, rpc_timeout_s=0.5)
    client = DhtNode(host="127.0.0.1", port=0, initial_peers=[nodes[2].address], client_mode=True, ksize=4)
    try:
        await bounded(client.start())
        assert client.peer_count() > 0
        server = Identity.generate()
        key = block_key(MODEL, 0)
        assert await bounded(client.store(key, signed(server, key, server_value(server, 0, 1), time.time() + 60))) > 0
        assert len(client.storage) == 0
        assert server.peer_id in await bounded(nodes[0].get(key))
        assert server.peer_id in await bounded(client.get(key))
        for node in nodes:
            contacts = [c for bucket in node.protocol.router.buckets for c in bucket.get_nodes()]
            assert all(c.port != client.port for c in contacts)
    finally:
        await stop_all([*nodes, client])


async def test_fuzzed_node_keeps_answering_and_storage_caps_hold() -> None:
    max_keys = 50
    nodes = await start_nodes(3, seed=5, ksize=3, rpc_timeout_s=2.0, max_keys=max_keys)
    target = nodes[1]
    fuzzer = await UdpPeer.open()
    try:
        for i, data in enumerate(fuzz_datagrams(random.Random(6), 6000, MODEL)):
            fuzzer.send(data, target.port)
            if i % 20 == 19:
                await fuzzer.barrier(target.port)  # everything so far was read: no fuzz lost in a full buffer
        await fuzzer.barrier(target.port)
        assert len(target.storage) == 0, "a fuzzed store was accepted"
        # Stores are rate-limited per IP, and on loopback the fuzzer and the honest nodes share one: the honest
        # part of the test starts with a fresh bucket.
        target.protocol.throttle = RateLimiter(STORE_RATE_PER_S, STORE_BURST)
        # Still a working member: UDP ping, signed store and lookup through it.
        ok, _ = await bounded(nodes[0].protocol.call_ping(Node(target.node.id, "127.0.0.1", target.port)))
        assert ok
        server = Identity.generate()
        key = block_key(MODEL, 3)
        value = server_value(server, 3, 4)
        assert await bounded(target.store(key, signed(server, key, value, time.time() + 60))) > 0
        assert (await bounded(nodes[2].get(key)))[server.peer_id].value == value
        assert set(target.storage.get_record(digest(key))) == {server.peer_id}  # no fuzzed entry sneaked in

        # A flood of valid signed records over the key cap: the node keeps the keys it had and the first ones
        # that fit, and refuses the rest (an attacker cannot push out honest records).
        flooder = Identity.generate()
        first, count = 100, 2 * max_keys
        flood_value = server_value(flooder, first, first + count)
        contact = Node(target.node.id, "127.0.0.1", target.port)
        held_before = {k for k, _ in target.storage}
        room = max_keys - len(held_before)
        keys = [block_key(MODEL, b) for b in range(first, first + count)]
        replies = []
        for k in keys:
            record = signed(flooder, k, flood_value, time.time() + 60)
            wire = {sub: list(entry) for sub, entry in record.items()}
            replies.append(await bounded(nodes[0].protocol.call_store(contact, digest(k), wire, k)))
        assert all(ok for ok, _ in replies)
        assert [accepted for _, accepted in replies] == [True] * room + [False] * (count - room)
        assert {k for k, _ in target.storage} == held_before | {digest(k) for k in keys[:room]}
        assert target.storage.total_bytes <= target.storage.limits.max_total_bytes
        assert set(target.storage.get_record(digest(key))) == {server.peer_id}  # the honest record survived
    finally:
        fuzzer.close()
        await stop_all(nodes)


async def test_store_flood_from_one_address_is_throttled() -> None:
    nodes = await start_nodes(2, seed=7, ksize=2, rpc_timeout_s=2.0)
    flooder = await UdpPeer.open()
    try:
        target = nodes[1]
        rate, burst = 10.0, 20.0  # a small bucket so the flood overflows it even if the kernel drops part of it
        target.protocol.throttle = RateLimiter(rate_per_s=rate, burst=burst)
        name = block_key(MODEL, 0)
        msg_id = b"m" * 20
        data = (
            b"\x00"
            + msg_id
            + umsgpack.packb(["store", [b"n" * 20, digest(name), {"s": [b"{}", time.time() + 60]}, name]])
        )
        t0 = time.monotonic()
        for _ in range(3000):
            flooder.send(data, target.port)
        await flooder.barrier(target.port)
        elapsed = time.monotonic() - t0
        # A store that passes the throttle is answered (here: refused, it is unsigned); a throttled one is not.
        answered = sum(d.startswith(b"\x01" + msg_id) for d in flooder.received)
        assert target.protocol.throttle.dropped > 0
        assert answered <= burst + rate * elapsed + 1  # the bucket's promise, however long the flood took
        assert answered + target.protocol.throttle.dropped <= 3000
        assert len(target.storage) == 0
        ok, _ = await bounded(nodes[0].protocol.call_ping(Node(target.node.id, "127.0.0.1", target.port)))
        assert ok
    finally:
        flooder.close()
        await stop_all(nodes)
