"""Pure routing: choose a chain of servers that covers blocks [start, end) at the lowest estimated cost.

The graph's nodes are (block boundary, server the hidden state is on); a server holding [s, e) gives edges
s -> b for every b in (s, e] (inference sessions must begin at a server's own first block; Forward accepts
any sub-range, see `prefix_only`). Costs, all in seconds per token:
  * network: without server-to-server push every span is a client -> server -> client round trip (its
    RTT). With push the hidden state goes client -> A -> B -> ... -> client: half the client's RTT to the
    first and to the last server, and half the RTT that A announces to B (`next_rtts_ms`) for every hop
    between servers (unknown: estimated as going through the client);
  * compute: the share of the server's announced per-span step time, times (1 + requests queued there);
  * a large penalty for a server whose KV budget cannot hold the session.
Dijkstra (heapq) finds the cheapest chain (`min_latency`, for inference). `sample_route` is the
`max_throughput` mode for Forward/Backward of batches: at each block it picks one of the servers holding
it with probability proportional to its throughput, spreading load. No sockets, no clocks.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swarm.errors import MissingBlocks

if TYPE_CHECKING:  # only annotations here; the records module (pydantic) loads when the client connects
    from swarm.records import ServerRecord

# A record may announce 0 tokens/s (not measured yet); treat it as very slow rather than divide by zero.
MIN_THROUGHPUT_TPS = 1e-3
# Added to a server that cannot hold the session's KV cache: usable only if nothing else is.
CACHE_FULL_PENALTY_S = 10.0


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
    """Inputs of the cost model. `rtts_ms` holds the client's smoothed RTTs by peer_id; servers not
    measured yet get `default_rtt_ms`, which also makes every extra hop cost something, so ties between
    chains go to the one with fewer servers. `push` prices chains as server-to-server pushes."""

    rtts_ms: Mapping[str, float] = field(default_factory=dict)
    default_rtt_ms: float = 5.0
    push: bool = False
    cache_tokens_needed: int = 0  # max_length x batch of the session being routed; 0 = don't check

    def rtt_s(self, record: ServerRecord) -> float:
        return self.rtts_ms.get(record.peer_id, self.default_rtt_ms) / 1000.0

    def enter_s(self, prev: ServerRecord | None, record: ServerRecord) -> float:
        """Network seconds to get the hidden state onto `record` (from the client, or pushed from `prev`)."""
        if not self.push:
            return self.rtt_s(record)  # client -> server -> client
        if prev is None:
            return self.rtt_s(record) / 2
        hop_ms = prev.next_rtts_ms.get(record.peer_id)
        if hop_ms is None:  # not measured by prev: assume the detour through the client
            return (self.rtt_s(prev) + self.rtt_s(record)) / 2
        return hop_ms / 2000.0

    def exit_s(self, last: ServerRecord) -> float:
        """Network seconds to bring the last server's output back to the client."""
        return self.rtt_s(last) / 2 if self.push else 0.0


def compute_s(record: ServerRecord, blocks: int) -> float:
    """Estimated seconds for one token through `blocks` of this server's blocks, given its current load.

    `throughput_tps` is announced for one step through the server's whole span, so a prefix of it costs
    its share of the span's time; each request queued in front of ours costs about one more step.
    """
    per_span_s = 1.0 / max(record.throughput_tps, MIN_THROUGHPUT_TPS)
    return per_span_s * blocks / (record.end - record.start) * (1 + record.queued_requests)


def edge_cost_s(record: ServerRecord, blocks: int, costs: RouteCosts, prev: ServerRecord | None = None) -> float:
    cost = costs.enter_s(prev, record) + compute_s(record, blocks)
    if costs.cache_tokens_needed and record.cache_tokens_left < costs.cache_tokens_needed:
        cost += CACHE_FULL_PENALTY_S
    return cost


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


def usable_records(records: Iterable[ServerRecord], banned: Collection[str]) -> list[ServerRecord]:
    """Unique (peer, range) records not banned, sorted so equal-cost choices are deterministic."""
    usable = {(r.peer_id, r.start, r.end): r for r in records if r.peer_id not in banned}
    return sorted(usable.values(), key=lambda r: (r.start, r.end, r.peer_id))


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
    skipped. Several records of one peer (e.g. one per block key) are fine: duplicates collapse.
    """
    if not 0 <= start < end:
        raise ValueError(f"invalid block range {start}:{end}")
    costs = costs or RouteCosts()
    candidates = usable_records(records, banned)
    raise_if_uncovered(candidates, start, end, model_id)

    # out_edges[a] = [(b, record)]: running blocks [a, b) on `record`.
    out_edges: dict[int, list[tuple[int, ServerRecord]]] = {}
    for r in candidates:
        firsts = [r.start] if prefix_only else range(r.start, r.end)
        for a in firsts:
            if start <= a < end:
                out_edges.setdefault(a, []).extend((b, r) for b in range(a + 1, min(r.end, end) + 1))

    # A state is (boundary, index of the server holding the hidden state; -1 = the client). The server
    # matters only for push costs, yet keeping it always is cheap: states <= boundaries x servers.
    index = {id(r): i for i, r in enumerate(candidates)}
    State = tuple[int, int]
    best: dict[State, float] = {(start, -1): 0.0}
    came_from: dict[State, State] = {}
    heap: list[tuple[float, int, int]] = [(0.0, start, -1)]
    done_cost, done_state = float("inf"), None
    while heap:
        dist, node, holder = heapq.heappop(heap)
        if dist > best.get((node, holder), float("inf")) or dist >= done_cost:
            continue  # stale entry, or already worse than a complete route
        prev = candidates[holder] if holder >= 0 else None
        if node == end:
            total = dist + (costs.exit_s(prev) if prev is not None else 0.0)
            if total < done_cost:
                done_cost, done_state = total, (node, holder)
            continue
        for b, r in out_edges.get(node, ()):
            if r is prev:
                continue  # consecutive spans on one server would be one longer span
            state = (b, index[id(r)])
            cand = dist + edge_cost_s(r, b - node, costs, prev)
            if cand < best.get(state, float("inf")):
                best[state] = cand
                came_from[state] = (node, holder)
                heapq.heappush(heap, (cand, b, state[1]))

    if done_state is None:
        # Every block is covered, yet no chain exists: the spans that cover the blocks right after the
        # furthest reachable boundary all begin before it, and inference cannot start mid-span.
        reach = max(node for node, _ in best)
        raise MissingBlocks(
            f"no server can start a session at block {reach} of model {model_id or '?'}: the servers holding "
            f"it start earlier (inference must start at a server's first block); blocks {reach}:{end} unreachable"
        )
    route: list[Span] = []
    state = done_state
    while state[0] != start:
        prev_state = came_from[state]
        r = candidates[state[1]]
        route.append(Span(r.peer_id, r.address, prev_state[0], state[0], r))
        state = prev_state
    route.reverse()
    return route


def route_cost_s(route: Iterable[Span], costs: RouteCosts | None = None) -> float:
    """Estimated seconds per token along a route (the quantity find_route minimises)."""
    costs = costs or RouteCosts()
    total, prev = 0.0, None
    for s in route:
        total += edge_cost_s(s.record, len(s), costs, prev)
        prev = s.record
    return total + (costs.exit_s(prev) if prev is not None else 0.0)


def sample_route(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    rng: random.Random | None = None,
    banned: Collection[str] = (),
    model_id: str = "",
) -> list[Span]:
    """`max_throughput` mode (Forward/Backward): at each uncovered block pick one server holding it, with
    probability proportional to its throughput over its current load, and run as far as it reaches."""
    if not 0 <= start < end:
        raise ValueError(f"invalid block range {start}:{end}")
    rng = rng or random.Random()
    candidates = usable_records(records, banned)
    raise_if_uncovered(candidates, start, end, model_id)
    route: list[Span] = []
    block = start
    while block < end:
        holders = [r for r in candidates if r.start <= block < r.end]
        weights = [max(r.throughput_tps, MIN_THROUGHPUT_TPS) / (1 + r.queued_requests) for r in holders]
        r = rng.choices(holders, weights)[0]
        stop = min(r.end, end)
        route.append(Span(r.peer_id, r.address, block, stop, r))
        block = stop
    return route


def raise_if_uncovered(records: list[ServerRecord], start: int, end: int, model_id: str) -> None:
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
