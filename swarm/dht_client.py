"""Async client for the `Dht` gRPC service of dht-nodes, failing over across the given addresses.

Shard servers and clients never join the Kademlia overlay; they read and write records through any
dht-node they were given. A node that does not answer is skipped and the next one is tried.

The node asked is not trusted: `get`/`batch_get` return only sub-keys whose owner signature verifies
(sub-key == peer id of the signing key), so a lying dht-node can hide records but never forge one.
`allow_unsigned=True` also returns plain sub-keys that do not look like peer ids (private test swarms
running `dht-node --allow-unsigned`). `security` carries the swarm key and TLS settings (swarm.net).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from swarm.errors import DhtUnavailable, from_rpc_error
from swarm.identity import Identity, looks_like_peer_id
from swarm.net import PLAINTEXT, ChannelCache, Security, parse_addresses
from swarm.pb import dht_pb2, dht_pb2_grpc
from swarm.records import Record, SubkeyEntry, verified

__all__ = ["DhtClient", "Record", "SubkeyEntry", "looks_like_peer_id", "parse_peers", "verified"]

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REPLY_BYTES = 32 << 20

# Errors after which another dht-node may succeed; anything else is the request's own fault.
_FAILOVER_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # this node's per-IP limit: another node has its own
}


def parse_peers(text: str | Sequence[str]) -> list[str]:
    """ "h:p,h:p" or a list of them → ["h:p", ...]; raises ValueError on a malformed address (swarm.net)."""
    return parse_addresses(text)


class DhtClient:
    def __init__(
        self,
        addresses: Sequence[str],
        timeout_s: float = 5.0,
        *,
        security: Security = PLAINTEXT,
        allow_unsigned: bool = False,
    ) -> None:
        self.addresses = parse_addresses(addresses)
        if not self.addresses:
            raise ValueError("DhtClient needs at least one dht-node address (HOST:PORT)")
        self.timeout_s = timeout_s
        self.allow_unsigned = allow_unsigned
        # a dht-node answers at most a BatchGet of 256 records of 56 KB
        self._channels = ChannelCache(MAX_REPLY_BYTES, security)
        self._stubs: dict[str, dht_pb2_grpc.DhtStub] = {}
        self._preferred = 0  # index of the last node that answered

    def _stub(self, address: str) -> dht_pb2_grpc.DhtStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = dht_pb2_grpc.DhtStub(self._channels.get(address))
        return stub

    async def _call(self, what: str, fn: Callable[[dht_pb2_grpc.DhtStub], Awaitable[T]]) -> T:
        errors = []
        n = len(self.addresses)
        for i in range(n):
            idx = (self._preferred + i) % n
            address = self.addresses[idx]
            try:
                result = await fn(self._stub(address))
            except grpc.aio.AioRpcError as e:
                if e.code() not in _FAILOVER_CODES:
                    raise from_rpc_error(e, address) from e
                log.debug("dht %s via %s failed: %s", what, address, e.code().name)
                errors.append(f"{address}: {e.code().name} {e.details()}")
                continue
            self._preferred = idx
            return result
        raise DhtUnavailable(f"DHT {what} failed on every node: " + "; ".join(errors))

    async def store(
        self, key: str, subkey: str, value: bytes, expiration: float, public_key: bytes = b"", signature: bytes = b""
    ) -> bool:
        item = dht_pb2.SubkeyValue(
            subkey=subkey, value=value, expiration=expiration, public_key=public_key, signature=signature
        )
        request = dht_pb2.StoreRequest(key=key, items=[item])
        response = await self._call("store", lambda s: s.Store(request, timeout=self.timeout_s))
        return bool(response.stored)

    async def store_signed(self, identity: Identity, key: str, value: bytes, expiration: float) -> bool:
        """Store `value` under sub-key = the identity's peer id, signed: only this identity can replace it."""
        signature = identity.sign(key, identity.peer_id, value, expiration)
        return await self.store(key, identity.peer_id, value, expiration, identity.public_key, signature)

    async def get(self, key: str) -> Record:
        request = dht_pb2.GetRequest(key=key)
        response = await self._call("get", lambda s: s.Get(request, timeout=self.timeout_s))
        return self._trusted(key, response.record)

    async def batch_get(self, keys: Sequence[str]) -> list[Record]:
        request = dht_pb2.BatchGetRequest(keys=list(keys))
        response = await self._call("batch_get", lambda s: s.BatchGet(request, timeout=self.timeout_s))
        records = [self._trusted(key, r) for key, r in zip(keys, response.records, strict=False)]
        if len(records) != len(keys):
            raise DhtUnavailable(f"batch get returned {len(records)} records for {len(keys)} keys")
        return records

    async def ping(self) -> dht_pb2.PingResponse:
        return await self._call("ping", lambda s: s.Ping(dht_pb2.PingRequest(), timeout=self.timeout_s))

    async def measure_mbps(self, payload_bytes: int = 1 << 20, rounds: int = 3) -> float:
        """Link speed to the first dht-node that answers, in Mbit/s: `payload_bytes` up and as many back per round,
        median over `rounds` (after one warm-up round that opens the connection)."""
        request = dht_pb2.SpeedTestRequest(payload=bytes(payload_bytes), reply_bytes=payload_bytes)
        speeds = []
        for i in range(rounds + 1):
            t0 = time.perf_counter()
            await self._call("speed test", lambda s: s.SpeedTest(request, timeout=self.timeout_s))
            if i:
                speeds.append(2 * payload_bytes * 8 / (time.perf_counter() - t0) / 1e6)
        return statistics.median(speeds)

    async def close(self) -> None:
        self._stubs.clear()
        await self._channels.close()

    def _trusted(self, key: str, msg: dht_pb2.Record) -> Record:
        """The sub-keys of a reply that verify as their owners' (see the module docstring)."""
        record = {
            item.subkey: SubkeyEntry(item.value, item.expiration, item.public_key, item.signature) for item in msg.items
        }
        return verified(key, record, require_signed=not self.allow_unsigned)
