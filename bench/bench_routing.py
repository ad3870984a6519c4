"""Routing benchmark: min-latency routes vs a random valid route, ms per token, with injected latency.

Five servers of a tiny random Llama (4 blocks), each behind a user-space delay proxy (one-way delay in
brackets): A 0:2 [3 ms], B 0:2 [30 ms], C 2:4 [3 ms], D 2:4 [30 ms], W 0:4 [40 ms]. The client measures
RTTs (pings), servers announce their RTTs to next servers, and Dijkstra picks a chain; we time inference
steps (1 token, after a 16-token prefill) on the chosen chain and on every valid chain (a random valid
route is one of them with equal probability, so its expected time is their mean).

Usage: python bench/bench_routing.py [--steps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.delay_proxy import DelayProxy  # noqa: E402
from client_sdk import AsyncSwarmClient  # noqa: E402
from client_sdk.routing import Span, route_cost_s  # noqa: E402
from client_sdk.session import InferenceSession  # noqa: E402
from tests.launcher import SwarmProcesses  # noqa: E402
from tests.models import make_tiny_llama  # noqa: E402

SERVERS = {"A": ("0:2", 3.0), "B": ("0:2", 30.0), "C": ("2:4", 3.0), "D": ("2:4", 30.0), "W": ("0:4", 40.0)}


async def time_route(client: AsyncSwarmClient, route: list[Span], steps: int, push: bool) -> float:
    session = InferenceSession(client.pool, client.model_id, route, max_length=16 + steps + 1, push=push)
    async with session:
        await session.step(torch.randn(1, 16, 64))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            await session.step(torch.randn(1, 1, 64))
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


async def run(dht: str, model: Path, names: dict[str, str], steps: int) -> None:
    async with AsyncSwarmClient([dht], model, refresh_period_s=0) as client:
        for _ in range(3):  # a few pings so the smoothed RTTs settle
            await client.view.ping(client.pool)
        records = {names[r.address]: r for r in client.view.records.servers()}
        costs = client._costs(64, 1)
        best = client.view.route(costs=costs)
        chains = [["A", "C"], ["A", "D"], ["B", "C"], ["B", "D"], ["W"]]
        rows = []
        for chain in chains:
            route = []
            start = 0
            for name in chain:
                r = records[name]
                route.append(Span(r.peer_id, r.address, start, r.end, r))
                start = r.end
            ms = await time_route(client, route, steps, push=True)
            rows.append(("+".join(chain), ms, 1000 * route_cost_s(route, costs)))
        chosen = "+".join(names[s.address] for s in best)
        by_peer = {r.peer_id: n for n, r in records.items()}
        client_rtts = {n: round(client.view.rtts_ms[r.peer_id], 1) for n, r in records.items()}
        announced = {
            n: {by_peer.get(p, p[:6]): round(v, 1) for p, v in r.next_rtts_ms.items()} for n, r in records.items()
        }
        print(f"\nclient RTTs (ms): {client_rtts}")
        print(f"announced next-server RTTs (ms): {announced}")
        print("\n| chain | ms/token measured (push on) | estimated by the router |\n|---|---|---|")
        for chain, ms, est in rows:
            mark = " **(min-latency choice)**" if chain == chosen else ""
            print(f"| {chain}{mark} | {ms:.1f} | {est:.1f} |")
        chosen_ms = next(ms for c, ms, _ in rows if c == chosen)
        random_ms = statistics.mean(ms for _, ms, _ in rows)
        print(
            f"\nmin-latency route {chosen}: {chosen_ms:.1f} ms/token; random valid route (expected): "
            f"{random_ms:.1f} ms/token ({random_ms / chosen_ms:.1f}x slower)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-routing-")) / "tiny")
    proxies = {n: DelayProxy(d / 1000) for n, (_, d) in SERVERS.items()}
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        started = {}
        for name, (blocks, _) in SERVERS.items():
            flags = ("--num-threads", "1", "--throughput", "1000", "--public-address", proxies[name].address,
                     "--announce-period", "2")  # fmt: skip
            started[name] = procs.start_server(model, blocks, [dht.address], *flags, wait=False)
        for name, proc in started.items():
            proxies[name].set_target(procs.wait_ready(proc))
        time.sleep(5)  # servers measure RTTs to their next servers and re-announce them
        names = {proxies[n].address: n for n in SERVERS}
        asyncio.run(run(dht.address, model, names, args.steps))
    for proxy in proxies.values():
        proxy.close()


if __name__ == "__main__":
    main()
