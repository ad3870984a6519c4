"""The load part: N concurrent clients generate greedily for a while, every answer checked against transformers;
afterwards every server must be back to zero sessions with its whole KV-cache budget free.

The clients are AsyncSwarmClients on one event loop (each with its own channels, DHT view and routes), so 32 of
them cost one thread. Leak checks wait on the condition (a session is released when its stream's handler ends,
which may be a moment after the client closed it); they never sleep a fixed time.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from client_sdk import AsyncSwarmClient
from tests.launcher import Proc
from tests.soak.report import LoadResult
from tests.soak.swarmkit import metrics_port, read_metrics, server_info, wait_for

LEAK_WAIT_S = 60.0


@dataclass(frozen=True)
class Idle:
    """What a server shows when nothing runs on it (read at start, before any client)."""

    cache_tokens_left: int
    cache_bytes_budget: float | None  # None without the metrics gauge


def idle_state(server: Proc) -> Idle:
    info = server_info(server.address)
    port = metrics_port(server)
    budget = read_metrics(port).get("pollen_cache_bytes_budget") if port else None
    return Idle(info.cache_tokens_left, budget)


async def _client_loop(
    index: int,
    peers: list[str],
    model: Path,
    prompts: list[list[int]],
    references: list[list[int]],
    deadline: float,
    result: LoadResult,
) -> None:
    rng = random.Random(index)
    try:
        async with AsyncSwarmClient(peers, model) as client:
            while time.monotonic() < deadline:
                i = rng.randrange(len(prompts))
                try:
                    tokens = await client.generate(prompts[i], max_new_tokens=len(references[i]), eos_token_id=None)
                except Exception as e:  # noqa: BLE001 - every failure is a finding, reported with its type
                    result.errors.append(f"client {index}: {type(e).__name__}: {e}"[:300])
                    continue
                result.generations += 1
                result.tokens += len(tokens)
                if tokens != references[i]:
                    result.errors.append(f"client {index}: prompt {i} gave {tokens}, transformers {references[i]}")
    except Exception as e:  # noqa: BLE001 - a client that cannot even connect is an error too
        result.errors.append(f"client {index} (connect/close): {type(e).__name__}: {e}"[:300])


def run_load(
    peers: list[str],
    model: Path,
    servers: list[Proc],
    idle: dict[str, Idle],
    clients: int,
    seconds: float,
    prompts: list[list[int]],
    references: list[list[int]],
) -> LoadResult:
    result = LoadResult(clients=clients)

    async def main() -> None:
        t0 = time.monotonic()
        await asyncio.gather(*(_client_loop(i, peers, model, prompts, references, t0 + seconds, result)
                               for i in range(clients)))  # fmt: skip
        result.seconds = time.monotonic() - t0

    asyncio.run(main())
    for server in servers:
        check_released(server, idle[server.name], result)
    return result


def check_released(server: Proc, idle: Idle, result: LoadResult) -> None:
    """Wait until the server shows no session and its whole cache budget free; a leak if it never does."""
    port = metrics_port(server)
    last: dict[str, float] = {}

    def released() -> bool:
        info = server_info(server.address)
        last.update(sessions=info.active_sessions, tokens_left=info.cache_tokens_left)
        if port:
            m = read_metrics(port)
            last.update({k: m[k] for k in ("pollen_active_sessions", "pollen_cache_bytes_used",
                                           "pollen_cache_bytes_free", "pollen_queued_requests") if k in m})  # fmt: skip
        ok = info.active_sessions == 0 and info.cache_tokens_left == idle.cache_tokens_left
        if port and idle.cache_bytes_budget is not None:
            ok = ok and last.get("pollen_active_sessions") == 0 and last.get("pollen_cache_bytes_used") == 0
            ok = ok and last.get("pollen_cache_bytes_free") == idle.cache_bytes_budget
        return ok

    try:
        wait_for(f"{server.name} releases every session", released, LEAK_WAIT_S, period_s=0.5)
    except TimeoutError:
        result.leaks.append(f"{server.name} after {LEAK_WAIT_S:.0f} s: {last} (idle: {idle})")
    sessions = int(last.get("sessions", -1))
    free = last.get("pollen_cache_bytes_free")
    budget = f", cache bytes free {free:.0f} of {idle.cache_bytes_budget:.0f}" if free is not None else ""
    result.after.append(f"{server.name}: {sessions} sessions, cache tokens left {int(last.get('tokens_left', -1))} "
                        f"of {idle.cache_tokens_left}{budget}")  # fmt: skip
