"""NextHops against a DHT that answers with chosen records: which addresses a server may push to (signed, ONLINE or
DRAINING, unexpired, same model hash, span starting at the session's end) and how often it looks them up (a
known address never waits for a lookup; an unknown one costs at most one lookup per MIN_REFETCH_S)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

import shard_server.next_hops as next_hops_module
from shard_server.next_hops import NextHops
from swarm.blocks import block_key
from swarm.identity import Identity
from swarm.records import Record, ServerRecord, ServerState, SubkeyEntry
from tests.servers import wait_until

HASH = "0123456789abcdef"
KEY = block_key("tiny", 2)


class FakeDht:
    """batch_get returns `records` (what a dht-node would), counting lookups."""

    def __init__(self) -> None:
        self.record: Record = {}
        self.lookups = 0

    def announce(self, address: str, *, start: int = 2, state: ServerState = ServerState.ONLINE,
                 model_hash: str = HASH, ttl_s: float = 60.0, signer: Identity | None = None) -> None:  # fmt: skip
        server = Identity.generate()
        value = ServerRecord(peer_id=server.peer_id, address=address, model_id="tiny", model_hash=model_hash,
                             start=start, end=4, state=state).encode()  # fmt: skip
        expiration = time.time() + ttl_s
        signer = signer or server
        signature = signer.sign(KEY, server.peer_id, value, expiration)
        self.record[server.peer_id] = SubkeyEntry(value, expiration, signer.public_key, signature)

    async def batch_get(self, keys: Sequence[str]) -> list[Record]:
        self.lookups += 1
        return [dict(self.record) if key == KEY else {} for key in keys]


async def test_only_signed_live_records_of_the_same_model_starting_at_the_end_vouch_for_an_address() -> None:
    dht = FakeDht()
    dht.announce("10.0.0.1:1")
    dht.announce("10.0.0.2:1", state=ServerState.DRAINING)  # still finishing its sessions
    dht.announce("10.0.0.3:1", state=ServerState.OFFLINE)
    dht.announce("10.0.0.4:1", start=1)  # holds block 2, but a chain ending at 2 cannot continue inside it
    dht.announce("10.0.0.5:1", model_hash="another config")
    dht.announce("10.0.0.6:1", ttl_s=-1)  # expired
    dht.announce("10.0.0.7:1", signer=Identity.generate())  # signed by someone else than the peer it names
    hops = NextHops(dht, "tiny", HASH)  # type: ignore[arg-type]
    allowed = {n: await hops.problem(2, f"10.0.0.{n}:1") is None for n in range(1, 8)}
    assert allowed == {1: True, 2: True, 3: False, 4: False, 5: False, 6: False, 7: False}
    assert "no signed record announces 10.0.0.3:1" in (await hops.problem(2, "10.0.0.3:1") or "")
    assert await hops.problem(3, "10.0.0.1:1") is not None  # a session ending at block 3
    standalone = await NextHops(None, "tiny", HASH).problem(2, "10.0.0.1:1")
    assert standalone is not None and "standalone" in standalone


async def test_lookups_are_cached_refreshed_in_the_background_and_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    dht = FakeDht()
    dht.announce("10.0.0.1:1")
    hops = NextHops(dht, "tiny", HASH)  # type: ignore[arg-type]
    hops.prefetch(2)  # at session open
    await wait_until(lambda: dht.lookups == 1, "the prefetch")
    for _ in range(100):  # the hot path: a dict lookup
        assert await hops.problem(2, "10.0.0.1:1") is None
    assert dht.lookups == 1
    # A bogus address looks again at most once per MIN_REFETCH_S (here: never again)...
    monkeypatch.setattr(next_hops_module, "MIN_REFETCH_S", 0.0)
    assert await hops.problem(2, "10.9.9.9:1") is not None
    assert dht.lookups == 2
    monkeypatch.setattr(next_hops_module, "MIN_REFETCH_S", 1e9)
    for _ in range(10):
        assert await hops.problem(2, "10.9.9.9:1") is not None
    assert dht.lookups == 2
    # ...a server that just joined is found by the lookup its first push triggers...
    monkeypatch.setattr(next_hops_module, "MIN_REFETCH_S", 0.0)
    dht.announce("10.0.0.8:1")
    assert await hops.problem(2, "10.0.0.8:1") is None
    # ...and a stale cache answers at once while it is refreshed, after which a server that left is refused.
    monkeypatch.setattr(next_hops_module, "REFRESH_S", 0.0)
    monkeypatch.setattr(next_hops_module, "MIN_REFETCH_S", 1e9)
    dht.record.clear()
    lookups = dht.lookups
    assert await hops.problem(2, "10.0.0.1:1") is None
    await wait_until(lambda: dht.lookups == lookups + 1 and not hops._lookups, "the background refresh")
    assert await hops.problem(2, "10.0.0.1:1") is not None
    await hops.close()
