"""SwarmView's record filtering on hand-built DHT entries: what a client keeps and what it skips."""

from __future__ import annotations

import pytest

from client_sdk.directory import SwarmView, decode_block_records
from swarm.blocks import block_key
from swarm.dht_client import SubkeyEntry
from swarm.errors import MissingBlocks, ModelMismatch
from swarm.identity import Identity
from swarm.records import ServerRecord, ServerState

NOW = 1_000_000.0
IDS: dict[str, Identity] = {}  # one key pair per server name used below


def pid(name: str) -> str:
    """The peer id of the server called `name` in these tests."""
    return IDS.setdefault(name, Identity.generate()).peer_id


def entry(
    name: str, start: int, end: int, expires: float = NOW + 60, *, block: int | None = None, **fields: object
) -> tuple[str, SubkeyEntry]:
    """A server's signed record under the key of `block` (default: its first block)."""
    identity = IDS.setdefault(name, Identity.generate())
    record = ServerRecord(
        peer_id=identity.peer_id, address=f"127.0.0.1:{7000 + start}", model_id="m", start=start, end=end, **fields
    )
    key, value = block_key("m", start if block is None else block), record.encode()
    sig = identity.sign(key, identity.peer_id, value, expires)
    return identity.peer_id, SubkeyEntry(value, expires, identity.public_key, sig)


def test_keeps_live_records_and_skips_the_rest() -> None:
    unsigned = ServerRecord(peer_id=pid("plain"), address="127.0.0.1:1", model_id="m", start=0, end=2).encode()
    block0 = dict(
        [
            entry("good", 0, 2, model_hash="h"),
            entry("old", 0, 2, expires=NOW - 1),
            entry("off", 0, 2, state=ServerState.OFFLINE),
            entry("drain", 0, 2, state=ServerState.DRAINING),
            entry("other", 0, 2, model_hash="zzz"),
            entry("elsewhere", 5, 6, block=0),  # announced under a block it does not hold
            (pid("junk"), SubkeyEntry(b"{not json", NOW + 60)),
            ("f" * 40, SubkeyEntry(unsigned, NOW + 60)),  # poses as a peer id without a signature
            ("plain", SubkeyEntry(unsigned, NOW + 60)),  # unsigned under an honest name: a dht-node could write it
            (pid("plain"), SubkeyEntry(unsigned, NOW + 60)),  # unsigned under the very peer id it names
        ]
    )
    out = decode_block_records([block0, dict([entry("good", 0, 2, model_hash="h", block=1)])], "m", "h", NOW)
    assert list(out.per_block[0]) == [pid("good")] and list(out.per_block[1]) == [pid("good")]
    assert [r.peer_id for r in out.servers()] == [pid("good")]  # one record per peer and range
    assert out.skipped["expired"] == 1 and out.skipped["unsigned"] == 4
    assert out.skipped["state offline"] == 1 and out.skipped["state draining"] == 1
    assert out.skipped["model_hash mismatch"] == 1 and out.foreign_hashes == {"zzz"}
    assert out.skipped["wrong block"] == 1


def test_a_dht_node_cannot_impersonate_a_server() -> None:
    """Whoever answers the lookup may return anything: only what the server itself signed is used."""
    victim, liar = IDS.setdefault("victim", Identity.generate()), Identity.generate()
    _, honest = entry("victim", 0, 2)
    evil = ServerRecord(peer_id=victim.peer_id, address="6.6.6.6:1", model_id="m", start=0, end=2).encode()
    key = block_key("m", 0)
    forged = {
        # the liar's own valid signature on a record that names the victim
        liar.peer_id: SubkeyEntry(evil, NOW + 90, liar.public_key, liar.sign(key, liar.peer_id, evil, NOW + 90)),
        # the victim's sub-key with the liar's signature, and with the victim's signature of another value
        victim.peer_id: SubkeyEntry(evil, NOW + 90, liar.public_key, liar.sign(key, victim.peer_id, evil, NOW + 90)),
    }
    replayed = SubkeyEntry(evil, NOW + 90, victim.public_key, honest.signature)
    unsigned = [{victim.peer_id: SubkeyEntry(evil, NOW + 90)}, {"mallory": SubkeyEntry(evil, NOW + 90)}]
    for entries in (forged, {victim.peer_id: replayed}, *unsigned):
        out = decode_block_records([entries], "m", "", NOW)
        assert out.per_block[0] == {}, entries
    assert decode_block_records([{victim.peer_id: honest}], "m", "", NOW).per_block[0][victim.peer_id].address == (
        "127.0.0.1:7000"
    )


class FakeDht:
    def __init__(self, records: list[dict[str, SubkeyEntry]]) -> None:
        self.records = records
        self.calls = 0

    async def batch_get(self, keys: list[str]) -> list[dict[str, SubkeyEntry]]:
        self.calls += 1
        assert keys == [f"m.block.{i}" for i in range(len(self.records))]
        return self.records


def blocks(name: str, start: int, end: int, **fields: object) -> list[dict[str, SubkeyEntry]]:
    """The DHT records of blocks start..end-1 of model m, each holding `name`'s record signed for its key."""
    return [dict([entry(name, start, end, block=b, **fields)]) for b in range(start, end)]


async def test_view_routes_bans_and_explains_mismatch() -> None:
    a, b = blocks("a", 0, 4), blocks("b", 0, 4, throughput_tps=0.5)
    dht = FakeDht([{**x, **y} for x, y in zip(a, b, strict=True)])
    clock = [NOW]
    view = SwarmView(dht, "m", 4, model_hash="h", clock=lambda: clock[0])  # type: ignore[arg-type]
    assert view.age_s() == float("inf")
    await view.refresh()
    assert dht.calls == 1 and view.age_s() == 0.0
    assert [s.peer_id for s in view.route()] == [pid("a")]
    view.ban(pid("a"), 10.0)
    assert [s.peer_id for s in view.route()] == [pid("b")]
    clock[0] += 11  # the ban expires
    assert [s.peer_id for s in view.route()] == [pid("a")]

    mismatched = FakeDht(blocks("x", 0, 4, model_hash="other"))
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
    view = SwarmView(FakeDht(blocks("a", 0, 4)), "m", 4, clock=lambda: clock[0], ban_s=10.0)  # type: ignore[arg-type]
    a = pid("a")
    assert view.ban(a) == 10.0 and view.ban(a) == 20.0 and view.ban(a) == 40.0
    view.mark_ok(a)
    assert view.ban(a) == 10.0
    view.record_rtt(a, 100.0)
    view.record_rtt(a, 0.0)
    assert view.rtts_ms[a] == pytest.approx(70.0)  # EMA with alpha 0.3

    empty = SwarmView(FakeDht([{}] * 4), "m", 4)  # type: ignore[arg-type]
    t0 = _time.monotonic()
    with pytest.raises(MissingBlocks, match=r"no server holds blocks 0\.\.3"):
        await empty.wait_route(wait_s=0.3, poll_s=0.1)
    assert 0.2 < _time.monotonic() - t0 < 2.0
