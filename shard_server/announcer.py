"""Announcer: stores this server's ServerRecord under the DHT key of every block it holds, and refreshes
it before it expires. The record also backs the Info RPC, so what grpcurl shows is what the DHT holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from swarm.blocks import BlockRange, block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.identity import Identity
from swarm.records import MODELS_KEY, ModelRecord, ServerRecord, ServerState, model_key

log = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: DhtClient | None,
        model_id: str,
        blocks: BlockRange,
        peer_id: str,
        make_record: Callable[[ServerState], ServerRecord],
        ttl_s: float,
        period_s: float,
        identity: Identity | None = None,
        model_info: ModelRecord | None = None,
    ) -> None:
        self.dht = dht  # None: standalone, records are built (for Info) but never stored
        self.model_id = model_id
        self.blocks = blocks
        self.peer_id = peer_id
        self.make_record = make_record
        self.ttl_s = ttl_s
        self.period_s = period_s
        self.record: ServerRecord | None = None  # the last record built (stored or not)
        self.last_expiration = 0.0  # latest expiration ever sent; OFFLINE must expire later to win the merge
        # With an identity every sub-key is signed (strict dht-nodes refuse anything else) and peer_id must be
        # identity.peer_id; model_info is also announced under <model>.model and the pollen.models index.
        self.identity = identity
        self.model_info = model_info

    async def announce(self, state: ServerState, expiration: float | None = None) -> bool:
        """Build a fresh record and store it for all blocks concurrently; True if every store succeeded."""
        record = self.make_record(state)
        self.record = record
        if self.dht is None:
            return True
        if expiration is None:
            expiration = time.time() + self.ttl_s
        value = record.encode()
        # Counted before the store: a store cancelled mid-flight may still land, and OFFLINE must outlive it.
        self.last_expiration = max(self.last_expiration, expiration)
        dht, identity = self.dht, self.identity
        items = [(block_key(self.model_id, i), value) for i in range(*self._range())]
        if self.model_info is not None:
            info = self.model_info.encode()
            items += [(model_key(self.model_id), info), (MODELS_KEY, info)]
        results = await asyncio.gather(
            *(
                dht.store_signed(identity, key, data, expiration)
                if identity is not None
                else dht.store(key, self.peer_id, data, expiration)
                for key, data in items
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if r is not True]
        if failures:
            first = failures[0]
            reason = f"{type(first).__name__}: {first}" if isinstance(first, BaseException) else "not stored"
            if isinstance(first, BaseException) and not isinstance(first, PollenError | OSError):
                log.error("announce %s failed unexpectedly", state.value, exc_info=first)
            log.warning("announce %s: %d of %d blocks not stored (%s)", state.value, len(failures), len(results),
                        reason)  # fmt: skip
            return False
        log.debug("announced %s for blocks %s until %.0f", state.value, self.blocks, expiration)
        return True

    async def announce_until_stored(self, state: ServerState, timeout_s: float) -> None:
        """First announcement: retry with backoff; raise TimeoutError if no dht-node took it in time."""
        deadline = time.monotonic() + timeout_s
        delay = 0.2
        while not await self.announce(state):
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"could not store the announcement on any dht-node within {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def announce_offline(self) -> bool:
        # The DHT keeps, per sub-key, the value with the LATER expiration: an OFFLINE record expiring no later
        # than the last ONLINE one would be ignored and clients would keep routing here until it expires.
        expiration = max(self.last_expiration + 1.0, time.time() + 1.0)
        return await self.announce(ServerState.OFFLINE, expiration)

    async def leave(self, timeout_s: float = 3.0) -> None:
        """OFFLINE at shutdown, waiting at most `timeout_s` (the ONLINE record expires by itself anyway)."""
        if self.dht is None:
            return
        try:
            stored = await asyncio.wait_for(self.announce_offline(), timeout_s)
        except TimeoutError:
            stored = False
        if not stored:
            log.warning("OFFLINE announcement not stored; the ONLINE record expires by itself within the ttl")

    async def run(self, state: Callable[[], ServerState]) -> None:
        """Refresh the record every period; a failed refresh is retried at the next tick (ttl > 2 periods)."""
        while True:
            await asyncio.sleep(self.period_s)
            await self.announce(state())

    def _range(self) -> tuple[int, int]:
        return self.blocks.start, self.blocks.end
