"""Lookups right after churn, in-process (the real-process version with latency percentiles is
bench/bench_dht_churn.py): 30 nodes, 20 signed records, 6 nodes gone without a goodbye (the bootstrap node
among them). Each dead node's UDP port is taken over by a black hole that counts what it receives and never
answers, as the port of a SIGKILLed process would.

No wall-clock promise is tested, only what the lookups waited for and whom they asked: the rpc timeout is long
(a lookup that waits for one dead contact takes at least that long), so "every get returned before the rpc
timeout" means no get waited for a dead contact's timeout, and the lookups' own counts say that none waited
past a contact's measured round trip either. After the nodes' own upkeep has run, the black holes receive
nothing at all: nobody asks the dead, and nobody hands them out."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from typing import TypeVar

from kademlia.node import Node
from kademlia.utils import digest

from dht_node.crawl import LookupStats
from dht_node.node import DhtNode
from dht_node.storage import Entry
from swarm.blocks import block_key
from swarm.identity import Identity
from swarm.records import ServerRecord
from tests.integration.dht_support import HANG_S, UdpPeer, wait_until

T = TypeVar("T")
MODEL = "churn-test"
N_NODES, N_RECORDS, N_DEAD = 30, 20, 6
RPC_TIMEOUT_S = 10.0  # a contact is declared dead after this; lookups must never wait that long
CONFIG = {"ksize": 8, "alpha": 3, "rpc_timeout_s": RPC_TIMEOUT_S, "republish_period_s": 4.0}
WAVE = 4  # nodes doing their batch of lookups at once


async def bounded(aw: Awaitable[T], timeout_s: float = HANG_S) -> T:
    return await asyncio.wait_for(aw, timeout_s)


async def read_everything(nodes: list[DhtNode], expected: dict[str, str]) -> tuple[list[str], list[float]]:
    """Every node looks up every key (a wave at a time, each node all its keys at once, like BatchGet);
    returns the misses and the duration of every get."""
    misses: list[str] = []
    durations: list[float] = []

    async def timed_get(node: DhtNode, key: str) -> None:
        t0 = time.monotonic()
        record = await node.get(key, timeout_s=HANG_S)
        durations.append(time.monotonic() - t0)
        if expected[key] not in record:
            misses.append(f"{node.address} {key}")

    for i in range(0, len(nodes), WAVE):
        await bounded(asyncio.gather(*(timed_get(n, k) for n in nodes[i : i + WAVE] for k in expected)))
    return misses, durations


async def test_lookups_after_churn_wait_for_no_dead_contact_and_forget_the_dead() -> None:
    rng = random.Random(11)
    nodes = [DhtNode(host="127.0.0.1", port=0, **CONFIG)]
    await bounded(nodes[0].start())
    for _ in range(1, N_NODES):
        node = DhtNode(host="127.0.0.1", port=0, initial_peers=[rng.choice(nodes).address], **CONFIG)
        await bounded(node.start())
        nodes.append(node)
    holes: list[UdpPeer] = []
    try:
        expected = {}
        expiration = time.time() + 3600
        for i in range(N_RECORDS):
            server, key = Identity.generate(), block_key(MODEL, i)
            value = ServerRecord(peer_id=server.peer_id, address="127.0.0.1:9", model_id=MODEL, start=i,
                                 end=i + 1).encode()  # fmt: skip
            record = {server.peer_id: Entry(value, expiration, server.public_key,
                                            server.sign(key, server.peer_id, value, expiration))}  # fmt: skip
            assert await bounded(rng.choice(nodes).store(key, record)) > 0
            expected[key] = server.peer_id
        assert (await read_everything(nodes, expected))[0] == []

        dead = [nodes[0], *rng.sample(nodes[1:], N_DEAD - 1)]
        alive = [n for n in nodes if n not in dead]
        await bounded(asyncio.gather(*(n.stop(grace_s=0) for n in dead)))
        holes = [await UdpPeer.open(port=n.port) for n in dead]

        # Right after the kill: every record is found, and no get waited for a dead contact's timeout.
        before = LookupStats()
        for node in alive:
            before.add(node.lookup_stats)
        misses, durations = await read_everything(alive, expected)
        after = LookupStats()
        for node in alive:
            after.add(node.lookup_stats)
        received = sum(len(h.received) for h in holes)
        print(f"wave 1: {len(durations)} gets, slowest {max(durations):.2f} s; {received} datagrams to the dead; "
              f"lookups: {after.sent - before.sent} requests, {after.slow - before.slow} not waited for")  # fmt: skip
        assert misses == []
        assert max(durations) < RPC_TIMEOUT_S, "a get waited for a dead contact's rpc timeout"
        assert after.waited_on_slow == before.waited_on_slow, "a lookup waited on a request past its round trip"
        assert received > 0 and after.slow > before.slow  # the dead were asked (still in tables), not waited for

        # The survivors' upkeep pings contacts that went silent and drops those that never answer.
        for node in alive:
            node.stale_after_s = 1.0
        dead_ports = {n.port for n in dead}

        def nobody_knows_the_dead() -> bool:
            return not any(c.port in dead_ports for n in alive for c in n.protocol.router.contacts())

        await wait_until(nobody_knows_the_dead, "every survivor dropped every dead contact")
        for hole in holes:
            hole.received.clear()
        misses, durations = await read_everything(alive, expected)
        print(f"wave 2: {len(durations)} gets, slowest {max(durations):.2f} s")
        assert misses == []
        assert sum(len(h.received) for h in holes) == 0, "a dead contact was asked again or handed out"
        # and no survivor hands one out to others
        for node in alive:
            for key in expected:
                assert not {c.port for c in node.protocol.live_neighbors(Node(digest(key)))} & dead_ports
    finally:
        for hole in holes:
            hole.close()
        await bounded(asyncio.gather(*(n.stop(grace_s=0) for n in nodes if not n._stopped)))
