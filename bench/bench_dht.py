"""DHT benchmarks on loopback.

    .venv/bin/python bench/bench_dht.py [--sizes 10,50,200] [--reps 30] [--ksize 20]
    .venv/bin/python bench/bench_dht.py --security [--reps 200]   # swarm key / TLS overhead per get
    .venv/bin/python bench/bench_dht.py --amplification            # bytes out per byte in, forged source

Default: for N in-process dht-nodes, latency of one get and of a batch of 80 gets (one model's blocks, looked
up concurrently as BatchGet does), and UDP RPCs per single lookup. All nodes bind 127.0.0.1 and share one
event loop, so absolute latencies include that loop's queueing; RPCs per lookup is the scale-free number (it
should grow like log N, not N).

--security: one real `dht-node` process per setup (plaintext, swarm key, TLS, key + TLS); a DhtClient in this
process measures a get on an open channel and a first get on a new channel (TLS handshake included). Setups
are interleaved round by round so that a busy machine slows them alike. --amplification: a raw socket sends
find_value/find_node from an address the nodes never heard of and counts the bytes that come back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: this tree's code and tests

import umsgpack  # noqa: E402
from kademlia.utils import digest  # noqa: E402

from dht_node.node import DhtNode  # noqa: E402
from dht_node.protocol import CLIENT_ID  # noqa: E402
from dht_node.storage import Entry, Record  # noqa: E402
from dht_node.wire import REQUEST, RESPONSE, RETRY  # noqa: E402
from swarm.auth import SwarmKey  # noqa: E402
from swarm.blocks import block_key  # noqa: E402
from swarm.dht_client import DhtClient  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.net import Security, TlsFiles  # noqa: E402
from swarm.records import ServerRecord  # noqa: E402
from tests.integration.dht_support import UdpPeer, make_tls_files  # noqa: E402

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


def signed_record(key: str, expiration: float) -> tuple[Identity, bytes]:
    server = Identity.generate()
    value = ServerRecord(peer_id=server.peer_id, address="127.0.0.1:9", model_id=MODEL, start=0, end=1).encode()
    return server, value


async def security_overhead(reps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dht-") as tmp:
        work = Path(tmp)
        key_file, tls = work / "swarm.key", make_tls_files(work)
        SwarmKey.generate().write(key_file)
        key = SwarmKey.from_file(key_file)
        tls_flags = ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
        setups = {
            "plaintext": ([], Security()),
            "swarm key": (["--swarm-key", str(key_file)], Security(key)),
            "TLS": (tls_flags, Security(tls=TlsFiles(ca=tls["ca"]))),
            "swarm key + TLS": (["--swarm-key", str(key_file), *tls_flags], Security(key, TlsFiles(ca=tls["ca"]))),
        }
        procs, clients, addresses = [], {}, {}
        try:
            for name, (flags, security) in setups.items():
                ready = work / f"{len(procs)}.ready"
                argv = [sys.executable, "-m", "dht_node.cli", "--bootstrap", "--port", "0", "--ready-file", str(ready),
                        "--log-level", "WARNING", *flags]  # fmt: skip
                procs.append(subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent))
                while not (ready.exists() and ready.read_text().strip()):
                    await asyncio.sleep(0.05)
                addresses[name] = ready.read_text().strip()
                clients[name] = DhtClient([addresses[name]], security=security)
                server, value = signed_record(block_key(MODEL, 0), time.time() + 3600)
                assert await clients[name].store_signed(server, block_key(MODEL, 0), value, time.time() + 3600)
            warm: dict[str, list[float]] = {name: [] for name in setups}
            cold: dict[str, list[float]] = {name: [] for name in setups}
            for rep in range(reps):
                for name, (_, security) in setups.items():
                    t0 = time.perf_counter()
                    assert await clients[name].get(block_key(MODEL, 0))
                    warm[name].append((time.perf_counter() - t0) * 1000)
                    if rep % 10 == 0:  # a new channel: connection (and TLS handshake) plus the first call
                        fresh = DhtClient([addresses[name]], security=security)
                        t0 = time.perf_counter()
                        assert await fresh.get(block_key(MODEL, 0))
                        cold[name].append((time.perf_counter() - t0) * 1000)
                        await fresh.close()
            base = statistics.median(warm["plaintext"])
            print(f"{'setup':<16} {'get med ms':>11} {'get p95 ms':>11} {'vs plain ms':>12} {'new channel med ms':>19}")
            for name in setups:
                med = statistics.median(warm[name])
                print(f"{name:<16} {med:>11.2f} {pct(warm[name], 0.95):>11.2f} {med - base:>+12.2f} "
                      f"{statistics.median(cold[name]):>19.2f}")  # fmt: skip
        finally:
            await asyncio.gather(*(c.close() for c in clients.values()))
            for proc in procs:
                proc.terminate()
                proc.wait()


async def amplification() -> None:
    nodes = [DhtNode(host="127.0.0.1", port=0, ksize=8)]
    await nodes[0].start()
    for _ in range(9):
        node = DhtNode(host="127.0.0.1", port=0, ksize=8, initial_peers=[nodes[0].address])
        await node.start()
        nodes.append(node)
    try:
        key = block_key(MODEL, 0)
        expiration = time.time() + 3600
        for _ in range(8):
            server, value = signed_record(key, expiration)
            sig = server.sign(key, server.peer_id, value, expiration)
            await nodes[1].store(key, {server.peer_id: Entry(value, expiration, server.public_key, sig)})
        target = next(n for n in nodes if n.storage.get_record(digest(key)))
        print(f"{'request (from an unproven address)':<36} {'in B':>5} {'out B':>6} {'ratio':>6}  reply")
        for rpc, node_id in (("find_value", os.urandom(20)), ("find_value", CLIENT_ID), ("find_node", os.urandom(20))):
            for with_token in (False, True):
                sender = await UdpPeer.open()  # a fresh address: a token proves it for a while
                try:
                    args = [node_id, digest(key)]
                    datagram = REQUEST + os.urandom(20) + umsgpack.packb([rpc, args])
                    if with_token:  # the RETRY of a first request gives the token this request carries
                        sender.send(datagram, target.port)
                        await sender.barrier(target.port)
                        retry = next(d for d in sender.received if d[1:21] == datagram[1:21])
                        datagram = REQUEST + os.urandom(20) + umsgpack.packb([rpc, args, retry[21:]])
                    sender.send(datagram, target.port)
                    await sender.barrier(target.port)
                    replies = [d for d in sender.received if d[1:21] == datagram[1:21]]
                finally:
                    sender.close()
                out = sum(map(len, replies))
                kind = {RESPONSE: "full reply", RETRY: "RETRY (token)"}.get(replies[0][:1], "?") if replies else "-"
                label = f"{rpc} ({'node id' if node_id else 'client'}{', with its token' if with_token else ''})"
                print(f"{label:<36} {len(datagram):>5} {out:>6} {out / len(datagram):>6.1f}  {kind}")
    finally:
        await asyncio.gather(*(n.stop(grace_s=0) for n in nodes))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--ksize", type=int, default=20)
    parser.add_argument("--security", action="store_true", help="swarm key and TLS overhead per get")
    parser.add_argument("--amplification", action="store_true", help="reply bytes per request byte, forged source")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.security:
        await security_overhead(args.reps)
        return
    if args.amplification:
        await amplification()
        return
    print(
        f"{'N':>5} {'get med ms':>11} {'get p95 ms':>11} {'batch80 med ms':>15} {'batch80 p95 ms':>15} {'RPCs/get':>9}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        r = await run_size(n, args.reps, args.ksize, seed=n)
        print(f"{n:>5} {r['get_med']:>11.1f} {r['get_p95']:>11.1f} {r['batch_med']:>15.1f} {r['batch_p95']:>15.1f}"
              f" {r['rpcs']:>9.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
