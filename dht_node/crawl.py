"""Iterative lookups over the overlay: find the k closest live nodes to a key, or merge a key's record from them.

Stock kademlia's SpiderCrawl asks alpha contacts per round and waits for all of them, and ends only when it
has contacted every one of the k closest: each dead contact among them costs a full rpc timeout, round after
round. A `Lookup` here keeps alpha requests *outstanding* instead, and a request that has not been answered
within its contact's measured retransmission timeout (liveness.py) stops counting: the lookup asks the next
contact, marks the slow one suspect (so this node and the nodes it answers skip it), and takes its answer if
it still comes. The lookup ends when the k closest contacts that have not failed or gone slow have all
answered. A slow request keeps running until the full rpc timeout, which is what declares its contact dead.
The lookup waits for slow requests only when nobody has answered at all, or (RecordLookup) when everyone who
answered holds no copy: a slow holder beats an empty answer (a loaded host is slow, not gone; "no server holds
this block" would send a client away), and the wait is bounded by the rpc timeout and the caller's deadline.
For the same reason suspect contacts (slow for an earlier lookup, not known dead) are held back rather than
dropped: a RecordLookup that met no copy asks them too before it answers empty.

RecordLookup merges every copy it meets (per sub-key the later expiration wins, so stale copies lose and
sub-keys written through different nodes all show up) and drops sub-keys whose owner signature or schema
fails, so a lying node cannot slip a forged announcement in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from typing import Any

from kademlia.node import Node

from dht_node.protocol import PollenProtocol, address_of, parse_contacts
from dht_node.storage import MAX_VALUE_BYTES_LIMIT, InvalidRecord, Record, merge_into, parse_wire_record

log = logging.getLogger(__name__)


class _State(enum.Enum):
    NEW = "new"  # known, not asked yet
    ASKED = "asked"  # request outstanding, within its wait
    SLOW = "slow"  # request outstanding past its wait: not waited for
    ANSWERED = "answered"
    FAILED = "failed"  # timed out for good, or answered garbage


@dataclasses.dataclass
class LookupStats:
    lookups: int = 0
    sent: int = 0
    answered: int = 0
    slow: int = 0  # requests whose wait ran out (the lookup moved on)
    failed: int = 0
    waited_on_slow: int = 0  # times a lookup had nobody else to ask and waited on a slow request
    waited_for_value: int = 0  # times a record lookup had met no copy yet and waited on a slow request
    asked_suspects: int = 0  # suspect contacts a record lookup asked because nobody else had a copy

    def add(self, other: LookupStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Lookup:
    """The shared engine; subclasses send the request (`_ask`) and read the reply (`_read`)."""

    def __init__(self, protocol: PollenProtocol, target: Node, peers: list[Node], ksize: int, alpha: int) -> None:
        self.protocol = protocol
        self.target = target
        self.ksize, self.alpha = ksize, alpha
        self.stats = LookupStats(lookups=1)
        self._nodes: dict[bytes, Node] = {}
        self._state: dict[bytes, _State] = {}
        self._held_back: dict[bytes, Node] = {}  # suspect contacts: asked only if the answers fall short
        self._push(peers)

    def _push(self, contacts: list[Node]) -> None:
        own = self.protocol.source_node.id
        for node in contacts:
            if node.id in self._nodes or node.id == own:
                continue
            if self.protocol.avoid(node):
                if not self.protocol.liveness.is_dead(address_of(node)):
                    self._held_back[node.id] = node
                continue
            self._add(node)

    def _add(self, node: Node) -> None:
        self._nodes[node.id] = node
        self._state[node.id] = _State.NEW

    def _ask(self, node: Node) -> asyncio.Future[tuple[bool, Any]]:
        raise NotImplementedError

    def _read(self, node: Node, reply: Any) -> list[Node] | None:
        """Contacts from an answer, or None if the answer is garbage (the contact then counts as failed)."""
        raise NotImplementedError

    def _found(self) -> bool:
        """Whether the answers so far are enough to end once the window has answered."""
        return True

    def _window(self) -> list[Node]:
        """The k closest contacts still in the running (not failed, not slow)."""
        running = [n for n in self._nodes.values() if self._state[n.id] in (_State.NEW, _State.ASKED, _State.ANSWERED)]
        running.sort(key=lambda n: n.distance_to(self.target))
        return running[: self.ksize]

    async def run(self) -> list[Node]:
        """Walk to the k closest contacts that answer; returns them, closest first."""
        outstanding: dict[asyncio.Future[tuple[bool, Any]], tuple[Node, float]] = {}  # -> (node, wait ends)
        while True:
            window = self._window()
            asked = sum(1 for n in window if self._state[n.id] is _State.ASKED)
            for node in window:
                if asked >= self.alpha:
                    break
                if self._state[node.id] is _State.NEW:
                    self._state[node.id] = _State.ASKED
                    wait = self.protocol.liveness.rto(address_of(node))
                    outstanding[self._ask(node)] = (node, time.monotonic() + wait)
                    self.stats.sent += 1
                    asked += 1
            if all(self._state[n.id] is _State.ANSWERED for n in window):
                slow_only = bool(outstanding) and not any(
                    self._state[n.id] is _State.ANSWERED for n in self._nodes.values()
                )
                if not slow_only and not self._found() and self._held_back:
                    # no copy among those who answered: ask the suspects before calling the key missing
                    self.stats.asked_suspects += len(self._held_back)
                    for node in self._held_back.values():
                        if node.id not in self._nodes:  # it may have answered since and joined the lookup
                            self._add(node)
                    self._held_back.clear()
                    continue
                if not slow_only and (self._found() or not outstanding):
                    break  # every contact in the window answered (or nobody is left to ask)
                if slow_only:
                    self.stats.waited_on_slow += 1  # nobody answered yet: the slow ones are all we have
                else:
                    self.stats.waited_for_value += 1  # no copy among those who answered: a slow one may hold it
            waits = [ends for future, (node, ends) in outstanding.items() if self._state[node.id] is _State.ASKED]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
            done, _ = await asyncio.wait(outstanding, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                node, _ = outstanding.pop(future)
                ok, reply = future.result()
                contacts = self._read(node, reply) if ok else None
                if contacts is None:
                    self._state[node.id] = _State.FAILED
                    self.stats.failed += 1
                else:
                    self._state[node.id] = _State.ANSWERED
                    self.stats.answered += 1
                    self._push(contacts)
            now = time.monotonic()
            for _future, (node, ends) in outstanding.items():
                if self._state[node.id] is _State.ASKED and ends <= now:
                    self._state[node.id] = _State.SLOW
                    self.stats.slow += 1
                    self.protocol.liveness.mark_suspect(address_of(node))
        # Requests still outstanding run on to their rpc timeout in the protocol (dead or alive, it learns).
        return [n for n in self._window() if self._state[n.id] is _State.ANSWERED]


class NodeLookup(Lookup):
    """Find the k live nodes closest to `target`."""

    def _ask(self, node: Node) -> asyncio.Future[tuple[bool, Any]]:
        return self.protocol.find_node_request(node, self.target)

    def _read(self, node: Node, reply: Any) -> list[Node] | None:
        return parse_contacts(reply, self.protocol.source_node.id)


class RecordLookup(Lookup):
    """Walk to the k closest nodes of a key and merge the records they hold into `self.record`.

    The merged record is built up as replies arrive, so a caller that runs out of time can still use
    what was found so far.
    """

    def __init__(
        self, protocol: PollenProtocol, name: str, target: Node, peers: list[Node], ksize: int, alpha: int
    ) -> None:
        super().__init__(protocol, target, peers, ksize, alpha)
        self.name = name
        self.record: Record = {}
        self.holders = 0  # nodes that answered with a copy
        # A peer may run with larger caps than ours; a reply is bounded by the datagram size anyway.
        self._reply_limits = dataclasses.replace(
            protocol.storage.limits, max_value_bytes=MAX_VALUE_BYTES_LIMIT, max_subkeys_per_key=1 << 16
        )

    def _ask(self, node: Node) -> asyncio.Future[tuple[bool, Any]]:
        return self.protocol.find_value_request(node, self.target)

    def _found(self) -> bool:
        return self.holders > 0

    def _read(self, node: Node, reply: Any) -> list[Node] | None:
        if not isinstance(reply, dict):
            return None
        contacts = parse_contacts(reply.get("nodes"), self.protocol.source_node.id)
        if contacts is None:
            return None
        if "value" not in reply:
            return contacts
        now = self.protocol.storage.clock()
        try:
            record = parse_wire_record(reply["value"], self._reply_limits, now)
        except InvalidRecord as e:
            log.debug("ignored a malformed record in a find_value reply: %s", e)
            return None
        good, refused = self.protocol.validator.filter(self.name, record)
        if refused:
            log.info("a find_value reply for %r held %d bad sub-keys: %s", self.name[:64], len(refused), refused[0])
        if good:
            self.holders += 1
            merge_into(self.record, good, now)
        return contacts
