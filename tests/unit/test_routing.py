"""Routing on hand-built records: no sockets, no clocks."""

from __future__ import annotations

import pytest

from client_sdk.routing import RouteCosts, find_route, missing_ranges, route_cost_s, sample_route
from swarm.errors import MissingBlocks
from swarm.records import ServerRecord


def rec(peer: str, start: int, end: int, tps: float = 100.0) -> ServerRecord:
    return ServerRecord(
        peer_id=peer, address=f"127.0.0.1:{1000 + len(peer)}", model_id="m", start=start, end=end, throughput_tps=tps
    )


def spans(route: list) -> list[tuple[str, int, int]]:
    return [(s.peer_id, s.start, s.end) for s in route]


def test_single_server_covers_everything() -> None:
    assert spans(find_route([rec("a", 0, 4)], 0, 4)) == [("a", 0, 4)]


def test_two_servers_chain() -> None:
    assert spans(find_route([rec("b", 2, 4), rec("a", 0, 2)], 0, 4)) == [("a", 0, 2), ("b", 2, 4)]


def test_prefers_faster_chain() -> None:
    slow = [rec("slow0", 0, 2, tps=1.0), rec("slow1", 2, 4, tps=1.0)]
    fast = [rec("fast0", 0, 2, tps=1000.0), rec("fast1", 2, 4, tps=1000.0)]
    assert spans(find_route(slow + fast, 0, 4)) == [("fast0", 0, 2), ("fast1", 2, 4)]
    # Mixed: the fast server for the first half, and the only server for the second half.
    assert spans(find_route([slow[0], fast[0], slow[1]], 0, 4)) == [("fast0", 0, 2), ("slow1", 2, 4)]


def test_fewer_hops_win_when_compute_is_equal() -> None:
    # Same per-block speed; one server holding everything saves one RTT.
    records = [rec("whole", 0, 4, tps=50.0), rec("half0", 0, 2, tps=100.0), rec("half1", 2, 4, tps=100.0)]
    assert spans(find_route(records, 0, 4)) == [("whole", 0, 4)]


def test_measured_rtt_changes_the_choice() -> None:
    records = [rec("near", 0, 4, tps=10.0), rec("far", 0, 4, tps=20.0)]
    # Unmeasured: both get the default RTT, so the faster server wins.
    assert spans(find_route(records, 0, 4)) == [("far", 0, 4)]
    costs = RouteCosts(rtts_ms={"near": 1.0, "far": 200.0})
    assert spans(find_route(records, 0, 4, costs)) == [("near", 0, 4)]


def test_overlapping_spans_use_a_prefix() -> None:
    # a holds 0:3 and b holds 2:5: inference may use a's prefix 0:2 then b's whole span 2:5.
    route = find_route([rec("a", 0, 3), rec("b", 2, 5)], 0, 5)
    assert spans(route) == [("a", 0, 2), ("b", 2, 5)]
    assert route[0].record.end == 3  # the span keeps the server's full record


def test_overlap_picks_cheapest_split() -> None:
    # b is fast, so the chain should hand over to b as early as possible (a's 1-block prefix).
    records = [rec("a", 0, 4, tps=1.0), rec("b", 1, 4, tps=1000.0)]
    assert spans(find_route(records, 0, 4)) == [("a", 0, 1), ("b", 1, 4)]


def test_route_of_a_sub_range() -> None:
    records = [rec("a", 0, 2), rec("b", 2, 4), rec("c", 4, 8)]
    assert spans(find_route(records, 2, 8)) == [("b", 2, 4), ("c", 4, 8)]


def test_hole_gives_clear_error() -> None:
    records = [rec("a", 0, 12), rec("b", 16, 24)]
    assert missing_ranges(records, 0, 24) == [(12, 16)]
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 12\.\.15"):
        find_route(records, 0, 24)


def test_several_holes_and_single_block_hole() -> None:
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 0\.\.1, 3;"):
        find_route([rec("a", 2, 3), rec("b", 4, 6)], 0, 6)
    with pytest.raises(MissingBlocks, match=r"no server holds block 5 of model m"):
        find_route([rec("a", 0, 5)], 0, 6, model_id="m")


def test_banned_peer_is_avoided_or_reported() -> None:
    records = [rec("a", 0, 4, tps=1000.0), rec("b", 0, 4, tps=1.0)]
    assert spans(find_route(records, 0, 4, banned={"a"})) == [("b", 0, 4)]
    with pytest.raises(MissingBlocks, match=r"0\.\.3"):
        find_route(records, 0, 4, banned={"a", "b"})


def test_inference_cannot_start_mid_span_but_forward_can() -> None:
    records = [rec("a", 0, 4)]
    with pytest.raises(MissingBlocks, match="start a session at block 2"):
        find_route(records, 2, 4)
    assert spans(find_route(records, 2, 4, prefix_only=False)) == [("a", 2, 4)]


def test_zero_throughput_and_duplicates_are_harmless() -> None:
    records = [rec("a", 0, 4, tps=0.0), rec("a", 0, 4, tps=0.0), rec("b", 0, 4, tps=5.0)]
    assert spans(find_route(records, 0, 4)) == [("b", 0, 4)]


def test_route_cost_matches_model() -> None:
    costs = RouteCosts(default_rtt_ms=10.0)
    route = find_route([rec("a", 0, 2, tps=100.0), rec("b", 2, 4, tps=50.0)], 0, 4, costs)
    # two hops of 10 ms + one full span at 100 tok/s + one full span at 50 tok/s
    assert route_cost_s(route, costs) == pytest.approx(0.02 + 0.01 + 0.02)


def test_large_swarm_is_fast_and_optimal() -> None:
    # 80 blocks, many overlapping servers: the optimum is the chain of the three fastest big spans.
    records = [rec(f"s{i}", i, min(i + 10, 80), tps=10.0) for i in range(0, 80, 3)]
    records += [rec("x0", 0, 30, tps=1000.0), rec("x1", 30, 60, tps=1000.0), rec("x2", 60, 80, tps=1000.0)]
    assert spans(find_route(records, 0, 80)) == [("x0", 0, 30), ("x1", 30, 60), ("x2", 60, 80)]


# ---- client/server latencies, push pricing, load, max_throughput ---------------------------------------


def with_next(r: ServerRecord, **next_rtts_ms: float) -> ServerRecord:
    return r.model_copy(update={"next_rtts_ms": next_rtts_ms})


def test_push_prices_server_to_server_latency() -> None:
    # a->c is a fast link (2 ms) and b->d a slow one; the client is equally far from everybody.
    records = [with_next(rec("a", 0, 2), c=2.0, d=300.0), with_next(rec("b", 0, 2), c=300.0, d=300.0)]
    records += [rec("c", 2, 4), rec("d", 2, 4)]
    costs = RouteCosts(rtts_ms={p: 40.0 for p in "abcd"}, push=True)
    route = find_route(records, 0, 4, costs)
    assert spans(route) == [("a", 0, 2), ("c", 2, 4)]
    # client->a (20) + a->c (1) + c->client (20) + compute 2 x 10 ms
    assert route_cost_s(route, costs) == pytest.approx(0.020 + 0.001 + 0.020 + 0.02)


def test_push_unknown_hop_costs_the_detour_through_the_client() -> None:
    costs = RouteCosts(rtts_ms={"a": 10.0, "c": 30.0}, push=True)
    route = find_route([rec("a", 0, 2), rec("c", 2, 4)], 0, 4, costs)
    assert route_cost_s(route, costs) == pytest.approx(0.005 + 0.020 + 0.015 + 0.02)


def test_three_spans_with_latencies_take_the_fastest_chain() -> None:
    records = [rec("a", 0, 2), rec("b", 0, 2), rec("c", 2, 4), rec("d", 2, 4), rec("w", 0, 4)]
    rtts = {"a": 6.0, "b": 60.0, "c": 6.0, "d": 60.0, "w": 80.0}
    for push in (False, True):
        assert spans(find_route(records, 0, 4, RouteCosts(rtts_ms=rtts, push=push))) == [("a", 0, 2), ("c", 2, 4)]


def test_load_and_full_cache_steer_away() -> None:
    busy = rec("busy", 0, 4).model_copy(update={"queued_requests": 9})
    assert spans(find_route([busy, rec("idle", 0, 4, tps=50.0)], 0, 4)) == [("idle", 0, 4)]
    full = rec("full", 0, 4, tps=1000.0).model_copy(update={"cache_tokens_left": 10})
    roomy = rec("roomy", 0, 4, tps=10.0).model_copy(update={"cache_tokens_left": 10_000})
    assert spans(find_route([full, roomy], 0, 4, RouteCosts(cache_tokens_needed=100))) == [("roomy", 0, 4)]
    # still usable when it is the only one
    assert spans(find_route([full], 0, 4, RouteCosts(cache_tokens_needed=100))) == [("full", 0, 4)]


def test_max_throughput_spreads_by_throughput_and_may_start_mid_span() -> None:
    import random

    records = [rec("fast", 0, 4, tps=300.0), rec("slow", 0, 4, tps=100.0)]
    rng = random.Random(0)
    picks = [sample_route(records, 0, 4, rng)[0].peer_id for _ in range(2000)]
    assert 0.70 < picks.count("fast") / len(picks) < 0.80
    assert spans(sample_route([rec("a", 0, 3), rec("b", 3, 6)], 1, 5, rng)) == [("a", 1, 3), ("b", 3, 5)]
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 12\.\.15"):
        sample_route([rec("a", 0, 12), rec("b", 16, 24)], 0, 24, rng)
