"""Pause and resume under load (issue 14 part 1): how fast a paused server lets its clients go, how fast they
go on elsewhere, and how fast it comes back.

Swarm: a dht-node and two shard-servers P and Q holding the same blocks of a tiny random Llama (4 blocks,
hidden 768 as tests/e2e/test_pause.py), each with an admin socket. Per run: Q is paused (idle), so that
`--clients` clients all open their greedy generation on P; once each has `--warmup` tokens, Q resumes and P is
paused through its admin socket with grace 0 (its sessions are closed at once; clients fail over to Q). Each
client stops `--after` tokens after its move; then P resumes. Reported, median and range over `--repeats` runs:
- sessions open on P at the pause, and the Pause call's own duration (the server's measure: it returns once
  the sessions are gone and PAUSED is announced);
- pause -> last session gone from P (server's measure);
- pause -> each moved client's first token from Q (client's clock: the first token after its failover), for
  the median client and the last one ("every client moved");
- resume -> ONLINE announced (server's measure), and a plain step's ms for scale;
- exact: every client's tokens equal local transformers greedy (EOS kept out as min_new_tokens), every run.

Usage: python bench/bench_pause.py [--repeats 5] [--clients 4] [--grace 0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import child_env, code_version, load_average, markdown, use_threads  # noqa: E402

HIDDEN = 768
NUM_BLOCKS = 4
PROMPT_LEN = 8
MAX_NEW = 240  # room for the warm-up, the move and `--after` tokens; clients stop early
SERVER_FLAGS = ("--num-threads", "1", "--throughput", "100", "--network-mbps", "1000")


@dataclass
class Client:
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # perf_counter of each token
    moved_at: int | None = None  # index of the first token after the session's failover
    paused_at: int | None = None  # index of the first token seen after the pause call returned
    started: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Run:
    sessions_on_p: int
    sessions_closed: int
    pause_call_ms: float
    sessions_gone_ms: float
    moved: int  # clients that failed over
    first_token_ms: list[float]  # per moved client: pause call -> its first token from Q
    step_ms: float  # median gap between tokens before the pause
    resume_ms: float
    exact: bool


def prompts(n: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(14)
    return [torch.randint(3, 128, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]


def reference(model: Path, all_prompts: list[list[int]]) -> list[list[int]]:
    from tests.reference import greedy_references

    return greedy_references(model, all_prompts, MAX_NEW)


async def admin(sock: Path, call: str, **kw: float) -> Any:
    """One call to a shard-server's admin socket (Pause, Resume, Status) -> its AdminStatus."""
    import grpc

    from swarm.pb import admin_pb2, admin_pb2_grpc

    request = {"Pause": admin_pb2.PauseRequest, "Resume": admin_pb2.ResumeRequest, "Status": admin_pb2.StatusRequest}
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        return await getattr(admin_pb2_grpc.AdminStub(channel), call)(request[call](**kw), timeout=120)


async def run_once(dht: str, model: Path, socks: list[Path], args: argparse.Namespace,
                   all_prompts: list[list[int]], expected: list[list[int]]) -> Run:  # fmt: skip
    from client_sdk import AsyncSwarmClient

    p_sock, q_sock = socks
    await admin(q_sock, "Pause", grace_s=0.0)  # idle: every session opens on P
    clients = [Client() for _ in all_prompts]
    paused = asyncio.Event()

    async def generate(c: Client, prompt: list[int]) -> None:
        async with AsyncSwarmClient([dht], model, refresh_period_s=0) as client:
            agen = client.stream(prompt, MAX_NEW, min_new_tokens=MAX_NEW)
            async for token in agen:
                c.tokens.append(int(token))
                c.stamps.append(time.perf_counter())
                session = client.active_session
                if c.moved_at is None and session is not None and session.failovers:
                    c.moved_at = len(c.tokens) - 1
                if len(c.tokens) == args.warmup:
                    c.started.set()
                if c.paused_at is None and paused.is_set():
                    c.paused_at = len(c.tokens) - 1
                # `after` tokens from Q (a client that never moves stops `after` tokens after the pause)
                anchor = c.moved_at if c.moved_at is not None else c.paused_at
                if anchor is not None and len(c.tokens) - anchor >= args.after:
                    await agen.aclose()
                    return

    tasks = [asyncio.create_task(generate(c, p)) for c, p in zip(clients, all_prompts, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.started.wait() for c in clients)), 300)
        await admin(q_sock, "Resume")  # ONLINE announced when the call returns: failovers can route to Q
        status = await admin(p_sock, "Status")
        t_pause = time.perf_counter()
        res = await admin(p_sock, "Pause", grace_s=args.grace)
        paused.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
    finally:
        for t in tasks:
            t.cancel()
    resumed = await admin(p_sock, "Resume")
    first = [1000 * (c.stamps[c.moved_at] - t_pause) for c in clients if c.moved_at is not None]
    gaps = [b - a for c in clients for a, b in zip(c.stamps[1 : args.warmup], c.stamps[2 : args.warmup])]
    exact = all(c.tokens == e[: len(c.tokens)] for c, e in zip(clients, expected, strict=True))
    return Run(
        sessions_on_p=int(status.active_sessions),
        sessions_closed=int(res.sessions_closed),
        pause_call_ms=float(res.transition_ms),
        sessions_gone_ms=float(res.sessions_gone_ms),
        moved=len(first),
        first_token_ms=first,
        step_ms=1000 * statistics.median(gaps) if gaps else float("nan"),
        resume_ms=float(resumed.transition_ms),
        exact=exact,
    )


def spread(values: list[float]) -> list[str]:
    return [f"{statistics.median(values):.0f}", f"{min(values):.0f} - {max(values):.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="pause/resume cycles (default 5)")
    ap.add_argument("--clients", type=int, default=4, help="clients generating through the paused server (4)")
    ap.add_argument("--grace", type=float, default=0.0, help="grace period of the pause, seconds (default 0)")
    ap.add_argument("--warmup", type=int, default=5, help="tokens each client has before the pause (default 5)")
    ap.add_argument("--after", type=int, default=5, help="tokens each client makes after its move (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, 2 clients")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.clients = 2, 2
    if args.warmup < 3 or args.after < 1 or args.warmup + args.after + 20 > MAX_NEW:
        raise SystemExit(f"--warmup >= 3, --after >= 1, and together well under {MAX_NEW}")
    use_threads(args.threads)
    logging.getLogger("client_sdk").setLevel(logging.ERROR)  # one failover warning per client per run: expected
    from tests.launcher import SwarmProcesses
    from tests.models import make_tiny_model

    load_before = load_average()
    model = make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="pollen-pause-")) / "tiny", NUM_BLOCKS,
                            hidden_size=HIDDEN)  # fmt: skip
    all_prompts = prompts(args.clients)
    expected = reference(model, all_prompts)
    runs: list[Run] = []
    with SwarmProcesses(env=child_env(args.threads)) as procs:
        dht = procs.start_dht()
        socks = [procs.workdir / f"admin-{name}.sock" for name in ("p", "q")]
        servers = [
            procs.start_server(
                model,
                f"0:{NUM_BLOCKS}",
                [dht.address],
                *SERVER_FLAGS,
                "--admin-socket",
                str(sock),
                name=f"server-{name}",
                wait=False,
            )  # fmt: skip
            for sock, name in zip(socks, ("p", "q"), strict=True)
        ]
        for s in servers:
            procs.wait_ready(s)
        for i in range(args.repeats):
            run = asyncio.run(run_once(dht.address, model, socks, args, all_prompts, expected))
            print(f"run {i + 1}: {run.sessions_on_p} on P, {run.moved} moved, first tokens from Q at "
                  f"{[round(x) for x in run.first_token_ms]} ms, exact {run.exact}", flush=True)  # fmt: skip
            runs.append(run)
    moved_all = [max(r.first_token_ms) for r in runs if r.first_token_ms]
    moved_median = [statistics.median(r.first_token_ms) for r in runs if r.first_token_ms]
    rows = [
        ["sessions on P at the pause", *spread([r.sessions_on_p for r in runs])],
        ["  of them closed by the pause (the rest had ended)", *spread([r.sessions_closed for r in runs])],
        ["clients moved to Q", *spread([r.moved for r in runs])],
        ["Pause call, ms (server)", *spread([r.pause_call_ms for r in runs])],
        ["pause -> last session gone from P, ms (server)", *spread([r.sessions_gone_ms for r in runs])],
        ["pause -> median client's next token from Q, ms", *(spread(moved_median) if moved_median else ["-", "-"])],
        ["pause -> every client's next token from Q, ms", *(spread(moved_all) if moved_all else ["-", "-"])],
        ["resume -> ONLINE announced, ms (server)", *spread([r.resume_ms for r in runs])],
        ["a plain step before the pause, ms", *spread([r.step_ms for r in runs])],
    ]
    exact = all(r.exact for r in runs)
    print(f"\n{args.clients} greedy clients on P (2 servers with blocks 0:{NUM_BLOCKS} of a random Llama, hidden "
          f"{HIDDEN}), pause with grace {args.grace:g} s; {args.repeats} runs; tokens equal transformers greedy in "
          f"every run: {'yes' if exact else 'NO'}")  # fmt: skip
    print(f"code {code_version()}; load average {load_before} before, {load_average()} after; "
          f"{args.threads} torch thread(s) per process")  # fmt: skip
    print(markdown(["", "median", "range"], rows))
    if not exact:
        raise SystemExit("some client's tokens differ from transformers greedy")


if __name__ == "__main__":
    main()
