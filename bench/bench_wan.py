"""WAN benchmark of server-to-server push: 2 servers (blocks 0:2 and 2:4 of a tiny random Llama), every link
delayed 25 ms one way by a user-space proxy in front of each server (client->A, client->B and A->B all go
through them). Greedy decoding, ms per token (median gap between tokens) with push on and off.

Expected: push off = 4 one-way legs per token (client->A->client->B->client) + compute = ~100 ms;
push on = 3 legs (client->A->B->client) = ~75 ms.

Usage: python bench/bench_wan.py [--delay-ms 25] [--tokens 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.delay_proxy import DelayProxy  # noqa: E402
from client_sdk import SwarmClient  # noqa: E402
from tests.launcher import SwarmProcesses  # noqa: E402
from tests.models import make_tiny_llama  # noqa: E402


def ms_per_token(client: SwarmClient, tokens: int) -> float:
    client.generate([1, 2, 3, 4], max_new_tokens=4, eos_token_id=None)  # warm-up
    stamps = []
    for _ in client.stream([1, 17, 42, 99, 5, 64, 23, 7], max_new_tokens=tokens, eos_token_id=None):
        stamps.append(time.perf_counter())
    return 1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay-ms", type=float, default=25.0)
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()
    model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-wan-")) / "tiny")
    proxies = [DelayProxy(args.delay_ms / 1000) for _ in range(2)]
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        servers = []
        for proxy, blocks in zip(proxies, ("0:2", "2:4"), strict=True):
            flags = ("--num-threads", "1", "--throughput", "100", "--public-address", proxy.address)
            servers.append(procs.start_server(model, blocks, [dht.address], *flags, wait=False))
        for proxy, server in zip(proxies, servers, strict=True):
            proxy.set_target(procs.wait_ready(server))
        rows = []
        for push in (False, True):
            with SwarmClient([dht.address], model, use_push=push, refresh_period_s=0) as client:
                rows.append((push, ms_per_token(client, args.tokens)))
    for proxy in proxies:
        proxy.close()
    d = args.delay_ms
    print(f"\n2 servers, {d:.0f} ms one-way on every link, {args.tokens} greedy tokens (tiny Llama, compute ~1 ms)")
    print("| push | ms/token (median) | one-way legs (ms/token / delay) |")
    print("|---|---|---|")
    for push, ms in rows:
        print(f"| {'on' if push else 'off'} | {ms:.1f} | {ms / d:.2f} |")


if __name__ == "__main__":
    main()
