"""The Kademlia rpc handlers of a dht-node and its routing-table upkeep, on top of wire.py's datagram layer.

What it changes in the stock kademlia code and why:
* requests are handled synchronously (every handler is), so no task per datagram is ever created; garbage
  (bad msgpack, wrong shapes, wrong types, oversize requests) is logged at debug and dropped (wire.py);
* `store` validates the record and merges it through RecordStorage's caps; stores are rate-limited per
  sender IP (a new source port does not reset the bucket), on top of wire.py's per-IP request rate;
* `find_value` answers with the local record *and* the closest contacts, so a lookup keeps converging on
  the k closest nodes and merges every copy it meets (see crawl.py);
* a contact enters the routing table, and is handed the records it should hold (`welcome_if_new`, by their
  real key: stock code digests the digest again), only once its address proved it receives our datagrams:
  it answered a request of ours, or showed an address token. A request from an unproven node id triggers
  one ping from us instead, so a forged source address never receives stores;
* contacts are handed out only if they are neither dead nor suspect (liveness.py), and a contact that does
  not answer within the rpc timeout is dropped, remembered as dead, and its keys are republished;
* stores carry the key's name as a 4th argument, so signatures and schemas are checked (validation.py);
* client mode: a client sends an empty node id, is never added to anyone's routing table, and answers no
  requests (it holds nothing).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from kademlia.node import Node
from kademlia.routing import RoutingTable
from kademlia.utils import digest

from dht_node.datagram import AddressGuard, DatagramSeal
from dht_node.storage import (
    KEY_DIGEST_BYTES,
    InvalidRecord,
    Record,
    RecordStorage,
    parse_wire_record,
    to_wire,
    wire_chunks,
)
from dht_node.validation import RecordValidator
from dht_node.wire import Address, Outgoing, RpcEndpoint
from swarm.access import RateLimiter
from swarm.aio import TaskSet

log = logging.getLogger(__name__)

CLIENT_ID = b""  # the node id a client-mode node sends: "answer me, but do not add me"
MAX_KEY_NAME_CHARS = 1024
# Token bucket of stores per sender IP: a republish burst of several nodes behind one address fits, a flood not.
STORE_RATE_PER_S = 200.0
STORE_BURST = 1000.0
# Requests of any kind per sender IP (many nodes may share one IP: a NAT, or a test swarm on loopback).
REQUEST_RATE_PER_S = 2000.0
MAX_VERIFYING = 64  # pings in flight to new contacts whose address is unproven: bounds what forged sources cost
# A contact's departure makes every holder of its keys republish them: spread over this long (at most the
# republish period), the first holder's store reaches the others before they start, and they skip theirs.
# Without it, one death makes every holder re-store every key at once, and on a busy host that burst delays
# replies past the rpc timeout: live contacts then look dead too, and the storm feeds itself.
DUE_SPREAD_S = 10.0


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


def address_of(node: Node) -> Address:
    return (str(node.ip), int(node.port))


class _Router(RoutingTable):
    """RoutingTable whose "ping the head of a full bucket" task is kept instead of fire-and-forget."""

    protocol: PollenProtocol

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

    def contacts(self) -> list[Node]:
        return [node for bucket in self.buckets for node in bucket.get_nodes()]


class PollenProtocol(RpcEndpoint):
    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        rpc_timeout_s: float,
        tasks: TaskSet,
        validator: RecordValidator | None = None,
        client_mode: bool = False,
        seal: DatagramSeal | None = None,
        request_rate_per_s: float = REQUEST_RATE_PER_S,
        guard: AddressGuard | None = None,
        due_spread_s: float = DUE_SPREAD_S,
    ) -> None:
        super().__init__(
            rpc_timeout_s, seal or DatagramSeal(None), RateLimiter(request_rate_per_s, 5 * request_rate_per_s), guard
        )
        self.source_node = source_node
        self.storage = storage
        self.validator = validator or RecordValidator()
        self.client_mode = client_mode
        self.throttle = RateLimiter(STORE_RATE_PER_S, STORE_BURST)  # stores per sender IP
        self.router = _Router(self, ksize, source_node)
        self.tasks = tasks
        self._verifying: set[Address] = set()  # new contacts we are pinging to prove their address
        self._confirming: dict[Address, float] = {}  # contacts whose request timed out -> when pinged once more
        self.due_spread_s = due_spread_s
        self._handlers: dict[str, Callable[..., Any]] = {
            "ping": self.rpc_ping,
            "store": self.rpc_store,
            "find_node": self.rpc_find_node,
            "find_value": self.rpc_find_value,
        }

    @property
    def wire_id(self) -> bytes:
        """The node id we send: our own, or CLIENT_ID so that nobody adds us to a routing table."""
        return CLIENT_ID if self.client_mode else bytes(self.source_node.id)

    def handle_request(self, name: str, args: list[Any], sender: Address, proven: bool) -> Any:
        if self.client_mode:
            return None  # a client holds nothing and is in nobody's table: requests to it are strays
        handler = self._handlers.get(name)
        if handler is None:
            log.debug("dropped a request for unknown rpc %r from %s", name, sender)
            return None
        return handler(sender, proven, *args)  # a wrong argument count raises TypeError: dropped by wire.py

    # ---- rpc handlers: sender is the (ip, port) the datagram came from ----

    def _source(self, sender: Address, proven: bool, nodeid: object) -> Node | None | bool:
        """The sender as a contact; False for a client (served, never added); None for an invalid id (the
        request is dropped). A proven sender is welcomed into the table now, an unproven one after it
        answers a ping of ours."""
        if nodeid == CLIENT_ID:
            return False
        if not valid_node_id(nodeid) or nodeid == self.source_node.id:
            return None
        source = Node(nodeid, sender[0], sender[1])
        if proven:
            self.welcome_if_new(source)
        elif self.router.is_new_node(source) and sender not in self._verifying and len(self._verifying) < MAX_VERIFYING:
            self._verifying.add(sender)
            self.tasks.spawn(self._verify_contact(source), name="dht-verify-contact")
        return source

    async def _verify_contact(self, node: Node) -> None:
        try:
            await self.call_ping(node)  # on an answer with the same id, on_answer welcomes it
        finally:
            self._verifying.discard(address_of(node))

    def rpc_ping(self, sender: Address, proven: bool, nodeid: object) -> bytes | None:
        if self._source(sender, proven, nodeid) is None:
            return None
        return bytes(self.source_node.id)

    def rpc_store(
        self, sender: Address, proven: bool, nodeid: object, key: object, value: object, name: object = None
    ) -> bool | None:
        # Validate everything before welcoming the sender: a peer that sends garbage stays out of our table.
        if not (valid_node_id(nodeid) or nodeid == CLIENT_ID) or not valid_node_id(key):
            log.debug("rejected store from %s: node id or key is not a %d-byte digest", sender, KEY_DIGEST_BYTES)
            return None
        if not self.throttle.allow(sender[0]):
            if self.throttle.dropped & (self.throttle.dropped - 1) == 0:  # 1st, 2nd, 4th, ...: a line, not a flood
                log.warning("store flood from %s: %d stores dropped so far", sender[0], self.throttle.dropped)
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
        if self._source(sender, proven, nodeid) is None:
            return None
        accepted = self.storage.merge(key, good, name) if good else True
        if not accepted:
            log.info("store of %r from %s hit a storage cap; part of it was refused", name[:64], sender)
        return accepted and not refused

    def rpc_find_node(self, sender: Address, proven: bool, nodeid: object, key: object) -> list[tuple[Any, ...]] | None:
        if not valid_node_id(key):
            return None
        source = self._source(sender, proven, nodeid)
        if source is None:
            return None
        return [tuple(n) for n in self.live_neighbors(Node(key), exclude=source or None)]

    def rpc_find_value(self, sender: Address, proven: bool, nodeid: object, key: object) -> dict[str, Any] | None:
        contacts = self.rpc_find_node(sender, proven, nodeid, key)
        if contacts is None or not isinstance(key, bytes):
            return None
        answer: dict[str, Any] = {"nodes": contacts}
        record = self.storage.get_record(key)
        if record:
            answer["value"] = to_wire(record)
        return answer

    def live_neighbors(self, target: Node, exclude: Node | None = None) -> list[Node]:
        """Up to 2k contacts closest to `target`, none of them dead or suspect: when the k closest have died a
        lookup still has live fallbacks, and nobody is sent to a contact we know does not answer."""
        neighbors = self.router.find_neighbors(target, k=2 * self.router.ksize, exclude=exclude)
        return [n for n in neighbors if not self.liveness.avoid(address_of(n))]

    def suspect_neighbors(self, target: Node) -> list[Node]:
        """Suspect contacts (slow lately, not known dead) among the k closest to `target`."""
        neighbors = self.router.find_neighbors(target, k=self.router.ksize)
        return [n for n in neighbors if self.liveness.is_suspect(address_of(n))]

    # ---- outgoing calls: (True, reply) or (False, None) ----

    async def call_ping(self, node: Node) -> tuple[bool, Any]:
        return await self.request(address_of(node), "ping", (self.wire_id,), node)

    async def ping_address(self, address: Address) -> Node | None:
        """Ping an address whose node id we do not know yet (initial peers); the contact if it answers."""
        ok, node_id = await self.request(address, "ping", (self.wire_id,))
        if not ok or not valid_node_id(node_id):
            return None
        node = Node(node_id, address[0], address[1])
        self.welcome_if_new(node)
        return node

    async def call_find_node(self, node: Node, target: Node) -> tuple[bool, Any]:
        return await self.request(address_of(node), "find_node", (self.wire_id, target.id), node)

    def find_value_request(self, node: Node, target: Node) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address_of(node), "find_value", (self.wire_id, target.id), node)

    def find_node_request(self, node: Node, target: Node) -> asyncio.Future[tuple[bool, Any]]:
        return self.request(address_of(node), "find_node", (self.wire_id, target.id), node)

    async def call_store(self, node: Node, key: bytes, value: Any, name: str = "") -> tuple[bool, Any]:
        return await self.request(address_of(node), "store", (self.wire_id, key, value, name), node)

    async def store_record(self, node: Node, key: bytes, record: Record, name: str) -> bool:
        """Store a record on one node in as many requests as the 8 KiB limit needs; True if all accepted."""
        for chunk in wire_chunks(record):
            ok, accepted = await self.call_store(node, key, chunk, name)
            if not ok or accepted is not True:
                return False
        return True

    # ---- liveness and the routing table ----

    def on_answer(self, request: Outgoing, reply: Any) -> None:
        node = request.node
        if node is None:
            return
        if request.name == "ping" and reply != node.id:
            log.debug("%s:%s answered a ping with another node id; not added", node.ip, node.port)
            return
        self.welcome_if_new(node)

    def on_timeout(self, request: Outgoing) -> None:
        """One unanswered request makes a contact suspect (nobody asks it or hands it out) and earns it one
        more ping; only if that goes unanswered too is it dead. A host busy for one rpc timeout does not
        lose its place in every routing table; lookups never wait for either timeout (crawl.py)."""
        node, address = request.node, request.address
        confirming_since = self._confirming.get(address)
        if node is None or self.router.is_new_node(node):
            # Not a contact of ours: dead for a while, unless the address is a contact's under another id (a
            # ping to a forged id at a real node's address must not make us shun that node).
            if not any(address_of(c) == address for c in self.router.contacts()):
                self.liveness.mark_dead(address)
        elif confirming_since is not None and request.sent_at >= confirming_since:
            self._contact_left(node)  # the confirmation ping went unanswered too
        elif confirming_since is None and not self.liveness.is_dead(address):
            self.liveness.mark_suspect(address)
            self._confirming[address] = time.monotonic()
            self.tasks.spawn(self._confirm(node), name="dht-confirm-contact")

    async def _confirm(self, node: Node) -> None:
        try:
            await self.call_ping(node)  # an answer clears the suspicion (wire.py); silence -> _contact_left
        finally:
            self._confirming.pop(address_of(node), None)

    def _contact_left(self, node: Node) -> None:
        """A contact did not answer: drop it, skip it for a while, and make the keys it helped hold due for
        republishing so they regain k copies on the nodes now closest to them."""
        self.liveness.mark_dead(address_of(node))
        if self.router.is_new_node(node):
            return
        due = 0
        for key, _ in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors and node.distance_to(keynode) <= neighbors[-1].distance_to(keynode):
                self.storage.mark_due(key, random.uniform(0, self.due_spread_s))
                due += 1
        self.router.remove_contact(node)
        log.info("contact left: %s:%s (no reply in %.1f s); %d keys to republish", node.ip, node.port,
                 self.rpc_timeout_s, due)  # fmt: skip

    def is_dead(self, node: Node) -> bool:
        return self.liveness.is_dead(address_of(node))

    def avoid(self, node: Node) -> bool:
        return self.liveness.avoid(address_of(node))

    def stale_contacts(self, silent_s: float) -> list[Node]:
        """Table contacts not heard from for `silent_s` and not being asked anything right now."""
        return [
            n
            for n in self.router.contacts()
            if self.liveness.silent_for(address_of(n)) > silent_s and not self.has_outgoing(address_of(n))
        ]

    def get_refresh_ids(self) -> list[bytes]:
        """A random id in every bucket nobody looked into for an hour (Kademlia section 2.3)."""
        return [random.randint(*b.range).to_bytes(20, byteorder="big") for b in self.router.lonely_buckets()]

    def welcome_if_new(self, node: Node) -> None:
        """Section 2.5 of the paper: hand a new contact the records it should now hold, then add it. Only
        called for contacts whose address is proven (see the module docstring)."""
        if not self.router.is_new_node(node):
            self.router.add_contact(node)  # moves it to the tail of its bucket: recently seen
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
