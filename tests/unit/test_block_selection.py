"""Block choice and rebalancing on hand-built swarms (shard_server/block_selection.py: pure functions)."""

from __future__ import annotations

import pytest

from shard_server.block_selection import choose_blocks, live_spans, should_move, swarm_load
from swarm.blocks import BlockRange
from swarm.records import ServerRecord, ServerState


def rec(peer: str, start: int, end: int, tps: float = 100.0, state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(
        peer_id=peer, address=f"127.0.0.1:{abs(hash(peer)) % 60000 + 1}", model_id="m", start=start, end=end,
        throughput_tps=tps, state=state,
    )  # fmt: skip


def test_empty_swarm_takes_the_first_blocks() -> None:
    assert choose_blocks([], 4, 10) == BlockRange(0, 4)
    assert choose_blocks([], 20, 10) == BlockRange(0, 10)  # never more than the model has


def test_unserved_blocks_come_first() -> None:
    swarm = [rec("a", 0, 4), rec("b", 2, 6)]  # overlapping; 6 and 7 unserved
    assert choose_blocks(swarm, 2, 8) == BlockRange(6, 8)
    assert choose_blocks(swarm, 4, 8) == BlockRange(4, 8)  # covers both holes, the rest where it is weakest
    assert choose_blocks([rec("a", 0, 3), rec("b", 5, 8)], 2, 8) == BlockRange(3, 5)


def test_weakest_blocks_when_all_are_served() -> None:
    swarm = [rec("slow", 0, 4, tps=10), rec("fast", 4, 8, tps=500), rec("mid", 0, 8, tps=50)]
    assert choose_blocks(swarm, 4, 8) == BlockRange(0, 4)
    assert choose_blocks(swarm, 2, 8) == BlockRange(0, 2)  # ties: the lowest start


def test_offline_and_draining_servers_do_not_count_and_newest_record_wins() -> None:
    offline, draining = rec("a", 0, 2, state=ServerState.OFFLINE), rec("b", 4, 6, state=ServerState.DRAINING)
    joining = rec("j", 6, 7, state=ServerState.JOINING)  # about to serve: counts, so nobody else rushes there
    assert live_spans([offline, draining, joining], 8) == [joining]
    assert swarm_load(live_spans([offline, draining], 8), 8).unserved == 8
    # Expectations derived by hand. Counting the offline server would make 0:2 served and 2:4 the choice.
    assert choose_blocks([offline, rec("c", 2, 8, tps=50)], 2, 8) == BlockRange(0, 2)
    # Counting the draining one would make 4:6 served and 0:2 (50 tokens/s, lowest start) the choice.
    assert choose_blocks([draining, rec("c", 0, 4, tps=50), rec("d", 6, 8)], 2, 8) == BlockRange(4, 6)
    old = rec("c", 0, 2).model_copy(update={"updated_at": 1.0})
    assert choose_blocks([old, rec("c", 6, 8)], 2, 8) == BlockRange(0, 2)  # c's newer record says 6:8


def test_should_move_to_cover_a_hole_from_a_redundant_place() -> None:
    # x is redundant on 0:3 (y covers 0:5); blocks 5..7 lost their server
    swarm = [rec("x", 0, 3), rec("y", 0, 5)]
    assert should_move(swarm, "x", BlockRange(0, 3), 8, 100.0, 0.75) == BlockRange(5, 8)


def test_should_not_move_when_leaving_empties_a_block() -> None:
    swarm = [rec("x", 6, 8), rec("y", 2, 6)]  # x is the only server of 6:8; 0:2 is unserved
    assert should_move(swarm, "x", BlockRange(6, 8), 8, 100.0, 0.75) is None


def test_should_move_only_for_a_clear_gain() -> None:
    # Everything served; y is slow on 0:4, x is redundant on 4:8 next to a fast server.
    swarm = [rec("x", 4, 8, tps=100), rec("y", 0, 4, tps=10), rec("z", 4, 8, tps=1000)]
    assert should_move(swarm, "x", BlockRange(4, 8), 8, 100.0, 0.75) == BlockRange(0, 4)  # 10 -> 110
    # a small gain (100 -> 110) is below the quality bar and not worth dropping sessions for
    swarm = [rec("x", 4, 8, tps=10), rec("y", 0, 4, tps=100), rec("z", 4, 8, tps=1000)]
    assert should_move(swarm, "x", BlockRange(4, 8), 8, 10.0, 0.75) is None
    assert should_move(swarm, "x", BlockRange(4, 8), 8, 10.0, 0.95) == BlockRange(0, 4)  # a stricter owner
    assert should_move(swarm, "x", BlockRange(4, 8), 8, 10.0, 0.0) is None  # 0 disables rebalancing


def test_already_best_place_stays() -> None:
    swarm = [rec("x", 0, 4), rec("y", 4, 8), rec("z", 0, 4)]
    assert should_move(swarm, "x", BlockRange(0, 4), 8, 100.0, 0.75) is None
    assert should_move(swarm, "z", BlockRange(0, 4), 8, 100.0, 0.75) is None  # no gain moving onto y's blocks


@pytest.mark.parametrize("quality", [0.5, 0.75, 1.5])
def test_no_oscillation_between_two_movers(quality: float) -> None:
    """Two movable servers on a 2-block model: after one moves, the other stays (and vice versa)."""
    swarm = [rec("a", 0, 1), rec("b", 0, 1)]
    target = should_move(swarm, "a", BlockRange(0, 1), 2, 100.0, quality)
    assert target == BlockRange(1, 2)
    moved = [rec("a", 1, 2), rec("b", 0, 1)]
    assert should_move(moved, "a", BlockRange(1, 2), 2, 100.0, quality) is None
    assert should_move(moved, "b", BlockRange(0, 1), 2, 100.0, quality) is None
