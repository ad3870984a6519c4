"""A dht-node's UDP port as an attacker sees it: forged source addresses (amplification, stores handed to an
address that never answered), per-IP limits that a new source port does not reset, and a lying node that
tries to feed clients records nobody signed.

Raw datagrams come from UdpPeer sockets in the test's loop; `barrier()` proves a node handled everything sent
before it, so no test sleeps."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import umsgpack
from kademlia.utils import digest

from dht_node.node import DhtNode
from dht_node.protocol import CLIENT_ID
from dht_node.storage import Entry, Record
from dht_node.wire import REQUEST, RESPONSE, RETRY
from swarm.access import RateLimiter
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.identity import Identity
from swarm.records import ServerRecord, decode_server_records
from tests.integration.dht_support import HANG_S, UdpPeer, wait_until

T = TypeVar("T")
MODEL = "trust-test"
KEY = block_key(MODEL, 0)


async def bounded(aw: Awaitable[T], timeout_s: float = HANG_S) -> T:
    return await asyncio.wait_for(aw, timeout_s)


def signed(identity: Identity, key: str, expiration: float, address: str = "127.0.0.1:9") -> Record:
    value = ServerRecord(peer_id=identity.peer_id, address=address, model_id=MODEL, start=0, end=1).encode()
    signature = identity.sign(key, identity.peer_id, value, expiration)
    return {identity.peer_id: Entry(value, expiration, identity.public_key, signature)}


def request(name: str, *args: Any, token: bytes | None = None) -> bytes:
    return REQUEST + os.urandom(20) + umsgpack.packb([name, list(args), *([token] if token else [])])


def replies_to(peer: UdpPeer, datagram: bytes) -> list[bytes]:
    msg_id = datagram[1:21]
    return [d for d in peer.received if d[1:21] == msg_id and d[:1] in (RESPONSE, RETRY)]


@pytest_asyncio.fixture(scope="module")
async def swarm() -> AsyncIterator[list[DhtNode]]:
    """Eight nodes, eight servers' signed records under one key: a find_value reply of several KB."""
    nodes = [DhtNode(host="127.0.0.1", port=0, ksize=8, rpc_timeout_s=2.0)]
    await bounded(nodes[0].start())
    for _ in range(7):
        node = DhtNode(host="127.0.0.1", port=0, ksize=8, rpc_timeout_s=2.0, initial_peers=[nodes[0].address])
        await bounded(node.start())
        nodes.append(node)
    expiration = time.time() + 3600
    for _ in range(8):
        assert await bounded(nodes[1].store(KEY, signed(Identity.generate(), KEY, expiration))) > 0
    yield nodes
    await bounded(asyncio.gather(*(n.stop(grace_s=0) for n in nodes)))


@pytest.mark.parametrize("node_id", [os.urandom(20), CLIENT_ID], ids=["node-id", "client"])
@pytest.mark.parametrize("rpc", ["find_value", "find_node"])
async def test_a_forged_source_gets_at_most_three_times_its_request(
    swarm: list[DhtNode], rpc: str, node_id: bytes
) -> None:
    target = swarm[0]
    assert target.storage.get_record(digest(KEY)), "the record must be held here for a big reply"
    peer = await UdpPeer.open()
    try:
        datagram = request(rpc, node_id, digest(KEY))
        peer.send(datagram, target.port)
        await peer.barrier(target.port)
        first = replies_to(peer, datagram)
        out = sum(map(len, first))
        print(f"{rpc} from an unproven address: {len(datagram)} B in, {out} B out ({out / len(datagram):.1f}x)")
        assert out <= 3 * len(datagram)
        # What came back is a token: repeating the request with it proves the address receives our datagrams,
        # and only then does the full answer go there.
        assert len(first) == 1 and first[0][:1] == RETRY
        again = request(rpc, node_id, digest(KEY), token=first[0][21:])
        peer.send(again, target.port)
        await peer.barrier(target.port)
        full = replies_to(peer, again)
        assert len(full) == 1 and full[0][:1] == RESPONSE
        reply = umsgpack.unpackb(full[0][21:])
        assert len(reply["nodes"] if rpc == "find_value" else reply) > 0
        if rpc == "find_value":
            assert len(reply["value"]) == 8
        # a token is bound to its address: another port of the same host cannot use it
        other = await UdpPeer.open()
        try:
            stolen = request(rpc, node_id, digest(KEY), token=first[0][21:])
            other.send(stolen, target.port)
            await other.barrier(target.port)
            assert [d[:1] for d in replies_to(other, stolen)] == [RETRY]
        finally:
            other.close()
    finally:
        peer.close()


async def test_stores_to_a_newcomer_wait_for_its_round_trip(swarm: list[DhtNode]) -> None:
    """A ping that claims a node id close to a held key, from an address that never answers, gets no store.
    The nodes ping that address instead; once it answers with the id it claimed, the stores come."""
    holders = [n for n in swarm if n.storage.get_record(digest(KEY))]
    peer = await UdpPeer.open()
    try:
        claimed = bytes(a ^ b for a, b in zip(digest(KEY), b"\x00" * 19 + b"\x01", strict=True))  # next to the key
        for node in holders:
            peer.send(request("ping", claimed), node.port)
        for node in holders:
            await peer.barrier(node.port)

        def pings_from_nodes() -> list[bytes]:
            return [d for d in peer.received if d[:1] == REQUEST and umsgpack.unpackb(d[21:])[0] == "ping"]

        await wait_until(lambda: len(pings_from_nodes()) >= len(holders), "every holder pinged the claimed address")
        assert not [d for d in peer.received if d[:1] == REQUEST and umsgpack.unpackb(d[21:])[0] == "store"]
        # Now behave as the node we claimed to be: answer every ping with that id (and, as a live newcomer keeps
        # talking, claim it again now and then: on a loaded machine a ping may have timed out before our answer
        # was read, and the node then waits for us to speak). The holder closest to the key hands us the record.
        answered: set[bytes] = set()
        last_claim = time.monotonic()

        def act_as_the_claimed_node() -> bool:
            nonlocal last_claim
            for ping in pings_from_nodes():
                if ping[1:21] not in answered:
                    answered.add(ping[1:21])
                    peer.transport.sendto(RESPONSE + ping[1:21] + umsgpack.packb(claimed), peer.source_of(ping))
            stored = [d for d in peer.received if d[:1] == REQUEST and umsgpack.unpackb(d[21:])[0] == "store"]
            if not stored and time.monotonic() - last_claim > 3.0:
                last_claim = time.monotonic()
                for node in holders:
                    peer.send(request("ping", claimed), node.port)
            return bool(stored)

        await wait_until(act_as_the_claimed_node, "the proven newcomer got the record")
    finally:
        peer.close()


async def test_store_limit_is_per_ip_whatever_the_source_port(swarm: list[DhtNode]) -> None:
    target = swarm[2]
    rate, burst = 1.0, 10.0
    saved = target.protocol.throttle
    target.protocol.throttle = RateLimiter(rate_per_s=rate, burst=burst)
    peers = [await UdpPeer.open() for _ in range(5)]  # five source ports, one IP
    try:
        t0 = time.monotonic()
        sent = []
        for peer in peers:
            for _ in range(10):  # each port alone stays within the burst
                datagram = request("store", b"n" * 20, digest(KEY), {"s": [b"{}", time.time() + 60]}, KEY)
                sent.append((peer, datagram))
                peer.send(datagram, target.port)
            await peer.barrier(target.port)
        elapsed = time.monotonic() - t0
        answered = sum(bool(replies_to(peer, d)) for peer, d in sent)
        assert answered <= burst + rate * elapsed + 1, "a new source port must not reset the store budget"
        assert target.protocol.throttle.dropped >= len(sent) - answered > 0
    finally:
        target.protocol.throttle = saved
        for peer in peers:
            peer.close()


async def test_request_rate_is_limited_per_ip(swarm: list[DhtNode]) -> None:
    target = swarm[3]
    saved = target.protocol.request_limiter
    target.protocol.request_limiter = RateLimiter(rate_per_s=1.0, burst=20.0)
    peer, witness = await UdpPeer.open(), await UdpPeer.open("127.0.0.2")  # the witness has its own IP
    try:
        t0 = time.monotonic()
        flood = [request("find_node", CLIENT_ID, os.urandom(20)) for _ in range(200)]
        for datagram in flood:
            peer.send(datagram, target.port)
        await witness.barrier(target.port)  # the node has read the flood (the witness is not throttled)
        elapsed = time.monotonic() - t0
        answered = sum(bool(replies_to(peer, d)) for d in flood)
        assert answered <= 20 + elapsed + 1
        assert target.protocol.requests_throttled >= 200 - answered - 5  # the kernel may drop a few of a burst
    finally:
        target.protocol.request_limiter = saved
        peer.close()
        witness.close()


async def test_a_lying_node_cannot_feed_a_client_unsigned_or_foreign_records() -> None:
    """The node a client asks wrote records into its own storage: plain sub-keys naming a real server, and a
    record signed by someone else that names that server. The client sees neither."""
    liar = DhtNode(host="127.0.0.1", port=0, require_signatures=False)
    await bounded(liar.start())
    client = DhtClient([liar.address])
    try:
        victim, mallory = Identity.generate(), Identity.generate()
        expiration = time.time() + 600
        evil = ServerRecord(peer_id=victim.peer_id, address="6.6.6.6:1", model_id=MODEL, start=0, end=1).encode()
        forged: Record = {
            "mallory": Entry(evil, expiration),  # plain sub-key, does not look like a peer id
            victim.peer_id: Entry(evil, expiration),  # the victim's own sub-key, unsigned
            mallory.peer_id: Entry(
                evil, expiration, mallory.public_key, mallory.sign(KEY, mallory.peer_id, evil, expiration)
            ),  # fmt: skip
        }
        liar.storage.merge(digest(KEY), forged, KEY)
        honest = signed(victim, KEY, expiration)
        liar.storage.merge(digest(KEY), {victim.peer_id + "x": next(iter(honest.values()))}, KEY)  # misfiled
        record = await bounded(client.get(KEY))
        assert "mallory" not in record and victim.peer_id not in record
        assert decode_server_records(KEY, record) == {}
        (batch,) = await bounded(client.batch_get([KEY]))
        assert decode_server_records(KEY, batch) == {}
    finally:
        await client.close()
        await bounded(liar.stop(grace_s=0))
