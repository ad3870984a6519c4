"""Rebalancer: every balance period (jittered ±50% so servers do not all move at once) read the swarm's
records and, when `block_selection.should_move` says so, move this server to other blocks.

Moving (`ShardServer.move_to`, passed in as `move`) = announce DRAINING, refuse new sessions, let running ones
finish (up to the drain timeout), announce the old blocks OFFLINE, unload them, load the new ones, announce
ONLINE. The old blocks are unloaded before the new ones load, so a server that chose its block count to fit
memory never needs twice that.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from shard_server.block_selection import should_move
from swarm.blocks import BlockRange, block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.records import ServerRecord, decode_server_records

log = logging.getLogger(__name__)


async def fetch_records(dht: DhtClient, model_id: str, total_blocks: int) -> list[ServerRecord]:
    """The valid, unexpired server records under the model's block keys (one per peer and block; dedup is the
    caller's)."""
    keys = [block_key(model_id, i) for i in range(total_blocks)]
    entries = await dht.batch_get(keys)
    records = [decode_server_records(key, per_block) for key, per_block in zip(keys, entries, strict=True)]
    return [r for per_block in records for r in per_block.values()]


class Rebalancer:
    def __init__(
        self,
        dht: DhtClient,
        model_id: str,
        peer_id: str,
        total_blocks: int,
        period_s: float,
        quality: float,
        current: Callable[[], BlockRange | None],  # the blocks served now
        throughput_tps: Callable[[], float],  # what this server announces
        move: Callable[[BlockRange], Awaitable[None]],
    ) -> None:
        self.dht = dht
        self.model_id = model_id
        self.peer_id = peer_id
        self.total_blocks = total_blocks
        self.period_s = period_s
        self.quality = quality
        self.current = current
        self.throughput_tps = throughput_tps
        self.move = move

    async def check(self) -> bool:
        """One balance check; moves the server and returns True when that helps the swarm."""
        current = self.current()
        if current is None:
            return False
        try:
            records = await fetch_records(self.dht, self.model_id, self.total_blocks)
        except (PollenError, OSError) as e:
            log.warning("balance check skipped: cannot read the swarm's records (%s)", e)
            return False
        # Announced records are deduplicated per peer (our own included) inside should_move.
        target = should_move(records, self.peer_id, current, self.total_blocks, self.throughput_tps(), self.quality)
        if target is None:
            log.debug("balance check: staying on blocks %s", current)
            return False
        log.info("balance check: moving from blocks %s to %s raises the swarm's bottleneck", current, target)
        await self.move(target)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s * random.uniform(0.5, 1.5))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — one failed check must not end rebalancing
                log.exception("balance check failed")
