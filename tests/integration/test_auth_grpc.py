"""Private swarms end to end on one machine: the swarm key on UDP and gRPC, TLS with a CA made here, and the
per-IP limits and message caps of a dht-node's gRPC port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dht_node.node import DhtNode
from swarm.auth import AUTH_METADATA, CallSigner, SwarmKey
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import Unauthenticated
from swarm.identity import Identity
from swarm.net import Security, TlsFiles, open_channel
from swarm.pb import dht_pb2, dht_pb2_grpc
from swarm.records import ServerRecord, decode_server_records
from tests.integration.dht_support import HANG_S, UdpPeer, make_tls_files

T = TypeVar("T")
MODEL = "auth-test"
PING = "/pollen.v1.Dht/Ping"


async def bounded(aw: Awaitable[T], timeout_s: float = HANG_S) -> T:
    return await asyncio.wait_for(aw, timeout_s)


async def start_swarm(n: int, security: Security, join: str | None = None, **kwargs: Any) -> list[DhtNode]:
    nodes: list[DhtNode] = []
    for i in range(n):
        peers = [join or nodes[0].address] if (i or join) else []
        node = DhtNode(host="127.0.0.1", port=0, ksize=4, rpc_timeout_s=1.0, initial_peers=peers,
                       security=security, **kwargs)  # fmt: skip
        nodes.append(node)
        await bounded(node.start())
    return nodes


async def stop_all(nodes: list[DhtNode]) -> None:
    await bounded(asyncio.gather(*(n.stop(grace_s=0) for n in nodes)))


async def announce(client: DhtClient, block: int = 0) -> Identity:
    server = Identity.generate()
    key = block_key(MODEL, block)
    value = ServerRecord(peer_id=server.peer_id, address="127.0.0.1:9", model_id=MODEL, start=block,
                         end=block + 1).encode()  # fmt: skip
    assert await bounded(client.store_signed(server, key, value, time.time() + 600))
    return server


async def test_two_swarms_with_different_keys_share_a_machine_without_seeing_each_other() -> None:
    key_a, key_b = Security(SwarmKey.generate()), Security(SwarmKey.generate())
    swarm_a = await start_swarm(3, key_a)
    nodes = list(swarm_a)
    try:
        # B's first node tries to join through A: A's nodes drop its datagrams, it finds nobody.
        (stray,) = await start_swarm(1, key_b, join=swarm_a[0].address)
        nodes.append(stray)
        assert stray.peer_count() == 0
        swarm_b = [stray, *await start_swarm(2, key_b, join=stray.address)]
        nodes += swarm_b[1:]
        assert all(n.peer_count() >= 1 for n in swarm_a + swarm_b)
        unkeyed = (await start_swarm(1, Security(), join=swarm_a[0].address))[0]
        nodes.append(unkeyed)
        assert unkeyed.peer_count() == 0
        for node in swarm_a:
            contacts = {c.port for c in node.protocol.router.contacts()}
            assert contacts <= {n.port for n in swarm_a}, "a node of another swarm got into A's routing table"
        assert swarm_a[0].protocol.seal.dropped > 0

        client_a = DhtClient([swarm_a[1].address], security=key_a)
        client_b = DhtClient([swarm_b[1].address], security=key_b)
        try:
            server = await announce(client_a)
            key = block_key(MODEL, 0)
            assert server.peer_id in decode_server_records(key, await bounded(client_a.get(key)))
            assert await bounded(client_b.get(key)) == {}
            assert await bounded(swarm_b[2].get(key)) == {}
        finally:
            await client_a.close()
            await client_b.close()
    finally:
        await stop_all(nodes)


async def test_calls_without_the_key_are_unauthenticated_and_health_stays_open() -> None:
    key = Security(SwarmKey.generate())
    (node,) = await start_swarm(1, key)
    try:
        for security in (Security(), Security(SwarmKey.generate())):
            stranger = DhtClient([node.address], security=security)
            try:
                with pytest.raises(Unauthenticated, match="swarm key"):
                    await bounded(stranger.ping())
                with pytest.raises(Unauthenticated):
                    await bounded(stranger.get(block_key(MODEL, 1)))
            finally:
                await stranger.close()
        async with open_channel(node.address) as channel:  # no key: orchestrators' probes
            reply = await bounded(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        member = DhtClient([node.address], security=key)
        try:
            assert (await bounded(member.ping())).node_id == node.node_id
        finally:
            await member.close()
        # keyed nodes drop unkeyed datagrams without a word
        peer = await UdpPeer.open()
        try:
            dropped = node.protocol.seal.dropped
            peer.send(b"\x00" + b"m" * 20 + b"\x92\xa4ping\x91\xc4\x00", node.port)
            while node.protocol.seal.dropped == dropped:
                await asyncio.sleep(0.01)
            assert peer.received == []
        finally:
            peer.close()
    finally:
        await stop_all([node])


async def test_a_replayed_or_stale_proof_is_refused() -> None:
    swarm_key = SwarmKey.generate()
    (node,) = await start_swarm(1, Security(swarm_key))
    try:
        async with open_channel(node.address) as channel:  # a plain channel: we attach proofs by hand
            stub = dht_pb2_grpc.DhtStub(channel)
            proof = CallSigner(swarm_key).proof(PING)
            await bounded(stub.Ping(dht_pb2.PingRequest(), metadata=((AUTH_METADATA, proof),)))
            with pytest.raises(grpc.aio.AioRpcError) as replay:
                await bounded(stub.Ping(dht_pb2.PingRequest(), metadata=((AUTH_METADATA, proof),)))
            assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in replay.value.details()
            stale = CallSigner(swarm_key, clock=lambda: time.time() - 3600).proof(PING)
            with pytest.raises(grpc.aio.AioRpcError) as old:
                await bounded(stub.Ping(dht_pb2.PingRequest(), metadata=((AUTH_METADATA, stale),)))
            assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED and "stale" in old.value.details()
            other_method = CallSigner(swarm_key).proof("/pollen.v1.Dht/Store")
            with pytest.raises(grpc.aio.AioRpcError) as moved:
                await bounded(stub.Ping(dht_pb2.PingRequest(), metadata=((AUTH_METADATA, other_method),)))
            assert moved.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stop_all([node])


@pytest.mark.parametrize("with_key", [False, True], ids=["tls", "tls+key"])
async def test_tls_clients_verify_the_server_against_the_ca(tmp_path: Path, with_key: bool) -> None:
    files = make_tls_files(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_tls_files(tmp_path / "other")  # another CA, same names
    swarm_key = SwarmKey.generate() if with_key else None
    server_side = Security(swarm_key, TlsFiles(cert=files["cert"], key=files["key"]))
    nodes = await start_swarm(2, server_side)
    try:
        good = DhtClient([nodes[1].address], security=Security(swarm_key, TlsFiles(ca=files["ca"])))
        try:
            await announce(good)
            assert len(await bounded(good.get(block_key(MODEL, 0)))) == 1
        finally:
            await good.close()
        # a client that trusts another CA, or talks plaintext, gets nothing
        for security in (Security(swarm_key, TlsFiles(ca=other["ca"])), Security(swarm_key)):
            bad = DhtClient([nodes[1].address], timeout_s=3.0, security=security)
            try:
                with pytest.raises(Exception, match="UNAVAILABLE|failed on every node"):
                    await bounded(bad.ping())
            finally:
                await bad.close()
    finally:
        await stop_all(nodes)


async def test_grpc_rate_per_ip_and_oversized_requests_are_refused() -> None:
    (node,) = await start_swarm(1, Security(), grpc_calls_per_ip_s=2.0)  # burst: 10 calls
    try:
        async with open_channel(node.address) as channel:
            stub = dht_pb2_grpc.DhtStub(channel)
            big = dht_pb2.SpeedTestRequest(payload=bytes(3 << 20), reply_bytes=10)
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await bounded(stub.SpeedTest(big))
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            codes = []
            t0 = time.monotonic()
            for _ in range(40):
                try:
                    await bounded(stub.Ping(dht_pb2.PingRequest()))
                    codes.append("OK")
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
            elapsed = time.monotonic() - t0
            assert codes.count("OK") <= 10 + 2 * elapsed + 1 and "RESOURCE_EXHAUSTED" in codes
            assert codes[:5] == ["OK"] * 5  # within the burst
    finally:
        await stop_all([node])
