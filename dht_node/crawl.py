"""Iterative lookups over the overlay: find the k closest nodes to a key, or merge a key's record from them.

Stock kademlia's ValueSpiderCrawl stops at the first round that sees any value and takes a Counter
majority of the values (which fails on dicts and lets one stale copy win). RecordCrawl instead walks on to
the k closest nodes, like a node lookup, and merges every copy it meets: per sub-key the later
expiration wins, so stale copies lose and sub-keys written through different nodes all show up.
Both crawls validate what peers answer and skip contacts that recently timed out; RecordCrawl also drops
sub-keys whose owner signature or schema fails, so a lying node cannot slip a forged announcement in.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node

from dht_node.protocol import PollenProtocol, parse_contacts
from dht_node.storage import MAX_VALUE_BYTES_LIMIT, InvalidRecord, Record, merge_into, parse_wire_record

log = logging.getLogger(__name__)


class _Crawl(SpiderCrawl):
    protocol: PollenProtocol

    def __init__(self, protocol: PollenProtocol, target: Node, peers: list[Node], ksize: int, alpha: int) -> None:
        super().__init__(protocol, target, [p for p in peers if not protocol.is_dead(p)], ksize, alpha)

    def _push_contacts(self, contacts: list[Node]) -> None:
        self.nearest.push([n for n in contacts if not self.protocol.is_dead(n)])

    def _drop_failed(self, failed: list[bytes]) -> None:
        if not failed:
            return
        self.nearest.remove(failed)
        # A failed contact was removed from our routing table, which may promote a replacement contact that
        # nobody else advertises: offer the table's current view to the lookup again.
        self._push_contacts(self.protocol.router.find_neighbors(self.node))

    def _done(self) -> bool:
        return bool(self.nearest.have_contacted_all())


class NodeCrawl(_Crawl):
    """Find the k live nodes closest to `target` (a validated NodeSpiderCrawl)."""

    async def find(self) -> list[Node]:
        return list(await self._find(self.protocol.call_find_node))

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> list[Node]:
        failed = []
        for peer_id, (ok, payload) in responses.items():
            contacts = parse_contacts(payload, self.protocol.source_node.id) if ok else None
            if contacts is None:
                failed.append(peer_id)
            else:
                self._push_contacts(contacts)
        self._drop_failed(failed)
        if self._done():
            return list(self.nearest)
        return await self.find()


class RecordCrawl(_Crawl):
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

    async def find(self) -> Record:
        await self._find(self.protocol.call_find_value)
        return self.record

    async def _nodes_found(self, responses: dict[bytes, tuple[bool, Any]]) -> Record:
        failed = []
        now = self.protocol.storage.clock()
        for peer_id, (ok, payload) in responses.items():
            parsed = self._parse_reply(payload, now) if ok else None
            if parsed is None:
                failed.append(peer_id)
                continue
            contacts, record = parsed
            self._push_contacts(contacts)
            if record:
                self.holders += 1
                merge_into(self.record, record, now)
        self._drop_failed(failed)
        if self._done():
            return self.record
        return await self.find()

    def _parse_reply(self, payload: object, now: float) -> tuple[list[Node], Record] | None:
        if not isinstance(payload, dict):
            return None
        contacts = parse_contacts(payload.get("nodes"), self.protocol.source_node.id)
        if contacts is None:
            return None
        if "value" not in payload:
            return contacts, {}
        try:
            record = parse_wire_record(payload["value"], self._reply_limits, now)
        except InvalidRecord as e:
            log.debug("ignored a malformed record in a find_value reply: %s", e)
            return None
        good, refused = self.protocol.validator.filter(self.name, record)
        if refused:
            log.info("a find_value reply for %r held %d bad sub-keys: %s", self.name[:64], len(refused), refused[0])
        return contacts, good
