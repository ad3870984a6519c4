"""DHT lookups through churn, with real processes: N `dht-node`s, R signed records, then K nodes SIGKILLed
(the bootstrap node among them) while a client keeps reading. Prints get latency p50/p95/p99 per window and
any record a get failed to return ("lost").

    .venv/bin/python bench/bench_dht_churn.py [--nodes 50] [--records 40] [--kill 10] [--after-s 180]

Each get goes through the gRPC front door of a random surviving node (DhtClient, as servers and clients use
it) for a random record key, `--rate` gets per second. `--code-dir` runs the nodes from another checkout
(e.g. `git archive HEAD~5 | tar -x -C /tmp/old`) to compare versions on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.identity import Identity
from swarm.records import ServerRecord

MODEL = "churn-bench"


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    ready_file: Path
    address: str = ""


@dataclass
class Sample:
    at: float  # seconds relative to the kill
    latency_s: float
    ok: bool  # the record came back


@dataclass
class Swarm:
    code_dir: str
    workdir: Path
    extra: list[str]
    nodes: list[Node] = field(default_factory=list)

    def spawn(self, peers: list[str]) -> Node:
        ready = self.workdir / f"node{len(self.nodes)}.ready"
        argv = [sys.executable, "-m", "dht_node.cli", "--host", "127.0.0.1", "--port", "0", "--ready-file",
                str(ready), "--log-level", "WARNING", *self.extra]  # fmt: skip
        argv += ["--initial-peers", ",".join(peers)] if peers else ["--bootstrap"]
        log = open(self.workdir / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, cwd=self.code_dir, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": ""})
        node = Node(proc, ready)
        self.nodes.append(node)
        return node

    async def wait_ready(self, nodes: list[Node], timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            while not (node.ready_file.exists() and node.ready_file.read_text().strip()):
                if node.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dht-node {node.ready_file.stem} did not start")
                await asyncio.sleep(0.1)
            node.address = node.ready_file.read_text().strip()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
        for node in self.nodes:
            node.proc.wait()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def store_records(swarm: Swarm, count: int, rng: random.Random) -> dict[str, str]:
    """One signed server record per key; returns key -> the peer id that must come back."""
    expected = {}
    expiration = time.time() + 3600
    for i in range(count):
        server = Identity.generate()
        key = block_key(MODEL, i)
        value = ServerRecord(peer_id=server.peer_id, address="127.0.0.1:9", model_id=MODEL, start=i,
                             end=i + 1).encode()  # fmt: skip
        client = DhtClient([rng.choice(swarm.nodes).address], timeout_s=10.0)
        try:
            assert await client.store_signed(server, key, value, expiration), f"store of {key} failed"
        finally:
            await client.close()
        expected[key] = server.peer_id
    return expected


async def read_loop(
    alive: list[Node], expected: dict[str, str], rate: float, until: float, t_kill: list[float], rng: random.Random
) -> list[Sample]:
    samples: list[Sample] = []
    clients: dict[str, DhtClient] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(node: Node, key: str) -> None:
        client = clients.get(node.address)
        if client is None:
            client = clients[node.address] = DhtClient([node.address], timeout_s=10.0)
        t0 = time.monotonic()
        try:
            record = await client.get(key)
            ok = expected[key] in record
        except Exception:  # noqa: BLE001 - a failed get is a data point, not a crash
            ok = False
        samples.append(Sample(t0 - t_kill[0], time.monotonic() - t0, ok))

    next_at = time.monotonic()
    while time.monotonic() < until:
        node, key = rng.choice(alive), rng.choice(list(expected))
        task = asyncio.ensure_future(one(node, key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1.0 / rate
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)
    await asyncio.gather(*(c.close() for c in clients.values()))
    return samples


def report(samples: list[Sample], window_s: float) -> dict[str, float]:
    print(
        f"{'window (s after kill)':>22} {'gets':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>5}"
    )
    start = int(min(s.at for s in samples) // window_s) * window_s
    first_minute: list[float] = []
    worst_after = 0.0
    while start <= max(s.at for s in samples):
        part = [s for s in samples if start <= s.at < start + window_s]
        lat = [s.latency_s * 1000 for s in part]
        if part:
            lost = sum(not s.ok for s in part)
            print(f"{start:>9.0f} .. {start + window_s:<9.0f} {len(part):>5} {pct(lat, 0.5):>8.1f} "
                  f"{pct(lat, 0.95):>8.1f} {pct(lat, 0.99):>8.1f} {max(lat):>8.1f} {lost:>5}")  # fmt: skip
        if start >= 0:
            worst_after = max(worst_after, pct(lat, 0.99) if lat else 0.0)
            if start < 60:
                first_minute += lat
        start += window_s
    after = [s for s in samples if s.at >= 0]
    summary = {
        "p99_first_minute_ms": pct(first_minute, 0.99),
        "worst_window_p99_ms": worst_after,
        "lost_after_kill": float(sum(not s.ok for s in after)),
        "lost_before_kill": float(sum(not s.ok for s in samples if s.at < 0)),
    }
    print("summary: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    return summary


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=50, help="dht-node processes")
    parser.add_argument("--records", type=int, default=40, help="signed records stored before the kill")
    parser.add_argument("--kill", type=int, default=10, help="nodes SIGKILLed, the bootstrap among them")
    parser.add_argument("--before-s", type=float, default=20.0, help="reading before the kill")
    parser.add_argument("--after-s", type=float, default=180.0, help="reading after the kill")
    parser.add_argument("--window-s", type=float, default=10.0, help="seconds per row of the table")
    parser.add_argument("--rate", type=float, default=10.0, help="gets per second")
    parser.add_argument("--seed", type=int, default=1, help="seed of the keys, the kills and the reads")
    parser.add_argument(
        "--code-dir",
        default=str(Path(__file__).resolve().parents[1]),
        help="checkout to run the nodes from (compare versions on one machine)",
    )
    parser.add_argument("--node-args", default="", help="extra dht-node flags, e.g. '--rpc-timeout 1.5'")
    parser.add_argument("--logs", help="keep the nodes' logs in this directory (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        workdir = Path(args.logs or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        swarm = Swarm(args.code_dir, workdir, args.node_args.split())
        try:
            t0 = time.monotonic()
            boot = swarm.spawn([])
            await swarm.wait_ready([boot])
            while len(swarm.nodes) < args.nodes:  # waves of 10, each node joining through a random ready one
                ready = [n for n in swarm.nodes if n.address]
                wave = [swarm.spawn([rng.choice(ready).address]) for _ in range(min(10, args.nodes - len(swarm.nodes)))]
                await swarm.wait_ready(wave)
            print(f"{args.nodes} dht-nodes ready in {time.monotonic() - t0:.0f} s (code: {args.code_dir})", flush=True)
            expected = await store_records(swarm, args.records, rng)
            print(f"{args.records} signed records stored", flush=True)
            victims = [boot, *rng.sample(swarm.nodes[1:], args.kill - 1)]
            alive = [n for n in swarm.nodes if n not in victims]
            t_kill = [time.monotonic() + args.before_s]

            async def kill_later() -> None:
                await asyncio.sleep(args.before_s)
                for node in victims:
                    node.proc.send_signal(signal.SIGKILL)
                t_kill[0] = time.monotonic()
                print(f"SIGKILLed {len(victims)} nodes (the bootstrap node among them)", flush=True)

            killer = asyncio.ensure_future(kill_later())
            until = time.monotonic() + args.before_s + args.after_s
            samples = await read_loop(alive, expected, args.rate, until, t_kill, rng)
            await killer
            report(samples, args.window_s)
        finally:
            swarm.stop()


if __name__ == "__main__":
    asyncio.run(main())
