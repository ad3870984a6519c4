"""SwarmView's record filtering on hand-built DHT entries: what a client keeps and what it skips."""

from __future__ import annotations

import pytest

from client_sdk.directory import SwarmView, decode_block_records
from swarm.dht_client import SubkeyEntry
from swarm.errors import MissingBlocks, ModelMismatch
from swarm.records import ServerRecord, ServerState

NOW = 1_000_000.0


def entry(peer: str, start: int, end: int, expires: float = NOW + 60, **fields: object) -> tuple[str, SubkeyEntry]:
    record = ServerRecord(
        peer_id=peer, address=f"127.0.0.1:{7000 + start}", model_id="m", start=start, end=end, **fields
    )
    return peer, SubkeyEntry(record.encode(), expires)


def test_keeps_live_records_and_skips_the_rest() -> None:
    block0 = dict(
        [
            entry("good", 0, 2, model_hash="h"),
            entry("old", 0, 2, expires=NOW - 1),
            entry("off", 0, 2, state=ServerState.OFFLINE),
            entry("drain", 0, 2, state=ServerState.DRAINING),
            entry("other", 0, 2, model_hash="zzz"),
            entry("elsewhere", 5, 6),  # announced under a block it does not hold
            ("junk", SubkeyEntry(b"{not json", NOW + 60)),
            ("f" * 40, entry("impostor", 0, 2)[1]),  # poses as a peer id without a signature
        ]
    )
    out = decode_block_records([block0, dict([entry("good", 0, 2, model_hash="h")])], "m", "h", NOW)
    assert list(out.per_block[0]) == ["good"] and list(out.per_block[1]) == ["good"]
    assert [r.peer_id for r in out.servers()] == ["good"]  # one record per peer and range
    assert out.skipped["expired"] == 1 and out.skipped["garbage"] == 1
    assert out.skipped["state offline"] == 1 and out.skipped["state draining"] == 1
    assert out.skipped["model_hash mismatch"] == 1 and out.foreign_hashes == {"zzz"}
    assert out.skipped["wrong block"] == 1 and out.skipped["bad signature"] == 1


class FakeDht:
    def __init__(self, records: list[dict[str, SubkeyEntry]]) -> None:
        self.records = records
        self.calls = 0

    async def batch_get(self, keys: list[str]) -> list[dict[str, SubkeyEntry]]:
        self.calls += 1
        assert keys == [f"m.block.{i}" for i in range(len(self.records))]
        return self.records


async def test_view_routes_bans_and_explains_mismatch() -> None:
    a, b = entry("a", 0, 4), entry("b", 0, 4, throughput_tps=0.5)
    dht = FakeDht([dict([a, b])] * 4)
    clock = [NOW]
    view = SwarmView(dht, "m", 4, model_hash="h", clock=lambda: clock[0])  # type: ignore[arg-type]
    assert view.age_s() == float("inf")
    await view.refresh()
    assert dht.calls == 1 and view.age_s() == 0.0
    assert [s.peer_id for s in view.route()] == ["a"]
    view.ban("a", 10.0)
    assert [s.peer_id for s in view.route()] == ["b"]
    clock[0] += 11  # the ban expires
    assert [s.peer_id for s in view.route()] == ["a"]

    mismatched = FakeDht([dict([entry("x", 0, 4, model_hash="other")])] * 4)
    view = SwarmView(mismatched, "m", 4, "h", clock=lambda: NOW)  # type: ignore[arg-type]
    await view.refresh()
    with pytest.raises(ModelMismatch, match="same model") as err:
        view.route()
    assert not err.value.retryable
    view = SwarmView(FakeDht([{}] * 4), "m", 4, "h", clock=lambda: NOW)  # type: ignore[arg-type]
    await view.refresh()
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 0\.\.3 of model m"):
        view.route()


async def test_bans_back_off_exponentially_and_missing_blocks_wait() -> None:
    import time as _time

    clock = [NOW]
    view = SwarmView(FakeDht([dict([entry("a", 0, 4)])] * 4), "m", 4, clock=lambda: clock[0], ban_s=10.0)  # type: ignore[arg-type]
    assert view.ban("a") == 10.0 and view.ban("a") == 20.0 and view.ban("a") == 40.0
    view.mark_ok("a")
    assert view.ban("a") == 10.0
    view.record_rtt("a", 100.0)
    view.record_rtt("a", 0.0)
    assert view.rtts_ms["a"] == pytest.approx(70.0)  # EMA with alpha 0.3

    empty = SwarmView(FakeDht([{}] * 4), "m", 4)  # type: ignore[arg-type]
    t0 = _time.monotonic()
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 0\.\.3"):
        await empty.wait_route(wait_s=0.3, poll_s=0.1)
    assert 0.2 < _time.monotonic() - t0 < 2.0
