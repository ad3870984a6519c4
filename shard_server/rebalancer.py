"""Rebalancer: every balance period (jittered ±50% so servers do not all move at once) read the swarm's
records and, when `block_selection.should_move` says so, move this server to other blocks.

Moving (ShardServer.move_to) = announce DRAINING, refuse new sessions, let running ones finish (up to the drain
timeout), announce the old blocks OFFLINE, unload them, load the new ones, announce ONLINE. The old blocks are
unloaded before the new ones load, so a server that chose its block count to fit memory never needs twice that.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from shard_server.block_selection import should_move
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.records import ServerRecord

if TYPE_CHECKING:
    from shard_server.server import ShardServer

log = logging.getLogger(__name__)


async def fetch_records(dht: DhtClient, model_id: str, total_blocks: int) -> list[ServerRecord]:
    """Every decodable server record under the model's block keys (one per peer and block; dedup is the caller's)."""
    entries = await dht.batch_get([block_key(model_id, i) for i in range(total_blocks)])
    records = []
    for per_block in entries:
        for entry in per_block.values():
            record = ServerRecord.decode(entry.value)
            if record is not None and record.model_id == model_id:
                records.append(record)
    return records


class Rebalancer:
    def __init__(self, server: ShardServer, dht: DhtClient, total_blocks: int, period_s: float, quality: float) -> None:
        self.server = server
        self.dht = dht
        self.total_blocks = total_blocks
        self.period_s = period_s
        self.quality = quality

    async def check(self) -> bool:
        """One balance check; moves the server and returns True when that helps the swarm."""
        server = self.server
        current = server.blocks
        if current is None:
            return False
        try:
            records = await fetch_records(self.dht, server.model_id, self.total_blocks)
        except (PollenError, OSError) as e:
            log.warning("balance check skipped: cannot read the swarm's records (%s)", e)
            return False
        # Announced records are deduplicated per peer (our own included) inside should_move.
        target = should_move(records, server.peer_id, current, self.total_blocks, server.throughput_tps, self.quality)
        if target is None:
            log.debug("balance check: staying on blocks %s", current)
            return False
        log.info("balance check: moving from blocks %s to %s raises the swarm's bottleneck", current, target)
        await server.move_to(target)
        return True

    async def _run_balance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s * random.uniform(0.5, 1.5))
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — one failed check must not end rebalancing
                log.exception("balance check failed")
