"""DHT lookup benchmark on loopback: for N in-process dht-nodes, latency of one get and of a batch of 80
gets (one model's blocks, looked up concurrently as BatchGet does), and UDP RPCs per single lookup.

    .venv/bin/python bench/bench_dht.py [--sizes 10,50,200] [--reps 30] [--ksize 20]

All nodes bind 127.0.0.1 and share one event loop, so absolute latencies include that loop's queueing;
RPCs per lookup is the scale-free number (it should grow like log N, not N).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time

from dht_node.node import DhtNode
from dht_node.storage import Entry, Record
from swarm.blocks import block_key
from swarm.identity import Identity
from swarm.records import ServerRecord

MODEL = "bench-model"
BLOCKS = 80


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_size(n: int, reps: int, ksize: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    nodes = [DhtNode(host="127.0.0.1", port=0, ksize=ksize, rpc_timeout_s=3.0, republish_period_s=3600)]
    await nodes[0].start()
    for _ in range(1, n):
        node = DhtNode(host="127.0.0.1", port=0, ksize=ksize, rpc_timeout_s=3.0, republish_period_s=3600,
                       initial_peers=[rng.choice(nodes).address])  # fmt: skip
        await node.start()
        nodes.append(node)
    try:
        expiration = time.time() + 3600
        servers = [Identity.generate() for _ in range(4)]
        for s, identity in enumerate(servers):  # four servers of 20 blocks each: one record per key
            value = ServerRecord(peer_id=identity.peer_id, address="127.0.0.1:9", model_id=MODEL, start=20 * s,
                                 end=20 * s + 20).encode()  # fmt: skip
            for block in range(20 * s, 20 * s + 20):
                key = block_key(MODEL, block)
                sig = identity.sign(key, identity.peer_id, value, expiration)
                record: Record = {identity.peer_id: Entry(value, expiration, identity.public_key, sig)}
                await nodes[block % n].store(key, record)
        keys = [block_key(MODEL, b) for b in range(BLOCKS)]
        single, batch, rpcs = [], [], []
        for _ in range(reps):
            node = rng.choice(nodes)
            key = rng.choice(keys)
            before = node.protocol.rpcs_sent
            t = time.perf_counter()
            record = await node.get(key, timeout_s=10)
            single.append((time.perf_counter() - t) * 1000)
            rpcs.append(node.protocol.rpcs_sent - before)
            assert record, f"lookup of {key} found nothing"
        for _ in range(max(3, reps // 5)):
            node = rng.choice(nodes)
            t = time.perf_counter()
            records = await asyncio.gather(*(node.get(k, timeout_s=20) for k in keys))
            batch.append((time.perf_counter() - t) * 1000)
            assert all(records)
        return {
            "get_med": statistics.median(single), "get_p95": pct(single, 0.95),
            "batch_med": statistics.median(batch), "batch_p95": pct(batch, 0.95),
            "rpcs": statistics.mean(rpcs),
        }  # fmt: skip
    finally:
        await asyncio.gather(*(node.stop(grace_s=0) for node in nodes))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--ksize", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(
        f"{'N':>5} {'get med ms':>11} {'get p95 ms':>11} {'batch80 med ms':>15} {'batch80 p95 ms':>15} {'RPCs/get':>9}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        r = await run_size(n, args.reps, args.ksize, seed=n)
        print(f"{n:>5} {r['get_med']:>11.1f} {r['get_p95']:>11.1f} {r['batch_med']:>15.1f} {r['batch_p95']:>15.1f}"
              f" {r['rpcs']:>9.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
