"""PeerRtts: this server's smoothed RTTs to the servers a chain may continue on after it, announced as
`next_rtts_ms` so clients can price server-to-server pushes (client_sdk/routing.py).

A session on this server may end at any block b in (start, end], so the candidates are the servers whose
span starts there. They are read from the DHT and probed with the Info RPC every period (in the background).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from swarm.blocks import BlockRange, block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.net import PLAINTEXT, ChannelCache, Security
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord, ServerState, decode_server_records

log = logging.getLogger(__name__)

MAX_PEERS = 16  # announced entries (the record allows 64; keep it small)


class PeerRtts:
    def __init__(
        self,
        dht: DhtClient,
        model_id: str,
        blocks: BlockRange,
        peer_id: str,
        alpha: float = 0.3,
        timeout_s: float = 2.0,
        security: Security = PLAINTEXT,
    ) -> None:
        self.dht = dht
        self.model_id = model_id
        self.blocks = blocks
        self.peer_id = peer_id
        self.alpha = alpha
        self.timeout_s = timeout_s
        self.rtts_ms: dict[str, float] = {}
        self._channels = ChannelCache(security=security)
        self._addresses: set[str] = set()  # of the servers probed last time (their channels stay open)

    def snapshot(self) -> dict[str, float]:
        """Best entries first, at most MAX_PEERS (what goes into the announced record)."""
        return dict(sorted(self.rtts_ms.items(), key=lambda kv: kv[1])[:MAX_PEERS])

    async def next_servers(self) -> list[ServerRecord]:
        """Live servers whose span starts at one of our boundaries (start, end]."""
        firsts = range(self.blocks.start + 1, self.blocks.end + 1)
        keys = [block_key(self.model_id, b) for b in firsts]
        raw = await self.dht.batch_get(keys)
        now = time.time()
        found: dict[str, ServerRecord] = {}
        for block, key, entries in zip(firsts, keys, raw, strict=True):
            for r in decode_server_records(key, entries, now).values():
                if r.state == ServerState.ONLINE and r.start == block and r.peer_id != self.peer_id:
                    found[r.peer_id] = r
        return list(found.values())

    async def measure(self) -> None:
        servers = (await self.next_servers())[: MAX_PEERS * 2]
        alive = {r.peer_id for r in servers}
        self.rtts_ms = {p: v for p, v in self.rtts_ms.items() if p in alive}  # forget servers that left
        addresses = {r.address for r in servers}
        for gone in self._addresses - addresses:  # and their channels: the cache holds current peers only
            await self._channels.discard(gone)
        self._addresses = addresses
        await asyncio.gather(*(self._probe(r) for r in servers))

    async def _probe(self, record: ServerRecord) -> None:
        t0 = time.perf_counter()
        try:
            stub = shard_pb2_grpc.ShardStub(self._channels.get(record.address))
            await stub.Info(shard_pb2.InfoRequest(), timeout=self.timeout_s)
        except (grpc.aio.AioRpcError, ValueError):  # ValueError: a malformed announced address
            self.rtts_ms.pop(record.peer_id, None)
            return
        sample = (time.perf_counter() - t0) * 1000
        old = self.rtts_ms.get(record.peer_id)
        self.rtts_ms[record.peer_id] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample

    async def run(self, period_s: float) -> None:
        while True:
            try:
                await self.measure()
            except PollenError as e:
                log.debug("measuring RTTs to next servers failed: %s", e)
            await asyncio.sleep(period_s)

    async def close(self) -> None:
        await self._channels.close()
