"""Client precision options: `min_precision` filters servers by the dtype/quant they announce, `wire_dtype` is
validated (the conversion itself is exercised end to end in tests/e2e/test_quant_server.py)."""

from __future__ import annotations

import pytest

from client_sdk.config import ClientConfig
from client_sdk.directory import SwarmView, decode_block_records, record_precision
from swarm.dht_client import SubkeyEntry
from swarm.errors import MissingBlocks
from swarm.identity import Identity
from swarm.records import ServerRecord

NOW = 1_000_000.0
SERVERS = {  # peer -> (dtype, quant)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "fp16": ("float16", "none"),
    "int8": ("bfloat16", "int8"),
    "nf4": ("bfloat16", "nf4"),
}


IDS = {name: Identity.generate() for name in SERVERS}  # clients only accept records signed by their server
NAMES = {identity.peer_id: name for name, identity in IDS.items()}


def entries() -> dict[str, SubkeyEntry]:
    """The DHT record of block 0: each server's signed record, by peer id."""
    out = {}
    for name, (dtype, quant) in SERVERS.items():
        me = IDS[name]
        value = ServerRecord(peer_id=me.peer_id, address="127.0.0.1:1", model_id="m", start=0, end=1, dtype=dtype,
                             quant=quant).encode()  # fmt: skip
        out[me.peer_id] = SubkeyEntry(value, NOW + 60, me.public_key, me.sign("m.block.0", me.peer_id, value, NOW + 60))
    return out


@pytest.mark.parametrize(
    ("min_precision", "kept"),
    [
        (None, {"fp32", "bf16", "fp16", "int8", "nf4"}),
        ("nf4", {"fp32", "bf16", "fp16", "int8", "nf4"}),
        ("int8", {"fp32", "bf16", "fp16", "int8"}),  # int8 excludes nf4 servers
        ("bfloat16", {"fp32", "bf16", "fp16"}),  # a 16-bit float excludes every quantized server
        ("float16", {"fp32", "bf16", "fp16"}),
        ("float32", {"fp32"}),
    ],
)
def test_min_precision_keeps_servers_at_or_above_it(min_precision: str | None, kept: set[str]) -> None:
    out = decode_block_records([entries()], "m", "", NOW, min_precision=min_precision)
    assert {NAMES[peer] for peer in out.per_block[0]} == kept
    assert sum(n for reason, n in out.skipped.items() if reason.startswith("precision")) == len(SERVERS) - len(kept)


def test_record_precision_names_quant_first() -> None:
    record = ServerRecord.decode(entries()[IDS["int8"].peer_id].value)
    assert record is not None and record_precision(record) == "int8"


class FakeDht:
    async def batch_get(self, keys: list[str]) -> list[dict[str, SubkeyEntry]]:
        nf4 = IDS["nf4"].peer_id
        return [{nf4: entries()[nf4]} for _ in keys]


async def test_route_explains_servers_ignored_for_precision() -> None:
    view = SwarmView(FakeDht(), "m", 1, clock=lambda: NOW, min_precision="int8")  # type: ignore[arg-type]
    await view.refresh()
    with pytest.raises(MissingBlocks, match="precision below min_precision=int8"):
        view.route()


def test_options_are_validated() -> None:
    assert ClientConfig(wire_dtype="bfloat16", min_precision="int8").wire_dtype == "bfloat16"
    with pytest.raises(ValueError, match="wire_dtype"):
        ClientConfig(wire_dtype="int8")
    with pytest.raises(ValueError, match="min_precision"):
        ClientConfig(min_precision="fp8")
    with pytest.raises(ValueError, match="unknown precision"):
        SwarmView(FakeDht(), "m", 1, min_precision="fp8")  # type: ignore[arg-type]
