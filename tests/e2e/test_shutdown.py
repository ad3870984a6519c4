"""SIGTERM under load exits 0, every time: cycles of (start a shard-server process, 4 concurrent generations
through it, SIGTERM while they run). Before the fix 1-3 cycles in 10 ended with SIGABRT (-6) and "terminate
called without an active exception": the torch worker thread was still inside a step at interpreter exit.

`CYCLES` here keeps `make test` short; bench/soak_shutdown.py runs the same cycle 50 times.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import pytest

from tests.launcher import Proc, SwarmProcesses

pytestmark = pytest.mark.e2e

CYCLES = 5
PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]


async def generate_until_cancelled(dht_address: str, model: Path, clients: int, started: asyncio.Event) -> None:
    """`clients` long generations at once, each with its own client (its own session on the server); their
    failures once the server is gone are expected."""
    from client_sdk import AsyncSwarmClient

    async def one() -> None:
        with contextlib.suppress(Exception):
            async with AsyncSwarmClient([dht_address], model) as client:
                stream = client.stream(PROMPT, max_new_tokens=1000, eos_token_id=None)
                async with contextlib.aclosing(stream):
                    async for _ in stream:
                        started.set()

    await asyncio.gather(*(one() for _ in range(clients)))


async def generate(dht_address: str, model: Path, clients: int, tokens: int) -> None:
    """`clients` generations of `tokens` tokens at once, to the end."""
    from client_sdk import AsyncSwarmClient

    async def one() -> None:
        async with AsyncSwarmClient([dht_address], model) as client:
            await client.generate(PROMPT, max_new_tokens=tokens, eos_token_id=None)

    await asyncio.gather(*(one() for _ in range(clients)))


def shutdown_cycle(
    procs: SwarmProcesses,
    dht: Proc,
    model: Path,
    name: str,
    clients: int = 4,
    during: bool = True,
    drain_timeout_s: float = 0.5,
) -> tuple[int, Proc]:
    """Start a server (blocks 0:4), load it with `clients` generations, SIGTERM it (while they run, or after
    16 tokens each); returns its exit code and process."""
    server = procs.start_server(model, "0:4", [dht.address], "--throughput", "100", "--network-mbps", "1000",
                                "--drain-timeout", str(drain_timeout_s), name=name)  # fmt: skip

    async def load_then_stop() -> None:
        if not during:
            await generate(dht.address, model, clients, 16)
            return
        started = asyncio.Event()
        gen = asyncio.create_task(generate_until_cancelled(dht.address, model, clients, started))
        await asyncio.wait_for(started.wait(), 120)
        await asyncio.to_thread(procs.stop, server, signal.SIGTERM, 60.0)
        gen.cancel()  # the clients would look for another server for their whole time budget
        await asyncio.gather(gen, return_exceptions=True)

    asyncio.run(load_then_stop())
    return procs.stop(server, signal.SIGTERM, 60.0), server


def test_sigterm_during_generations_exits_0_every_time(tiny_llama: Path) -> None:
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        for i in range(CYCLES):
            code, server = shutdown_cycle(procs, dht, tiny_llama, f"server-{i}")
            assert code == 0, f"cycle {i}: exit {code}\n{server.log()[-3000:]}"
            assert "terminate called" not in server.log()
