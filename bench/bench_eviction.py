"""Eviction under load (issue 14 part 3): more chat users than the servers' KV budget, with think time between
turns, run twice: `--evict-idle-after E` and `--evict-idle-after 0` (off: the FIFO wait, then RESOURCE_EXHAUSTED).

Swarm: a dht-node and two shard-servers (blocks 0:2, 2:4 of a tiny random Llama), each with the budget of the server
load test (10 sessions of 32 tokens). Users arrive `--stagger` s apart; each opens a 32-token session and generates
3 turns of 8 greedy tokens (after an 8-token prompt) with `--think` s between turns (> E, so a user thinking is
evictable). Reports per run: users finished, all exact (vs transformers greedy, EOS kept out as min_new_tokens),
evictions (server log lines) and client replays, time to first token of users who arrived to full caches, and
the extra ms of a step that had to reopen and replay (median step with a replay minus median step without).

Usage: python bench/bench_eviction.py [--users 16] [--think 2] [--evict-after 1] [--stagger 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, code_version, markdown, use_threads  # noqa: E402

MAX_LENGTH = 32
PROMPT_LEN = 8
TURN = 8  # tokens per turn; 3 turns fill the session
SESSIONS_IN_BUDGET = 10


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    error: str = ""
    first_token_s: float = 0.0  # from arrival (before open) to the first token
    steps_plain_ms: list[float] = field(default_factory=list)
    steps_replay_ms: list[float] = field(default_factory=list)  # steps during which the session reopened
    replays: int = 0


def prompts(n: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(14)
    return [torch.randint(3, 128, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]


def reference(model: Path, all_prompts: list[list[int]]) -> list[list[int]]:
    from tests.reference import greedy_references

    return greedy_references(model, all_prompts, MAX_LENGTH - PROMPT_LEN)


async def user(client: object, prompt: list[int], delay: float, think: float) -> Result:
    import torch

    from client_sdk import AsyncSwarmClient

    assert isinstance(client, AsyncSwarmClient)
    r = Result()
    await asyncio.sleep(delay)  # arrival (the workload's own clock, not a synchronisation)
    t_arrive = time.perf_counter()
    try:
        session = await client.open_session(MAX_LENGTH)
    except Exception as e:  # noqa: BLE001 - reported per user
        r.error = f"open: {type(e).__name__}: {e}"[:200]
        return r
    try:
        feed = torch.tensor([prompt])
        for turn in range(3):
            if turn:
                await asyncio.sleep(think)  # the user reads and types
            for _ in range(TURN):
                before = len(session.failovers)
                t0 = time.perf_counter()
                logits = (await client.next_logits(session, feed)).clone()  # [1, vocab]
                ms = 1000 * (time.perf_counter() - t0)
                if not r.tokens:
                    r.first_token_s = time.perf_counter() - t_arrive
                elif len(session.failovers) > before:
                    r.steps_replay_ms.append(ms)
                else:
                    r.steps_plain_ms.append(ms)
                logits[:, client.local.eos_token_ids] = float("-inf")
                token = int(logits.argmax(-1))
                r.tokens.append(token)
                feed = torch.tensor([[token]])
    except Exception as e:  # noqa: BLE001
        r.error = f"step {len(r.tokens)}: {type(e).__name__}: {e}"[:200]
    finally:
        r.replays = sum("evicted" in f.error for f in session.failovers)
        await session.close()
    return r


def run(model: Path, evict_after: float, args: argparse.Namespace, expected: list[list[int]]) -> list[object]:
    from client_sdk import AsyncSwarmClient
    from tests.launcher import SwarmProcesses

    flags = ["--num-threads", "1", "--throughput", "100", "--cache-tokens", str(SESSIONS_IN_BUDGET * MAX_LENGTH),
             "--inference-max-length", str(MAX_LENGTH), "--evict-idle-after", str(evict_after),
             "--alloc-timeout", str(args.alloc_timeout)]  # fmt: skip
    with SwarmProcesses(env=child_env(1)) as procs:
        dht = procs.start_dht()
        servers = [procs.start_server(model, b, [dht.address], *flags, wait=False) for b in ("0:2", "2:4")]
        for s in servers:
            procs.wait_ready(s)

        async def main() -> list[Result]:
            async with AsyncSwarmClient([dht.address], model, failover_budget_s=120, open_timeout_s=120) as client:
                all_prompts = prompts(args.users)
                jobs = [user(client, p, i * args.stagger, args.think) for i, p in enumerate(all_prompts)]
                return list(await asyncio.gather(*jobs))

        t0 = time.perf_counter()
        results = asyncio.run(main())
        wall = time.perf_counter() - t0
        evictions = sum(s.log().count("evicted after") for s in servers)
    done = [r for r in results if not r.error and len(r.tokens) == MAX_LENGTH - PROMPT_LEN]
    exact = all(r.tokens == e for r, e in zip(results, expected, strict=True) if r in done)
    late = [r.first_token_s for r in results[SESSIONS_IN_BUDGET:] if r.tokens]  # arrived to full caches
    plain = [ms for r in results for ms in r.steps_plain_ms]
    replay = [ms for r in results for ms in r.steps_replay_ms]
    med = statistics.median
    extra = f"{med(replay) - med(plain):.0f}" if replay and plain else "-"
    errors = sorted({r.error.split(":")[0] + ": " + r.error.split(":", 2)[-1][:80] for r in results if r.error})
    for e in errors:
        print(f"  [{'off' if not evict_after else evict_after}] {e}")
    return [
        "off" if not evict_after else f"{evict_after:g} s",
        f"{len(done)}/{len(results)}",
        "yes" if exact and done else "no",
        evictions,
        sum(r.replays for r in results),
        f"{med(late):.2f} (max {max(late):.2f})" if late else "-",
        f"{med(plain):.0f}" if plain else "-",
        extra,
        f"{wall:.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--think", type=float, default=2.0)
    ap.add_argument("--evict-after", type=float, default=1.0)
    ap.add_argument("--stagger", type=float, default=0.25)
    ap.add_argument("--alloc-timeout", type=float, default=10.0)
    args = ap.parse_args()
    use_threads(1)
    from tests.models import make_tiny_llama

    model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-evict-")) / "tiny")
    expected = reference(model, prompts(args.users))
    rows = [run(model, after, args, expected) for after in (args.evict_after, 0.0)]
    setup = f"{args.users} users, budget {SESSIONS_IN_BUDGET} sessions x {MAX_LENGTH} tokens per server, 2 servers"
    print(f"\n{setup}, think {args.think} s, stagger {args.stagger} s, alloc timeout {args.alloc_timeout} s")
    print(code_version())
    header = ["evict idle after", "finished", "exact", "evictions", "replays", "late arrivals: 1st token s",
              "step ms", "replay step extra ms", "wall s"]  # fmt: skip
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
