"""Shutdown soak: N cycles of (start a shard-server process, run concurrent generations through it, SIGTERM it)
and count exit codes. Every cycle must exit 0; issue 13 saw SIGABRT (-6, "terminate called without an active
exception") in 1-3 of 10 cycles before the fix.

    .venv/bin/python bench/soak_shutdown.py --cycles 50
    .venv/bin/python bench/soak_shutdown.py --cycles 10 --during   # SIGTERM while generations still run

One dht-node lives for the whole run; each cycle starts a fresh server (tiny random Llama, blocks 0:4). Prints a
table of exit codes and, for any cycle that did not exit 0, the tail of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.launcher import Proc, SwarmProcesses  # noqa: E402

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]


async def generate_concurrently(dht_address: str, model: Path, clients: int, tokens: int) -> None:
    """`clients` generations at once, each through its own client (its own session on the server)."""
    from client_sdk import AsyncSwarmClient

    async def one() -> None:
        async with AsyncSwarmClient([dht_address], model) as client:
            await client.generate(PROMPT, max_new_tokens=tokens, eos_token_id=None)

    await asyncio.gather(*(one() for _ in range(clients)))


async def generate_until_cancelled(dht_address: str, model: Path, clients: int, started: asyncio.Event) -> None:
    """Streams that run until the server goes away (their failures are expected)."""
    from client_sdk import AsyncSwarmClient

    async def one() -> None:
        with contextlib.suppress(Exception):
            async with AsyncSwarmClient([dht_address], model, max_retries=0) as client:
                stream = client.stream(PROMPT, max_new_tokens=1000, eos_token_id=None)
                async with contextlib.aclosing(stream):
                    async for _ in stream:
                        started.set()

    await asyncio.gather(*(one() for _ in range(clients)))


def run_cycle(procs: SwarmProcesses, dht: Proc, model: Path, args: argparse.Namespace, i: int) -> tuple[int, Proc]:
    server = procs.start_server(model, "0:4", [dht.address], "--throughput", "100", "--ttl", "5",
                                "--drain-timeout", str(args.drain_timeout), name=f"server-{i}")  # fmt: skip
    if args.during:

        async def during() -> None:
            started = asyncio.Event()
            gen = asyncio.create_task(generate_until_cancelled(dht.address, model, args.clients, started))
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.to_thread(procs.stop, server, signal.SIGTERM, 30.0)
            await asyncio.wait_for(gen, 60)

        asyncio.run(during())
    else:
        asyncio.run(generate_concurrently(dht.address, model, args.clients, args.tokens))
    return procs.stop(server, signal.SIGTERM, 30.0), server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--clients", type=int, default=4, help="concurrent generations per cycle")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    p.add_argument("--during", action="store_true", help="SIGTERM while the generations still run")
    p.add_argument("--drain-timeout", type=float, default=5.0)
    args = p.parse_args(argv)

    from tests.models import make_tiny_llama

    scratch = Path(tempfile.mkdtemp(prefix="soak-shutdown-"))
    model = make_tiny_llama(scratch / "tiny-llama")
    codes: collections.Counter[int] = collections.Counter()
    failures: list[tuple[int, int, str]] = []
    t0 = time.monotonic()
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        for i in range(args.cycles):
            code, server = run_cycle(procs, dht, model, args, i)
            codes[code] += 1
            if code != 0:
                failures.append((i, code, server.log()[-3000:]))
            print(f"cycle {i + 1}/{args.cycles}: exit {code}", flush=True)
            procs.procs.remove(server)
    print(f"\n{args.cycles} cycles of start, {args.clients} concurrent generations"
          f"{' (SIGTERM during them)' if args.during else ''}, SIGTERM in {time.monotonic() - t0:.0f} s\n")  # fmt: skip
    print("| exit code | cycles |\n|---|---|")
    for code, n in sorted(codes.items()):
        print(f"| {code} | {n} |")
    for i, code, log in failures:
        print(f"\n===== cycle {i}: exit {code}, log tail =====\n{log}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
