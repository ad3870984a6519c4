"""Which blocks to serve: pure functions over the swarm's announced records (no sockets, unit-tested).

The swarm's speed for a model is bounded by its slowest block, so a block's capacity is the sum of the
announced throughput of the live servers holding it, and the swarm's bottleneck is the minimum over blocks.
- `choose_blocks`: the window of N consecutive blocks whose sorted per-block throughputs are lexicographically
  smallest (Petals' rule): unserved blocks first, then the weakest ones.
- `should_move`: where a server would go if it started now (its own contribution removed); it moves only if
  it leaves no block unserved and the bottleneck now is below `balance_quality` × the bottleneck after the move
  (Petals: 0.75, i.e. the move must raise the bottleneck by a third). Unlike Petals, other servers are assumed
  to stay where they are: some are pinned, so counting on them to fill a gap could leave one open.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from swarm.blocks import BlockRange
from swarm.records import ServerRecord, ServerState

LIVE_STATES = (ServerState.JOINING, ServerState.ONLINE)


@dataclass(frozen=True)
class SwarmLoad:
    """Per-block capacity of a swarm and its two summary figures."""

    throughputs: tuple[float, ...]  # tokens/s per block
    servers: tuple[int, ...]  # live servers per block

    @property
    def unserved(self) -> int:
        return sum(1 for n in self.servers if n == 0)

    @property
    def bottleneck(self) -> float:
        return min(self.throughputs, default=0.0)


def live_spans(records: Iterable[ServerRecord], total_blocks: int, exclude_peer: str = "") -> list[ServerRecord]:
    """One record per live peer (the newest), clipped to the model; `exclude_peer` is left out."""
    newest: dict[str, ServerRecord] = {}
    for r in records:
        if r.state not in LIVE_STATES or r.peer_id == exclude_peer or r.start >= total_blocks:
            continue
        if r.peer_id not in newest or r.updated_at > newest[r.peer_id].updated_at:
            newest[r.peer_id] = r
    return list(newest.values())


def swarm_load(spans: Iterable[ServerRecord | tuple[int, int, float]], total_blocks: int) -> SwarmLoad:
    tps = [0.0] * total_blocks
    count = [0] * total_blocks
    for span in spans:
        start, end, throughput = (span.start, span.end, span.throughput_tps) if isinstance(span, ServerRecord) else span
        for block in range(max(0, start), min(end, total_blocks)):
            tps[block] += throughput
            count[block] += 1
    return SwarmLoad(tuple(tps), tuple(count))


def _best_start(load: SwarmLoad, num_blocks: int) -> int:
    # Unserved blocks sort first: (servers == 0) is compared before the throughput itself.
    def window_key(start: int) -> list[tuple[int, float]]:
        window = zip(
            load.servers[start : start + num_blocks], load.throughputs[start : start + num_blocks], strict=True
        )
        return sorted((1 if n else 0, t) for n, t in window)

    return min(range(len(load.throughputs) - num_blocks + 1), key=lambda s: (window_key(s), s))


def choose_blocks(
    records: Iterable[ServerRecord], num_blocks: int, total_blocks: int, own_throughput: float = 1.0
) -> BlockRange:
    """The N consecutive blocks where the swarm is weakest (unserved first; ties: the lowest start).

    `own_throughput` is what this server would add there; it does not change the choice (it adds the same to
    every window) but is part of the signature so callers state what they are comparing.
    """
    if total_blocks < 1:
        raise ValueError("the model has no blocks")
    n = max(1, min(num_blocks, total_blocks))
    load = swarm_load(live_spans(records, total_blocks), total_blocks)
    start = _best_start(load, n)
    return BlockRange(start, start + n)


def should_move(
    records: Sequence[ServerRecord],
    own_peer_id: str,
    current: BlockRange,
    total_blocks: int,
    own_throughput: float,
    balance_quality: float,
) -> BlockRange | None:
    """The range this server should move to, or None to stay (see the module docstring for the rule)."""
    if balance_quality <= 0:
        return None
    others = live_spans(records, total_blocks, exclude_peer=own_peer_id)
    without_me = swarm_load(others, total_blocks)
    if any(without_me.servers[b] == 0 for b in range(current.start, min(current.end, total_blocks))):
        return None  # leaving would leave a block with no server at all
    n = len(current)
    best = _best_start(without_me, n)
    target = BlockRange(best, best + n)
    if target == current:
        return None
    before = swarm_load([*_triples(others), (current.start, current.end, own_throughput)], total_blocks)
    after = swarm_load([*_triples(others), (target.start, target.end, own_throughput)], total_blocks)
    if after.unserved < before.unserved:
        return target
    if after.unserved > before.unserved or after.bottleneck <= 0:
        return None
    return target if before.bottleneck < balance_quality * after.bottleneck else None


def _triples(records: Iterable[ServerRecord]) -> list[tuple[int, int, float]]:
    return [(r.start, r.end, r.throughput_tps) for r in records]
