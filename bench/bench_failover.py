"""Fault tolerance: kill -9 the server in use during a 100-token greedy generation (3 servers: 0:2, 0:2, 2:4
of a tiny random Llama, as in ../shared/notes/petals-bench.md's FT setup). Reports the stall (the longest
gap between tokens after the kill), whether the tokens equal an uninterrupted run, and the failover.

Usage: python bench/bench_failover.py [--runs 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client_sdk import SwarmClient  # noqa: E402
from tests.launcher import SwarmProcesses  # noqa: E402
from tests.models import make_tiny_llama  # noqa: E402

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
FLAGS = ("--num-threads", "1", "--throughput", "100", "--ttl", "6")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kill-at", type=int, default=30)
    args = ap.parse_args()
    model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-ft-")) / "tiny")
    rows = []
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        servers = [procs.start_server(model, b, [dht.address], *FLAGS, wait=False) for b in ("0:2", "0:2", "2:4")]
        for s in servers:
            procs.wait_ready(s)
        for run in range(args.runs):
            with SwarmClient([dht.address], model, refresh_period_s=0, ban_s=60) as client:
                reference = client.generate(PROMPT, max_new_tokens=100, eos_token_id=None)
                stamps, tokens, killed = [], [], []
                for token in client.stream(PROMPT, max_new_tokens=100, eos_token_id=None):
                    tokens.append(token)
                    stamps.append(time.perf_counter())
                    if len(tokens) == args.kill_at:
                        session = client.async_client.active_session
                        assert session is not None
                        address = session.spans[0].address
                        victim = next(p for p in servers if p.address == address)
                        killed.append(victim)
                        threading.Thread(target=procs.stop, args=(victim, signal.SIGKILL)).start()
                gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
                stall = max(gaps[args.kill_at - 1 :])
                failover = client.async_client.last_failovers
                rows.append((run, stall, statistics.median(gaps), tokens == reference, failover))
            # bring the killed server back for the next run
            servers.remove(killed[0])
            servers.append(procs.start_server(model, "0:2", [dht.address], *FLAGS))
    print(f"\nkill -9 at token {args.kill_at} of 100 (3 servers 0:2, 0:2, 2:4; tiny Llama; loopback)")
    print("| run | stall ms (kill -> next token) | typical gap ms | tokens == uninterrupted | recovery |")
    print("|---|---|---|---|---|")
    for run, stall, gap, same, failover in rows:
        what = "; ".join(f"{f.span} -> {'+'.join(f.replacement)} ({f.error.split(':')[0]})" for f in failover)
        print(f"| {run} | {stall * 1000:.0f} | {gap * 1000:.1f} | {same} | {what} |")


if __name__ == "__main__":
    main()
