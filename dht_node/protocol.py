"""The Kademlia UDP protocol of a dht-node: kademlia's KademliaProtocol hardened for an open port.

What it changes in the stock rpcudp/kademlia code and why:
* every datagram is parsed and dispatched inside one try block: garbage (bad msgpack, wrong shapes, wrong
  types, oversize requests) is logged at debug and dropped instead of raising in unkept tasks;
* requests are handled synchronously (every handler is), so no task per datagram is ever created;
* `store` validates the record and merges it through RecordStorage's caps;
* `find_value` answers with the local record *and* the closest contacts, so a lookup keeps converging on
  the k closest nodes and merges every copy it meets (see crawl.py);
* `welcome_if_new` hands records to a new contact by their real key (stock code digests the digest again)
  and keeps the resulting store tasks in a TaskSet;
* the reply timeout is configurable, late replies and timeouts never touch a cancelled future, and
  contacts that did not answer are remembered for a while so lookups stop paying their timeout;
* stores carry the key's name as a 4th argument, so signatures and schemas are checked (validation.py),
  and each sender address gets a token bucket of stores (a flood from one address is dropped);
* client mode: a client sends an empty node id, is never added to anyone's routing table, and answers no
  requests (it holds nothing); a contact that times out is logged as left and its keys are republished.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeGuard

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.utils import digest

from dht_node.storage import (
    DATAGRAM_LIMIT_BYTES,
    KEY_DIGEST_BYTES,
    InvalidRecord,
    Record,
    RecordStorage,
    parse_wire_record,
    to_wire,
    wire_chunks,
)
from dht_node.validation import RecordValidator
from swarm.aio import TaskSet

log = logging.getLogger(__name__)

REQUEST, RESPONSE = b"\x00", b"\x01"
HEADER_BYTES = 21  # kind byte + 20-byte message id
DEAD_PEER_TTL_S = 30.0  # how long a contact that timed out is skipped in lookups
CLIENT_ID = b""  # the node id a client-mode node sends: "answer me, but do not add me"
MAX_KEY_NAME_CHARS = 1024
# Token bucket of stores per sender address: a republish burst fits, a flood does not.
STORE_RATE_PER_S = 200.0
STORE_BURST = 1000.0
MAX_TRACKED_SENDERS = 4096  # bounded: the oldest sender's bucket is forgotten first


def valid_node_id(value: object) -> TypeGuard[bytes]:
    return isinstance(value, bytes) and len(value) == KEY_DIGEST_BYTES


def parse_contacts(obj: object, own_id: bytes) -> list[Node] | None:
    """A peer's contact list [[id, ip, port], ...] → Nodes; None if the shape is wrong (a broken peer)."""
    if not isinstance(obj, list | tuple) or len(obj) > 256:
        return None
    nodes = []
    for item in obj:
        if not isinstance(item, list | tuple) or len(item) != 3:
            return None
        node_id, ip, port = item
        if not valid_node_id(node_id) or not isinstance(ip, str) or not 0 < len(ip) <= 64:
            return None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            return None
        if node_id != own_id:
            nodes.append(Node(node_id, ip, port))
    return nodes


class _Router(RoutingTable):
    """RoutingTable whose "ping the head of a full bucket" task is kept instead of fire-and-forget."""

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # Section 4.2 of the paper: split if the bucket holds our own id or its depth is not 0 mod 5.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.tasks.spawn(self.protocol.call_ping(bucket.head()), name="dht-ping-bucket-head")

    def size(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)


class StoreThrottle:
    """Per-address token buckets for store requests, in a bounded LRU."""

    def __init__(self, rate_per_s: float = STORE_RATE_PER_S, burst: float = STORE_BURST) -> None:
        self.rate, self.burst = rate_per_s, burst
        self._buckets: OrderedDict[tuple[str, int], tuple[float, float]] = OrderedDict()
        self.dropped = 0

    def allow(self, sender: tuple[str, int]) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.pop(sender, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > MAX_TRACKED_SENDERS:
            self._buckets.popitem(last=False)
        if not ok:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1st, 2nd, 4th, ... drop: one line, not a flood of them
                log.warning("store flood from %s:%s: %d stores dropped so far", sender[0], sender[1], self.dropped)
        return ok


class PollenProtocol(KademliaProtocol):
    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        rpc_timeout_s: float,
        tasks: TaskSet,
        validator: RecordValidator | None = None,
        client_mode: bool = False,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self.validator = validator or RecordValidator()
        self.client_mode = client_mode
        self.throttle = StoreThrottle()
        self.rpcs_sent = 0  # outgoing requests, for benchmarks and the upkeep log
        self._wait_timeout = rpc_timeout_s
        self.storage: RecordStorage = storage
        self.router: _Router = _Router(self, ksize, source_node)
        self.tasks = tasks
        self._dead_until: dict[tuple[str, int], float] = {}
        self._handlers: dict[str, Callable[..., Any]] = {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
        }

    # ---- datagram layer (replaces rpcudp's task-per-datagram parsing) ----

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) <= HEADER_BYTES or data[:1] not in (REQUEST, RESPONSE):
            log.debug("dropped a %d-byte datagram from %s: not an rpc message", len(data), addr)
            return
        if data[:1] == REQUEST and len(data) > HEADER_BYTES + DATAGRAM_LIMIT_BYTES:
            log.debug("dropped a %d-byte request from %s: over the 8 KiB limit", len(data), addr)
            return
        msg_id = data[1:HEADER_BYTES]
        try:
            payload = umsgpack.unpackb(data[HEADER_BYTES:])
            if data[:1] == RESPONSE:
                self._accept_response(msg_id, payload, addr)
            else:
                self._handle_request(msg_id, payload, addr)
        except Exception as e:  # noqa: BLE001 - a peer's garbage must never reach the event loop
            log.debug("dropped a malformed datagram from %s: %s", addr, f"{type(e).__name__}: {e}"[:200])

    def _handle_request(self, msg_id: bytes, payload: object, addr: tuple[Any, ...]) -> None:
        if self.client_mode:
            return  # a client holds nothing and is in nobody's table: requests to it are strays
        if not isinstance(payload, list) or len(payload) != 2 or not isinstance(payload[1], list | tuple):
            log.debug("dropped a request of the wrong shape from %s", addr)
            return
        name, args = payload
        handler = self._handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            log.debug("dropped a request for unknown rpc %r from %s", name, addr)
            return
        response = handler(addr, *args)
        if response is not None and self.transport is not None:
            self.transport.sendto(RESPONSE + msg_id + umsgpack.packb(response), addr)

    def _accept_response(self, msg_id: bytes, data: object, address: tuple[Any, ...]) -> None:
        # A late reply still proves the peer is alive: a busy peer must not stay "dead" for DEAD_PEER_TTL_S.
        self._dead_until.pop((address[0], address[1]), None)
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            log.debug("dropped a reply to an unknown or expired request from %s", address)
            return
        future, timeout = pending
        timeout.cancel()
        if not future.done():  # the caller may have been cancelled (lookup deadline)
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    def close(self) -> None:
        """Fail every pending request now (stock rpcudp leaves them to their timeouts after stop)."""
        pending = list(self._outstanding.values())
        self._outstanding.clear()
        for future, timeout in pending:
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))

    # ---- rpc handlers: sender is the (ip, port) the datagram came from ----

    @property
    def wire_id(self) -> bytes:
        """The node id we send: our own, or CLIENT_ID so that nobody adds us to a routing table."""
        return CLIENT_ID if self.client_mode else bytes(self.source_node.id)

    def _source(self, sender: tuple[Any, ...], nodeid: object) -> Node | None | bool:
        """The sender as a contact (welcomed into our table); False for a client (served, never added);
        None for an invalid id (the request is dropped)."""
        if nodeid == CLIENT_ID:
            return False
        if not valid_node_id(nodeid) or nodeid == self.source_node.id:
            return None
        source = Node(nodeid, sender[0], sender[1])
        self._dead_until.pop((source.ip, source.port), None)  # it talks to us: alive again
        self.welcome_if_new(source)
        return source

    def rpc_ping(self, sender: tuple[Any, ...], nodeid: object) -> bytes | None:
        if self._source(sender, nodeid) is None:
            return None
        return self.source_node.id

    def rpc_store(
        self, sender: tuple[Any, ...], nodeid: object, key: object, value: object, name: object = None
    ) -> bool | None:
        # Validate everything before welcoming the sender: a peer that sends garbage stays out of our table.
        if not (valid_node_id(nodeid) or nodeid == CLIENT_ID) or not valid_node_id(key):
            log.debug("rejected store from %s: node id or key is not a %d-byte digest", sender, KEY_DIGEST_BYTES)
            return None
        if not self.throttle.allow((sender[0], sender[1])):
            return None
        if not isinstance(name, str) or len(name) > MAX_KEY_NAME_CHARS or digest(name) != key:
            log.debug(
                "rejected store of %s from %s: missing key name or it does not hash to the key", key.hex(), sender
            )
            return False
        try:
            record = parse_wire_record(value, self.storage.limits, self.storage.clock())
        except InvalidRecord as e:
            log.debug("rejected store of %s from %s: %s", key.hex(), sender, e)
            return False
        good, refused = self.validator.filter(name, record)
        if refused:
            log.info("refused %d sub-keys of %r from %s: %s", len(refused), name[:64], sender, refused[0])
        if self._source(sender, nodeid) is None:
            return None
        accepted = self.storage.merge(key, good, name) if good else True
        if not accepted:
            log.info("store of %r from %s hit a storage cap; part of it was refused", name[:64], sender)
        return accepted and not refused

    def rpc_find_node(self, sender: tuple[Any, ...], nodeid: object, key: object) -> list[tuple[Any, ...]] | None:
        if not valid_node_id(key):
            return None
        source = self._source(sender, nodeid)
        if source is None:
            return None
        if source is False:
            source = None  # a client: nothing to exclude
        # Twice k contacts, minus those we saw time out: when the closest ones have died, a lookup still
        # has live fallbacks (a crawl shows only the k nearest and reaches the rest as the others fail).
        neighbors = self.router.find_neighbors(Node(key), k=2 * self.router.ksize, exclude=source)
        return [tuple(n) for n in neighbors if not self.is_dead(n)]

    def rpc_find_value(self, sender: tuple[Any, ...], nodeid: object, key: object) -> dict[str, Any] | None:
        contacts = self.rpc_find_node(sender, nodeid, key)
        if contacts is None or not isinstance(key, bytes):
            return None
        answer: dict[str, Any] = {"nodes": contacts}
        record = self.storage.get_record(key)
        if record:
            answer["value"] = to_wire(record)
        return answer

    # ---- outgoing calls ----

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        self.rpcs_sent += 1
        result = await self.find_node((node_to_ask.ip, node_to_ask.port), self.wire_id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        self.rpcs_sent += 1
        result = await self.find_value((node_to_ask.ip, node_to_ask.port), self.wire_id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        self.rpcs_sent += 1
        result = await self.ping((node_to_ask.ip, node_to_ask.port), self.wire_id)
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any, name: str = "") -> tuple[bool, Any]:
        self.rpcs_sent += 1
        result = await self.store((node_to_ask.ip, node_to_ask.port), self.wire_id, key, value, name)
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        if not result[0]:
            self._contact_left(node)
            return result
        self.welcome_if_new(node)
        return result

    def _contact_left(self, node: Node) -> None:
        """A contact did not answer: drop it, skip it in lookups for a while, and make the keys it helped hold
        due for republishing so they regain k copies on the nodes now closest to them."""
        was_known = not self.router.is_new_node(node)
        self._dead_until[(node.ip, node.port)] = time.monotonic() + DEAD_PEER_TTL_S
        if not was_known:
            return
        due = 0
        for key, _ in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors and node.distance_to(keynode) <= neighbors[-1].distance_to(keynode):
                self.storage.mark_due(key)
                due += 1
        self.router.remove_contact(node)
        log.info("contact left: %s:%s (no reply in %.1f s); %d keys to republish", node.ip, node.port,
                 self._wait_timeout, due)  # fmt: skip

    def is_dead(self, node: Node) -> bool:
        until = self._dead_until.get((node.ip, node.port))
        if until is None:
            return False
        if until < time.monotonic():
            del self._dead_until[(node.ip, node.port)]
            return False
        return True

    async def store_record(self, node: Node, key: bytes, record: Record, name: str) -> bool:
        """Store a record on one node in as many requests as the 8 KiB limit needs; True if all accepted."""
        for chunk in wire_chunks(record):
            ok, accepted = await self.call_store(node, key, chunk, name)
            if not ok or accepted is not True:
                return False
        return True

    def welcome_if_new(self, node: Node) -> None:
        """Section 2.5 of the paper: hand a new contact the records it should now hold, then add it."""
        if not self.router.is_new_node(node):
            return
        log.info("contact joined: %s:%s (id %s)", node.ip, node.port, node.id.hex()[:12])
        for key, record in self.storage:
            keynode = Node(key)  # storage keys are already digests (stock code hashes them again)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                name = self.storage.name_of(key)
                if name:
                    self.tasks.spawn(self.store_record(node, key, record, name), name="dht-welcome-store")
        self.router.add_contact(node)
