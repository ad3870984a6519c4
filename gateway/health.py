"""The swarm's health as health.petals.dev reports it: which models are fully served, and by whom.

`read_state` reads the DHT (the `pollen.models` index plus the models this process knows), asks every announced
server for its `Info` (a server that does not answer is "unreachable"), and returns the JSON of
`GET /api/v1/state`, keyed as health.petals.dev's state: `model_reports` (per model `name`, `state` "healthy"
when every block has an online server else "broken", `num_blocks`, `server_rows`), `bootstrap_states`,
`last_updated`, `update_period`, ... The dashboard, `/metrics` and `pollen swarm` all show this one object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from client_sdk.config import ClientConfig
from client_sdk.transport import ChannelPool
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import PollenError
from swarm.records import MODELS_KEY, ModelRecord, ServerRecord, ServerState, decode_server_records, verified

log = logging.getLogger(__name__)

MAX_MODELS = 64  # models listed from the index (anyone can announce one)
MAX_PINGS_AT_ONCE = 32


def short_id(peer_id: str) -> str:
    return peer_id[:6] + "…" + peer_id[-6:] if len(peer_id) > 14 else peer_id


async def list_models(dht: DhtClient) -> dict[str, int]:
    """Model id -> number of blocks, from the signed records of the `pollen.models` index."""
    models: dict[str, int] = {}
    for _, entry in sorted(verified(MODELS_KEY, await dht.get(MODELS_KEY), require_signed=True).items()):
        info = ModelRecord.decode(entry.value)
        if info is not None and entry.expiration > time.time():
            models[info.model_id] = max(models.get(info.model_id, 0), info.num_blocks)
    return dict(sorted(models.items())[:MAX_MODELS])


async def _info(pool: ChannelPool, record: ServerRecord, timeout_s: float, limit: asyncio.Semaphore) -> dict[str, Any]:
    async with limit:
        t0 = time.perf_counter()
        try:
            info = await pool.info(record.address, timeout_s)
        except PollenError as e:
            return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {
        "rtt_ms": round((time.perf_counter() - t0) * 1000, 2),
        "adapters": list(info.adapters),
        "active_sessions": info.active_sessions,
        "peer_id": info.peer_id,
    }


def _server_row(record: ServerRecord, probe: Mapping[str, Any] | None) -> dict[str, Any]:
    state = record.state.value
    if probe is not None and "error" in probe:
        state = "unreachable"
    elif probe is not None and probe.get("peer_id") not in (None, "", record.peer_id):
        state = "unreachable"  # someone else answers at that address now
    adapters = list((probe or {}).get("adapters", []))
    server_info = {
        "state": record.state.value,
        "throughput": record.throughput_tps,
        "start_block": record.start,
        "end_block": record.end,
        "public_name": None,
        "version": record.version,
        "network_rps": record.network_tps,
        "forward_rps": record.forward_tps,
        "inference_rps": record.throughput_tps,
        "adapters": adapters,
        "torch_dtype": record.dtype,
        "quant_type": record.quant,
        "using_relay": False,
        "cache_tokens_left": record.cache_tokens_left,
        "next_pings": dict(record.next_rtts_ms),
        "inference_max_length": record.inference_max_length,
        "active_sessions": (probe or {}).get("active_sessions", record.active_sessions),
    }
    return {
        "short_peer_id": short_id(record.peer_id),
        "peer_id": record.peer_id,
        "peer_ip_info": None,
        "show_public_name": False,
        "state": state,
        "address": record.address,
        "rtt_ms": (probe or {}).get("rtt_ms"),
        "adapters": adapters,
        "pings_to_me": {},
        "cache_tokens_left_per_block": record.cache_tokens_left,
        "span": {
            "peer_id": record.peer_id,
            "start": record.start,
            "end": record.end,
            "length": record.end - record.start,
            "server_info": server_info,
        },
    }


async def model_report(
    dht: DhtClient,
    pool: ChannelPool,
    model_id: str,
    num_blocks: int,
    ping_timeout_s: float,
    served_here: bool = False,
) -> dict[str, Any]:
    """One entry of `model_reports`: every announced server of the model, and whether all blocks are served."""
    keys = [block_key(model_id, i) for i in range(num_blocks)]
    raw = await dht.batch_get(keys)
    now = time.time()
    records: dict[tuple[str, int, int], ServerRecord] = {}
    for key, entries in zip(keys, raw):
        for record in decode_server_records(key, entries, now).values():
            records[(record.peer_id, record.start, record.end)] = record
    limit = asyncio.Semaphore(MAX_PINGS_AT_ONCE)
    to_probe = [r for r in records.values() if r.state in (ServerState.ONLINE, ServerState.JOINING)]
    probes = await asyncio.gather(*(_info(pool, r, ping_timeout_s, limit) for r in to_probe))
    by_key = {(r.peer_id, r.start, r.end): p for r, p in zip(to_probe, probes)}
    rows = [_server_row(r, by_key.get(k)) for k, r in records.items()]
    rows.sort(key=lambda row: (row["span"]["start"], row["span"]["end"], row["peer_id"]))
    coverage = [0] * num_blocks
    for row in rows:
        if row["state"] == "online":
            for i in range(row["span"]["start"], min(row["span"]["end"], num_blocks)):
                coverage[i] += 1
    healthy = bool(coverage) and min(coverage) > 0
    repo = model_id if model_id.count("/") == 1 and not model_id.startswith(("/", ".")) else None
    return {
        "name": model_id,
        "short_name": model_id.rsplit("/", 1)[-1],
        "state": "healthy" if healthy else "broken",
        "num_blocks": num_blocks,
        "server_rows": rows,
        "repository": f"https://huggingface.co/{repo}" if repo else None,
        "dht_prefix": model_id,
        "official": served_here,
        "limited": False,
        "served_here": served_here,
        "block_coverage": coverage,
        "missing_blocks": [i for i, n in enumerate(coverage) if n == 0],
        "reachability_issues": [
            {"peer_id": r.peer_id, "address": r.address, "err": p["error"]}
            for r, p in zip(to_probe, probes)
            if "error" in p
        ],
    }


async def bootstrap_states(peers: Sequence[str], timeout_s: float) -> list[str]:
    """ "online" or "unreachable" per initial peer (dht-node), in order."""

    async def one(address: str) -> str:
        dht = DhtClient([address], timeout_s=timeout_s, security=ClientConfig().security())
        try:
            await dht.ping()
            return "online"
        except PollenError:
            return "unreachable"
        finally:
            await dht.close()

    return list(await asyncio.gather(*(one(p) for p in peers)))


async def read_state(
    dht: DhtClient,
    pool: ChannelPool,
    initial_peers: Sequence[str],
    known_models: Mapping[str, int],
    *,
    include_index: bool = True,
    update_period_s: float = 0.0,
    ping_timeout_s: float = 2.0,
) -> dict[str, Any]:
    """The whole state. `known_models` (id -> num_blocks) are always reported (as served here); with
    `include_index`, every model the swarm's index announces too."""
    t0 = time.perf_counter()
    models = {m: (n, False) for m, n in (await list_models(dht)).items()} if include_index else {}
    models.update({m: (n, True) for m, n in known_models.items()})
    boot, reports = await asyncio.gather(
        bootstrap_states(initial_peers, ping_timeout_s),
        asyncio.gather(*(model_report(dht, pool, m, n, ping_timeout_s, here) for m, (n, here) in models.items())),
    )
    reports = sorted(reports, key=lambda r: (not r["served_here"], r["name"]))
    return {
        "bootstrap_states": boot,
        "bootstrap_peers": list(initial_peers),
        "top_contributors": {},
        "model_reports": reports,
        "reachability_issues": [issue for r in reports for issue in r["reachability_issues"]],
        "last_updated": time.time(),
        "update_period": update_period_s,
        "update_duration": round(time.perf_counter() - t0, 3),
    }
