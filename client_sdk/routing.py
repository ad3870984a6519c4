"""Pure routing: choose a chain of servers that covers blocks [start, end) at the lowest estimated cost.

The graph's nodes are block boundaries start..end. A server holding [s, e) gives edges s -> b for every
b in (s, e] (inference sessions must begin at a server's own first block; Forward accepts any sub-range,
see `prefix_only`). An edge costs the RTT to the server plus the compute time of the blocks it runs.
Dijkstra (heapq) finds the cheapest chain. No sockets, no clocks: everything comes in as arguments, so the
policy is unit-tested on hand-built records. Later routing inputs (pings, bans, server-to-server RTTs)
enter through `RouteCosts` and the `banned` set without changing the callers.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from swarm.errors import MissingBlocks
from swarm.records import ServerRecord

# A record may announce 0 tokens/s (not measured yet); treat it as very slow rather than divide by zero.
MIN_THROUGHPUT_TPS = 1e-3


@dataclass(frozen=True)
class Span:
    """Blocks [start, end) run by one server; `start == record.start` for inference spans."""

    peer_id: str
    address: str
    start: int
    end: int
    record: ServerRecord = field(compare=False, repr=False)

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}@{self.address}"


@dataclass(frozen=True)
class RouteCosts:
    """Inputs of the cost model. `rtts_ms` holds measured client->server RTTs by peer_id; servers not
    measured yet get `default_rtt_ms`, which also makes every extra hop cost something, so ties between
    chains go to the one with fewer servers."""

    rtts_ms: Mapping[str, float] = field(default_factory=dict)
    default_rtt_ms: float = 5.0

    def rtt_s(self, record: ServerRecord) -> float:
        return self.rtts_ms.get(record.peer_id, self.default_rtt_ms) / 1000.0


def compute_s(record: ServerRecord, blocks: int) -> float:
    """Estimated seconds for one token through `blocks` of this server's blocks.

    `throughput_tps` is announced for one step through the server's whole span, so a prefix of it costs
    its share of the span's time.
    """
    per_span_s = 1.0 / max(record.throughput_tps, MIN_THROUGHPUT_TPS)
    return per_span_s * blocks / (record.end - record.start)


def edge_cost_s(record: ServerRecord, blocks: int, costs: RouteCosts) -> float:
    return costs.rtt_s(record) + compute_s(record, blocks)


def missing_ranges(records: Iterable[ServerRecord], start: int, end: int) -> list[tuple[int, int]]:
    """Half-open sub-ranges of [start, end) that no record covers, in order."""
    covered = [False] * (end - start)
    for r in records:
        for block in range(max(r.start, start), min(r.end, end)):
            covered[block - start] = True
    holes: list[tuple[int, int]] = []
    for i, ok in enumerate(covered):
        if ok:
            continue
        if holes and holes[-1][1] == start + i:
            holes[-1] = (holes[-1][0], start + i + 1)
        else:
            holes.append((start + i, start + i + 1))
    return holes


def describe_blocks(start: int, end: int) -> str:
    """Human wording for a half-open range: "12..15" for [12, 16), "7" for [7, 8)."""
    return str(start) if end - start == 1 else f"{start}..{end - 1}"


def find_route(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    costs: RouteCosts | None = None,
    banned: Collection[str] = (),
    prefix_only: bool = True,
    model_id: str = "",
) -> list[Span]:
    """The cheapest chain of spans covering blocks [start, end); raises MissingBlocks if there is none.

    `records` are live records (already filtered for state, expiry and model); `banned` peer_ids are
    skipped. Several records of one peer (e.g. one per block key) are fine: duplicates add parallel edges.
    """
    if not 0 <= start < end:
        raise ValueError(f"invalid block range {start}:{end}")
    costs = costs or RouteCosts()
    usable = {(r.peer_id, r.start, r.end): r for r in records if r.peer_id not in banned}
    # Sorted so that equal-cost choices are deterministic (same swarm -> same route).
    candidates = sorted(usable.values(), key=lambda r: (r.start, r.end, r.peer_id))
    _raise_if_uncovered(candidates, start, end, model_id)

    # edges[a] = [(b, cost, record)]: running blocks [a, b) on `record`.
    edges: dict[int, list[tuple[int, float, ServerRecord]]] = {}
    for r in candidates:
        firsts = [r.start] if prefix_only else range(r.start, r.end)
        for a in firsts:
            if a < start or a >= end:
                continue
            for b in range(a + 1, min(r.end, end) + 1):
                edges.setdefault(a, []).append((b, edge_cost_s(r, b - a, costs), r))

    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, ServerRecord]] = {}
    heap: list[tuple[float, int]] = [(0.0, start)]
    while heap:
        dist, node = heapq.heappop(heap)
        if node == end:
            break
        if dist > best.get(node, float("inf")):
            continue  # a stale heap entry; the node was already reached more cheaply
        for b, cost, r in edges.get(node, ()):
            if dist + cost < best.get(b, float("inf")):
                best[b] = dist + cost
                came_from[b] = (node, r)
                heapq.heappush(heap, (dist + cost, b))

    if end not in came_from:
        # Every block is covered, yet no chain exists: the spans that cover the blocks right after the
        # furthest reachable boundary all begin before it, and inference cannot start mid-span.
        reach = max(best)
        raise MissingBlocks(
            f"no server can start a session at block {reach} of model {model_id or '?'}: the servers holding "
            f"it start earlier (inference must start at a server's first block); blocks {reach}:{end} unreachable"
        )
    route: list[Span] = []
    node = end
    while node != start:
        prev, r = came_from[node]
        route.append(Span(r.peer_id, r.address, prev, node, r))
        node = prev
    route.reverse()
    return route


def route_cost_s(route: Iterable[Span], costs: RouteCosts | None = None) -> float:
    """Estimated seconds per token along a route (the quantity find_route minimises)."""
    costs = costs or RouteCosts()
    return sum(edge_cost_s(s.record, len(s), costs) for s in route)


def _raise_if_uncovered(records: list[ServerRecord], start: int, end: int, model_id: str) -> None:
    holes = missing_ranges(records, start, end)
    if not holes:
        return
    which = ", ".join(describe_blocks(a, b) for a, b in holes)
    noun = "block" if len(holes) == 1 and holes[0][1] - holes[0][0] == 1 else "blocks"
    model = f" of model {model_id}" if model_id else ""
    raise MissingBlocks(
        f"no server holds {noun} {which}{model}; start a server for them "
        f"(e.g. `shard-server --model ... --blocks {holes[0][0]}:{holes[0][1]}`) or wait for one to join"
    )
