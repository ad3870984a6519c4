"""SwarmView: the client's picture of who serves which blocks, read from the DHT in one batch call.

`decode_block_records` is the pure part (bytes from the DHT -> live records per block, with the reasons
records were skipped); `SwarmView` adds the DHT call, the age of the view, smoothed client->server RTTs
(pings), a ban list with exponential backoff, and `wait_route`, which re-reads the DHT for a while when
blocks are missing. The client refreshes it in the background (`run_refresh_loop`), never per token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from client_sdk.routing import RouteCosts, Span, find_route, sample_route
from client_sdk.transport import ChannelPool
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import MissingBlocks, ModelMismatch, PollenError
from swarm.records import Record, ServerRecord, ServerState, decode_server_records

log = logging.getLogger(__name__)

# Precision levels of a server's blocks, best first: float32 > 16-bit floats > int8 > nf4 (float16 and bfloat16
# count as one level). A client's `min_precision` keeps servers at or above a level: "int8" excludes nf4
# servers, "bfloat16" (or "float16") excludes every quantized server, "float32" keeps float32 servers only.
PRECISION_RANK = {"nf4": 1, "int8": 2, "float16": 3, "bfloat16": 3, "float32": 4}


def record_precision(record: ServerRecord) -> str:
    """ "nf4"/"int8" for quantized servers, else the dtype of the blocks."""
    return record.quant if record.quant and record.quant != "none" else record.dtype


def check_precision(name: str | None) -> None:
    if name is not None and name not in PRECISION_RANK:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISION_RANK)}")


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
    raw: Sequence[Record],
    model_id: str,
    model_hash: str,
    now: float,
    first_block: int = 0,
    min_precision: str | None = None,
    adapter: str = "",
) -> BlockRecords:
    """Keep records that are trustworthy, well-formed, unexpired, ONLINE, for this model and cover their block.

    `raw[i]` is the DHT record of block `first_block + i`. Signatures, schema, expiry, model and block are
    checked by swarm.records.decode_server_records; this adds the client's policy (state, model hash,
    precision, the adapter a client asks for). Peers can write anything, so every way a record can be unusable
    is only logged at debug level.
    """
    out = BlockRecords(per_block=[{} for _ in raw])
    for i, entries in enumerate(raw):
        block = first_block + i
        for peer_id, record in decode_server_records(
            block_key(model_id, block), entries, now, skipped=out.skipped
        ).items():
            reason = _skip_reason(record, model_hash, min_precision, adapter)
            if reason:
                out.skipped[reason] += 1
                log.debug("skip record of %s for block %d: %s", peer_id[:16], block, reason)
                if reason == "model_hash mismatch":
                    out.foreign_hashes.add(record.model_hash)
                continue
            out.per_block[i][peer_id] = record
    return out


def _skip_reason(record: ServerRecord, model_hash: str, min_precision: str | None = None, adapter: str = "") -> str:
    """Why the client does not use a valid record, or "" if it does."""
    if record.state != ServerState.ONLINE:
        return f"state {record.state.value}"
    if model_hash and record.model_hash and record.model_hash != model_hash:
        return "model_hash mismatch"
    if min_precision and PRECISION_RANK.get(record_precision(record), 0) < PRECISION_RANK[min_precision]:
        return f"precision {record_precision(record)} below min_precision {min_precision}"
    if adapter and adapter not in record.adapters:
        return f"lacks adapter {adapter}"
    return ""


class SwarmView:
    """Records of all blocks of one model, refreshed on demand, plus RTTs and peers banned for a while."""

    def __init__(
        self,
        dht: DhtClient,
        model_id: str,
        num_blocks: int,
        model_hash: str = "",
        clock: Callable[[], float] = time.time,
        *,
        ban_s: float = 15.0,
        max_ban_s: float = 300.0,
        rtt_ema_alpha: float = 0.3,
        min_precision: str | None = None,
        adapter: str = "",
    ) -> None:
        check_precision(min_precision)
        self.adapter = adapter  # route only through servers holding this LoRA adapter ("" = any server)
        self.min_precision = min_precision  # servers announcing a lower precision are not used (see above)
        self.dht = dht
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.model_hash = model_hash
        self._clock = clock
        self.records = BlockRecords(per_block=[{} for _ in range(num_blocks)])
        self.updated_at = 0.0  # clock time of the last successful refresh; 0 = never
        self.ban_s = ban_s
        self.max_ban_s = max_ban_s
        self.rtt_ema_alpha = rtt_ema_alpha
        self._banned_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}  # consecutive failures per peer: the ban doubles with each
        # Peers caught computing wrong outputs (verified steps): never used again by this client.
        self.distrusted: dict[str, str] = {}  # peer_id -> why
        self.rtts_ms: dict[str, float] = {}  # smoothed client -> server RTT per peer_id
        self._refreshing: asyncio.Task[BlockRecords] | None = None

    @property
    def costs(self) -> RouteCosts:
        return RouteCosts(rtts_ms=self.rtts_ms)

    async def refresh(self) -> BlockRecords:
        """One DHT BatchGet over every block key (raises DhtUnavailable if no dht-node answers).
        Concurrent callers share one read."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> BlockRecords:
        keys = [block_key(self.model_id, i) for i in range(self.num_blocks)]
        # signatures are checked in decode_block_records too: a dht-node we asked may be the one lying
        raw = await self.dht.batch_get(keys)
        now = self._clock()
        self.records = decode_block_records(
            raw, self.model_id, self.model_hash, now, min_precision=self.min_precision, adapter=self.adapter
        )
        self.updated_at = now
        if self.records.skipped:
            log.debug("DHT refresh skipped records: %s", dict(self.records.skipped))
        return self.records

    def age_s(self) -> float:
        return self._clock() - self.updated_at if self.updated_at else float("inf")

    # ---- bans ------------------------------------------------------------------------------------------

    def ban(self, peer_id: str, duration_s: float | None = None) -> float:
        """Avoid `peer_id` in routes for a while (after it failed a call): `duration_s`, or `ban_s`
        doubled for every consecutive failure, up to `max_ban_s`. Returns the ban's length."""
        failures = self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
        if duration_s is None:
            duration_s = min(self.max_ban_s, self.ban_s * 2 ** (failures - 1))
        self._banned_until[peer_id] = self._clock() + duration_s
        log.info("avoiding peer %s for %.0f s (failure %d)", peer_id, duration_s, failures)
        return duration_s

    def distrust(self, peer_id: str, why: str) -> None:
        """Never route through `peer_id` again in this client's lifetime (it returned wrong outputs)."""
        if peer_id not in self.distrusted:
            log.error("peer %s banned for this client's lifetime: %s", peer_id, why)
        self.distrusted[peer_id] = why

    def mark_ok(self, peer_id: str) -> None:
        """A call to the peer succeeded: its next failure starts the backoff over."""
        self._failures.pop(peer_id, None)

    def banned(self) -> set[str]:
        """Peers avoided now: those that failed recently and the distrusted ones."""
        now = self._clock()
        self._banned_until = {p: t for p, t in self._banned_until.items() if t > now}
        return set(self._banned_until) | set(self.distrusted)

    # ---- RTTs ------------------------------------------------------------------------------------------

    def record_rtt(self, peer_id: str, rtt_ms: float) -> None:
        old = self.rtts_ms.get(peer_id)
        a = self.rtt_ema_alpha
        self.rtts_ms[peer_id] = rtt_ms if old is None else (1 - a) * old + a * rtt_ms

    async def ping(self, pool: ChannelPool, timeout_s: float = 2.0, max_pinged: int = 16) -> None:
        """Measure the RTT to live servers with the Info RPC (unmeasured ones first); a server that does
        not answer is not banned here (routing pays its default RTT), only unmeasured."""
        servers = {r.peer_id: r.address for r in self.records.servers() if r.peer_id not in self.banned()}
        order = sorted(servers, key=lambda p: (p in self.rtts_ms, random.random()))[:max_pinged]

        async def one(peer_id: str) -> None:
            t0 = time.perf_counter()
            try:
                await pool.info(servers[peer_id], timeout_s)
            except PollenError as e:
                log.debug("ping %s failed: %s", servers[peer_id], e)
                return
            self.record_rtt(peer_id, (time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(one(p) for p in order))

    async def run_refresh_loop(self, pool: ChannelPool, period_s: float, timeout_s: float, max_pinged: int) -> None:
        """Background: re-read the DHT and re-measure RTTs every `period_s` (errors are logged, not raised)."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.refresh()
                await self.ping(pool, timeout_s, max_pinged)
            except PollenError as e:
                log.warning("background refresh of the swarm view failed: %s", e)

    # ---- routes ----------------------------------------------------------------------------------------

    def route(
        self,
        start: int = 0,
        end: int | None = None,
        costs: RouteCosts | None = None,
        mode: str = "min_latency",
        ignore_bans: bool = False,
    ) -> list[Span]:
        """A chain for blocks [start, end) over the current records: the cheapest (`min_latency`, inference)
        or a throughput-weighted random one (`max_throughput`, Forward/Backward; may start mid-span).
        `ignore_bans` uses peers that failed recently too (never distrusted ones): a last resort under churn.

        Raises ModelMismatch when the only servers for a missing block run another config of the model
        (more useful than "missing"), else MissingBlocks.
        """
        end = self.num_blocks if end is None else end
        records, banned = self.records.servers(), (set(self.distrusted) if ignore_bans else self.banned())
        try:
            if mode == "max_throughput":
                return sample_route(records, start, end, banned=banned, model_id=self.model_id)
            if mode != "min_latency":
                raise ValueError(f"unknown routing mode {mode!r}; use min_latency or max_throughput")
            return find_route(records, start, end, costs or self.costs, banned=banned, model_id=self.model_id)
        except MissingBlocks as e:
            if self.records.foreign_hashes:
                mismatch = ModelMismatch(
                    f"{e}. Servers announced blocks of {self.model_id} with config fingerprint(s) "
                    f"{', '.join(sorted(self.records.foreign_hashes))}, but the local config.json has "
                    f"{self.model_hash}: client and servers must use the same model"
                )
                mismatch.retryable = False  # our own files differ: re-reading the DHT will not help
                raise mismatch from e
            if self.adapter and self.records.skipped[f"lacks adapter {self.adapter}"]:
                raise MissingBlocks(f"{e}; no server holding adapter {self.adapter!r} serves them") from e
            below = sum(n for reason, n in self.records.skipped.items() if reason.startswith("precision "))
            if below:
                raise MissingBlocks(
                    f"{e} ({below} record(s) of servers with a precision below min_precision="
                    f"{self.min_precision} were ignored)"
                ) from e
            if banned:
                raise MissingBlocks(
                    f"{e} ({len(banned)} server(s) failed recently and are avoided for up to "
                    f"{max(self._banned_until.values()) - self._clock():.0f} s)"
                ) from e
            raise

    async def wait_route(
        self,
        start: int = 0,
        end: int | None = None,
        costs: RouteCosts | None = None,
        mode: str = "min_latency",
        wait_s: float = 0.0,
        max_age_s: float = float("inf"),
        poll_s: float = 1.0,
    ) -> list[Span]:
        """`route`, re-reading the DHT first if the view is older than `max_age_s`, and re-reading it every
        `poll_s` for up to `wait_s` while some blocks have no usable server (then MissingBlocks)."""
        if self.age_s() > max_age_s:
            await self.refresh()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.route(start, end, costs, mode)
            except MissingBlocks as e:
                if not e.retryable or time.monotonic() + poll_s > deadline:
                    raise
                log.info("%s; waiting up to %.0f s more", e, deadline - time.monotonic())
            await asyncio.sleep(poll_s)
            await self.refresh()
