"""NextHops: where this server may push a session's output. A client names the next server of its chain
(`next_servers`), but a server that dialled whatever it was told would be an open proxy: any client could make
it connect anywhere. So a push goes only to an address that a signed, unexpired record in the DHT announces
for the same model (same model_id and model hash), ONLINE or DRAINING (a draining server still finishes its
sessions), with blocks starting exactly where the pushing session's blocks end: the one place the client's
chain can continue. Records are verified by `swarm.records.decode_server_records` (signed by the peer they
name), so whoever answers the lookup cannot add an address either.

Lookups are cached per first block: the hot path (one push per token) costs a dict lookup, and a cache older
than REFRESH_S is refreshed in the background (a server that left is dropped within that time, or when its
record expires). An address not in the cache refetches at most once per MIN_REFETCH_S per block, and that push
waits for the answer (a server that just joined is found within a second; a client naming bogus addresses
cannot turn this server into a DHT flooder).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.records import ServerState, decode_server_records

log = logging.getLogger(__name__)

REFRESH_S = 10.0  # a block's verified addresses are re-read this often while pushes use them
MIN_REFETCH_S = 1.0  # an unknown address triggers at most one lookup per block this often
LIVE_STATES = (ServerState.ONLINE, ServerState.DRAINING)


@dataclass
class _Known:
    fetched_at: float = 0.0  # time.monotonic() of the last lookup (0: never)
    addresses: dict[str, float] = field(default_factory=dict)  # address -> its record's expiration (unix time)


class NextHops:
    def __init__(self, dht: DhtClient | None, model_id: str, model_hash: str) -> None:
        self.dht = dht  # None: a standalone server, which has no swarm to verify anyone against
        self.model_id = model_id
        self.model_hash = model_hash
        self._known: dict[int, _Known] = {}  # by the first block of the next span
        self._lookups: dict[int, asyncio.Task[None]] = {}  # one lookup per block at a time

    async def problem(self, first_block: int, address: str) -> str | None:
        """None if `address` may receive a push for a span starting at `first_block`, else why not."""
        if self.dht is None:
            return "this server is standalone (no DHT) and cannot verify next servers, so it does not push"
        known = self._known.get(first_block, _Known())
        age = time.monotonic() - known.fetched_at
        if self._vouched(known, address):
            if age > REFRESH_S:
                self._start_lookup(first_block)  # refreshed in the background: the hot path never waits for it
            return None
        if age > MIN_REFETCH_S:  # maybe a server that just joined: look once, and wait for the answer
            await asyncio.shield(self._start_lookup(first_block))  # a cancelled push leaves the lookup running
            if self._vouched(self._known.get(first_block, known), address):
                return None
        return (
            f"no signed record announces {address} serving {self.model_id} from block {first_block} (the end of "
            f"this session's blocks); this server pushes only to the swarm's next servers"
        )

    @staticmethod
    def _vouched(known: _Known, address: str) -> bool:
        expiration = known.addresses.get(address)
        return expiration is not None and expiration >= time.time()

    def prefetch(self, first_block: int) -> None:
        """Start the lookup for a session that just opened, so its first push does not wait for it."""
        known = self._known.get(first_block)
        if self.dht is not None and (known is None or time.monotonic() - known.fetched_at > REFRESH_S):
            self._start_lookup(first_block)

    def _start_lookup(self, first_block: int) -> asyncio.Task[None]:
        task = self._lookups.get(first_block)
        if task is None:
            task = asyncio.create_task(self._fetch(first_block), name=f"next-hops-{first_block}")
            self._lookups[first_block] = task
            task.add_done_callback(lambda _: self._lookups.pop(first_block, None))
        return task

    async def _fetch(self, first_block: int) -> None:
        assert self.dht is not None
        key = block_key(self.model_id, first_block)
        fetched_at = time.monotonic()
        try:
            (entries,) = await self.dht.batch_get([key])
        except (PollenError, OSError) as e:
            log.info("cannot read the records of block %d to verify next servers: %s", first_block, e)
            # Keep what was verified before (records expire by their own time); try again after MIN_REFETCH_S.
            self._known.setdefault(first_block, _Known()).fetched_at = fetched_at
            return
        addresses: dict[str, float] = {}
        for peer_id, record in decode_server_records(key, entries).items():
            if record.start == first_block and record.model_hash == self.model_hash and record.state in LIVE_STATES:
                addresses[record.address] = max(addresses.get(record.address, 0.0), entries[peer_id].expiration)
        self._known[first_block] = _Known(fetched_at, addresses)

    async def close(self) -> None:
        tasks = list(self._lookups.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
