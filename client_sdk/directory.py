"""SwarmView: the client's picture of who serves which blocks, read from the DHT in one batch call.

`decode_block_records` is the pure part (bytes from the DHT -> live records per block, with the reasons
records were skipped); `SwarmView` adds the DHT call, the age of the view and a ban list with expiry that
routing consults. Refreshes happen per generate call at most, never per token.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from client_sdk.routing import RouteCosts, Span, find_route
from swarm.blocks import block_key
from swarm.dht_client import DhtClient, Record
from swarm.errors import MissingBlocks, ModelMismatch
from swarm.records import ServerRecord, ServerState

log = logging.getLogger(__name__)


@dataclass
class BlockRecords:
    """Live records per block plus counts of what was skipped and why (for error messages)."""

    per_block: list[dict[str, ServerRecord]]  # per_block[i] = {peer_id: record} for block i
    skipped: Counter[str] = field(default_factory=Counter)
    foreign_hashes: set[str] = field(default_factory=set)  # model_hash values that did not match ours

    def servers(self) -> list[ServerRecord]:
        """Unique live records (one per peer and range), ordered by range."""
        unique = {(r.peer_id, r.start, r.end): r for block in self.per_block for r in block.values()}
        return sorted(unique.values(), key=lambda r: (r.start, r.end, r.peer_id))


def decode_block_records(
    raw: Sequence[Record], model_id: str, model_hash: str, now: float, first_block: int = 0
) -> BlockRecords:
    """Keep records that are well-formed, unexpired, ONLINE, for this model and that cover their block.

    `raw[i]` is the DHT record of block `first_block + i`. Peers can write anything, so every way a record
    can be unusable is expected and only logged at debug level.
    """
    out = BlockRecords(per_block=[{} for _ in raw])
    for i, entries in enumerate(raw):
        block = first_block + i
        for subkey, entry in entries.items():
            record = ServerRecord.decode(entry.value)
            reason = _skip_reason(record, entry.expiration, block, model_id, model_hash, now)
            if record is None or reason:
                out.skipped[reason] += 1
                log.debug("skip record %s of block %d: %s", subkey, block, reason)
                if reason == "model_hash mismatch" and record is not None:
                    out.foreign_hashes.add(record.model_hash)
                continue
            out.per_block[i][record.peer_id] = record
    return out


def _skip_reason(
    record: ServerRecord | None, expiration: float, block: int, model_id: str, model_hash: str, now: float
) -> str:
    """Why a record cannot be used for `block`, or "" if it can."""
    if record is None:
        return "garbage"
    if expiration < now:
        return "expired"
    if record.state != ServerState.ONLINE:
        return f"state {record.state.value}"
    if record.model_id != model_id:
        return "other model_id"
    if model_hash and record.model_hash and record.model_hash != model_hash:
        return "model_hash mismatch"
    if block not in record.blocks:
        return f"announces {record.blocks} under block {block}"
    return ""


class SwarmView:
    """Records of all blocks of one model, refreshed on demand, plus peers banned for a while."""

    def __init__(
        self,
        dht: DhtClient,
        model_id: str,
        num_blocks: int,
        model_hash: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.model_hash = model_hash
        self._clock = clock
        self.records = BlockRecords(per_block=[{} for _ in range(num_blocks)])
        self.updated_at = 0.0  # clock time of the last successful refresh; 0 = never
        self._banned_until: dict[str, float] = {}
        self.costs = RouteCosts()  # measured RTTs land here once pings exist

    async def refresh(self) -> BlockRecords:
        """One DHT BatchGet over every block key (raises DhtUnavailable if no dht-node answers)."""
        keys = [block_key(self.model_id, i) for i in range(self.num_blocks)]
        raw = await self.dht.batch_get(keys)
        now = self._clock()
        self.records = decode_block_records(raw, self.model_id, self.model_hash, now)
        self.updated_at = now
        if self.records.skipped:
            log.debug("DHT refresh skipped records: %s", dict(self.records.skipped))
        return self.records

    def age_s(self) -> float:
        return self._clock() - self.updated_at if self.updated_at else float("inf")

    def ban(self, peer_id: str, duration_s: float) -> None:
        """Avoid `peer_id` in routes for `duration_s` (e.g. after it failed a call)."""
        self._banned_until[peer_id] = self._clock() + duration_s
        log.info("avoiding peer %s for %.0f s", peer_id, duration_s)

    def banned(self) -> set[str]:
        now = self._clock()
        self._banned_until = {p: t for p, t in self._banned_until.items() if t > now}
        return set(self._banned_until)

    def route(self, start: int = 0, end: int | None = None) -> list[Span]:
        """Cheapest chain for blocks [start, end) over the current records.

        Raises ModelMismatch when the only servers for a missing block run another config of the model
        (more useful than "missing"), else MissingBlocks.
        """
        end = self.num_blocks if end is None else end
        try:
            return find_route(
                self.records.servers(), start, end, self.costs, banned=self.banned(), model_id=self.model_id
            )
        except MissingBlocks as e:
            if self.records.foreign_hashes:
                mismatch = ModelMismatch(
                    f"{e}. Servers announced blocks of {self.model_id} with config fingerprint(s) "
                    f"{', '.join(sorted(self.records.foreign_hashes))}, but the local config.json has "
                    f"{self.model_hash}: client and servers must use the same model"
                )
                mismatch.retryable = False  # our own files differ: re-reading the DHT will not help
                raise mismatch from e
            banned = self.banned()
            if banned:
                raise MissingBlocks(
                    f"{e} ({len(banned)} server(s) failed recently and are avoided for up to "
                    f"{max(self._banned_until.values()) - self._clock():.0f} s)"
                ) from e
            raise
