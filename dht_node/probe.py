"""`dht-node --probe HOST:PORT`: join the swarm as a DHT client and print what it announces, as a table.

The probe is a client-mode DhtNode (it enters no routing table and holds nothing), so probing a public
swarm leaves no trace in it. Models are listed from the `pollen.models` index; each model's block keys are
then read in one concurrent batch. Only sub-keys validly signed by their owners are shown.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from dht_node.config import DhtNodeConfig
from dht_node.node import DhtNode
from swarm.blocks import block_key
from swarm.records import MODELS_KEY, ModelRecord, ServerRecord, ServerState, decode_server_records, verified

PROBE_TIMEOUT_S = 20.0


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


async def probe(node: DhtNode, out: TextIO = sys.stdout) -> int:
    """Print the models table and one row per announcing server; returns how many models were found."""
    models: dict[str, ModelRecord] = {}
    signed = verified(MODELS_KEY, await node.get(MODELS_KEY, timeout_s=PROBE_TIMEOUT_S))
    for _, entry in sorted(signed.items()):
        info = ModelRecord.decode(entry.value)
        if info is not None and (info.model_id not in models or info.num_blocks > models[info.model_id].num_blocks):
            models[info.model_id] = info
    if not models:
        out.write("no models announced\n")
        return 0
    summary = [["MODEL", "NAME", "BLOCKS", "SERVED", "MISSING", "MIN REPLICAS", "SERVERS"]]
    servers = [["MODEL", "PEER", "ADDRESS", "BLOCKS", "STATE", "TOKENS/S"]]
    for model_id, info in sorted(models.items()):
        keys = [block_key(model_id, i) for i in range(info.num_blocks)]
        records = await asyncio.gather(*(node.get(k, timeout_s=PROBE_TIMEOUT_S) for k in keys))
        per_block = [0] * info.num_blocks
        seen: dict[str, ServerRecord] = {}
        for i, (key, record) in enumerate(zip(keys, records, strict=True)):
            for peer, server in sorted(decode_server_records(key, record).items()):
                if server.state == ServerState.OFFLINE:
                    continue
                per_block[i] += 1
                seen[peer] = server
        missing = [str(i) for i, n in enumerate(per_block) if n == 0]
        summary.append([model_id, info.name or "-", str(info.num_blocks), str(info.num_blocks - len(missing)),
                        ",".join(missing[:8]) + ("…" if len(missing) > 8 else "") or "-",
                        str(min(per_block)), str(len(seen))])  # fmt: skip
        for peer, server in sorted(seen.items(), key=lambda kv: kv[1].start):
            servers.append([model_id, peer[:12], server.address, f"{server.start}:{server.end}", server.state.value,
                            f"{server.throughput_tps:.1f}"])  # fmt: skip
    _table(summary, out)
    out.write("\n")
    _table(servers, out)
    return len(models)


async def run_probe(config: DhtNodeConfig) -> int:
    """Exit code: 0 if the swarm announces at least one model, 1 if none, 2 if the swarm was unreachable."""
    node = DhtNode(config)
    try:
        await node.start()
        if node.peer_count() == 0:
            sys.stderr.write(f"dht-node --probe: no dht-node answered at {', '.join(config.initial_peers)}\n")
            return 2
        return 0 if await probe(node) else 1
    finally:
        await node.stop(grace_s=0)
