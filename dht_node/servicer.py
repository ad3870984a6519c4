"""DhtServicer: the `pollen.v1.Dht` gRPC service — proto ⇄ records, request validation.

Stays thin: lookups and stores are the node's, reached through the small `DhtOperations` protocol (so this
module never imports node.py, which builds the servicer). Bad requests raise InvalidRequest, which
swarm.errors.map_errors turns into INVALID_ARGUMENT with a message that says what to change; unexpected
failures are logged with a traceback and reported as INTERNAL.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

import swarm
from dht_node.reachability import ReachabilityProbe
from dht_node.storage import (
    MAX_PUBLIC_KEY_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_SUBKEY_BYTES,
    Entry,
    Record,
    StorageLimits,
)
from swarm.errors import InvalidRequest, map_errors
from swarm.pb import dht_pb2, dht_pb2_grpc

MAX_KEY_CHARS = 1024
MAX_BATCH_KEYS = 256
# Leave this much of the client's deadline for the reply itself when a lookup must stop early.
DEADLINE_MARGIN_S = 0.2


class DhtOperations(Protocol):
    """What the servicer needs of a DhtNode."""

    @property
    def node_id(self) -> str: ...
    @property
    def address(self) -> str: ...
    def peer_count(self) -> int: ...
    async def store(self, key: str, record: Record) -> int: ...
    async def get(self, key: str, timeout_s: float | None = None) -> Record: ...


class RecordFilter(Protocol):
    def filter(self, key: str, record: Record) -> tuple[Record, list[str]]: ...


class DhtServicer(dht_pb2_grpc.DhtServicer):
    def __init__(
        self,
        node: DhtOperations,
        limits: StorageLimits,
        validator: RecordFilter,
        clock: Callable[[], float] = time.time,
        probe: ReachabilityProbe | None = None,
    ) -> None:
        self.node = node
        self.probe = probe or ReachabilityProbe()  # dial-back for CheckReachable (reachability.py)
        self.limits = limits
        self.validator = validator  # the checks every other node will run on a store (validation.py)
        self.clock = clock  # the node's wall clock: expirations are absolute unix times

    @map_errors
    async def Store(self, request: dht_pb2.StoreRequest, context: grpc.aio.ServicerContext) -> dht_pb2.StoreResponse:
        _check_key(request.key)
        record = self._parse_items(request.items)
        self._check_record(request.key, record)
        replicas = await self.node.store(request.key, record)
        return dht_pb2.StoreResponse(stored=replicas > 0, replicas=replicas)

    @map_errors
    async def Get(self, request: dht_pb2.GetRequest, context: grpc.aio.ServicerContext) -> dht_pb2.GetResponse:
        _check_key(request.key)
        record = await self.node.get(request.key, timeout_s=_lookup_budget(context))
        return dht_pb2.GetResponse(record=_record_msg(request.key, record))

    @map_errors
    async def BatchGet(
        self, request: dht_pb2.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> dht_pb2.BatchGetResponse:
        if len(request.keys) > MAX_BATCH_KEYS:
            raise InvalidRequest(f"BatchGet takes at most {MAX_BATCH_KEYS} keys, got {len(request.keys)}")
        for key in request.keys:
            _check_key(key)
        budget = _lookup_budget(context)
        records = await asyncio.gather(*(self.node.get(key, timeout_s=budget) for key in request.keys))
        return dht_pb2.BatchGetResponse(
            records=[_record_msg(key, record) for key, record in zip(request.keys, records, strict=True)]
        )

    @map_errors
    async def Ping(self, request: dht_pb2.PingRequest, context: grpc.aio.ServicerContext) -> dht_pb2.PingResponse:
        return dht_pb2.PingResponse(
            node_id=self.node.node_id,
            address=self.node.address,
            peers=self.node.peer_count(),
            version=swarm.__version__,
        )

    @map_errors
    async def SpeedTest(
        self, request: dht_pb2.SpeedTestRequest, context: grpc.aio.ServicerContext
    ) -> dht_pb2.SpeedTestResponse:
        # Never more bytes out than in: a probe cannot be used to amplify traffic towards someone else.
        reply = min(request.reply_bytes, len(request.payload))
        return dht_pb2.SpeedTestResponse(received_bytes=len(request.payload), payload=bytes(reply))

    @map_errors
    async def CheckReachable(
        self, request: dht_pb2.CheckReachableRequest, context: grpc.aio.ServicerContext
    ) -> dht_pb2.CheckReachableResponse:
        # Only the caller's own IP is ever dialled: nothing in the request names a host.
        return await self.probe.check(context.peer() or "", request.port)

    def _parse_items(self, items: Any) -> Record:
        limits = self.limits
        if not items:
            raise InvalidRequest("Store needs at least one item (sub-key)")
        if len(items) > limits.max_subkeys_per_key:
            raise InvalidRequest(
                f"{len(items)} items in one Store; this node takes at most {limits.max_subkeys_per_key}"
            )
        now = self.clock()
        record: Record = {}
        for item in items:
            name = repr(item.subkey)
            if not item.subkey or len(item.subkey.encode()) > MAX_SUBKEY_BYTES:
                raise InvalidRequest(f"sub-key {name} must be non-empty and at most {MAX_SUBKEY_BYTES} UTF-8 bytes")
            if item.subkey in record:
                raise InvalidRequest(f"sub-key {name} appears twice in one Store")
            if len(item.value) > limits.max_value_bytes:
                raise InvalidRequest(
                    f"value of sub-key {name} is {len(item.value)} bytes, over this node's limit of "
                    f"{limits.max_value_bytes} (--max-value-bytes; a Kademlia store must fit one 8 KiB datagram)"
                )
            if not math.isfinite(item.expiration) or item.expiration <= now:
                raise InvalidRequest(
                    f"expiration of sub-key {name} ({item.expiration}) is not in the future (absolute unix time, s)"
                )
            if item.expiration > now + limits.max_ttl_s:
                raise InvalidRequest(
                    f"expiration of sub-key {name} is {item.expiration - now:.0f} s ahead; the limit is "
                    f"{limits.max_ttl_s:.0f} s (absolute unix time expected, not a duration in ms?)"
                )
            if len(item.public_key) > MAX_PUBLIC_KEY_BYTES or len(item.signature) > MAX_SIGNATURE_BYTES:
                raise InvalidRequest(
                    f"public_key/signature of sub-key {name} over {MAX_PUBLIC_KEY_BYTES}/{MAX_SIGNATURE_BYTES} bytes"
                )
            record[item.subkey] = Entry(item.value, item.expiration, item.public_key, item.signature)
        return record

    def _check_record(self, key: str, record: Record) -> None:
        """Signature, ownership and schema checks, as every other node will run them: fail loudly here rather
        than have the k closest nodes silently refuse the store."""
        _, refused = self.validator.filter(key, record)
        if refused:
            raise InvalidRequest(f"store of {key[:64]!r} refused: {refused[0]}")


def _check_key(key: str) -> None:
    if not key:
        raise InvalidRequest("key must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"key is {len(key)} characters; the limit is {MAX_KEY_CHARS}")


def _lookup_budget(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.05, remaining - DEADLINE_MARGIN_S)


def _record_msg(key: str, record: Record) -> dht_pb2.Record:
    items = [
        dht_pb2.SubkeyValue(
            subkey=subkey, value=e.value, expiration=e.expiration, public_key=e.public_key, signature=e.signature
        )
        for subkey, e in sorted(record.items())
    ]
    return dht_pb2.Record(key=key, items=items)
