"""One shard server under concurrent generating clients: aggregate decode tokens/s for 1, 4, 8 and 16 sessions,
with cross-session batching on and off; plus start-to-ready time and memory over the weights.

Method: one `shard-server` process holds every block of the model (--threads torch threads). Each client opens
an inference session, prefills PROMPT_LEN positions, then runs NEW_TOKENS single-token decode steps, all clients
at once; aggregate tokens/s = clients x NEW_TOKENS / wall time of the decode phase (median of --repeats). Clients
send synthetic hidden states (the server's work per step is exactly that of real generation; leaving the
client's LM head out keeps the measurement on the server on a 2-core machine). Start-to-ready is measured on a
second start, when the throughput measurement is cached and the model files are in the page cache.

Usage: python bench/bench_server.py --model models/smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.launcher

from tests.launcher import BIN, SwarmProcesses  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 16, 32


async def client(address: str, hidden_size: int, model_id: str, num_blocks: int, start: asyncio.Event) -> float:
    """One generating session; returns the time its decode phase took."""
    import grpc
    import torch

    from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
    from swarm.tensors import from_proto, to_proto

    async with grpc.aio.insecure_channel(address) as channel:
        call = shard_pb2_grpc.ShardStub(channel).InferenceStep()
        blocks = common_pb2.BlockRange(start=0, end=num_blocks)
        opened = shard_pb2.InferenceOpen(model_id=model_id, blocks=blocks, max_length=PROMPT_LEN + NEW_TOKENS + 1,
                                         session_id=uuid.uuid4().hex)  # fmt: skip
        await call.write(shard_pb2.InferenceRequest(open=opened))
        await call.read()
        position = 0

        async def step(hidden: torch.Tensor) -> torch.Tensor:
            nonlocal position
            msg = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=to_proto(hidden))
            await call.write(shard_pb2.InferenceRequest(step=msg))
            reply = await call.read()
            position += hidden.shape[1]
            return from_proto(reply.step.hidden)

        await step(torch.randn(1, PROMPT_LEN, hidden_size))
        await start.wait()
        t0 = time.perf_counter()
        token = torch.randn(1, 1, hidden_size)
        for _ in range(NEW_TOKENS):
            out = await step(token)
            token = out / (out.norm() + 1e-6)  # feed something that depends on the reply, like generation does
        elapsed = time.perf_counter() - t0
        await call.done_writing()
        await call.code()
        return elapsed


async def aggregate_tps(address: str, hidden: int, model_id: str, blocks: int, n: int) -> float:
    start = asyncio.Event()
    tasks = [asyncio.create_task(client(address, hidden, model_id, blocks, start)) for _ in range(n)]
    await asyncio.sleep(0.2 + 0.05 * n)  # all sessions opened and prefilled before the clock starts
    start.set()
    times = await asyncio.gather(*tasks)
    return n * NEW_TOKENS / max(times)


def start_server(procs: SwarmProcesses, name: str, model: Path, args: argparse.Namespace, *extra: str):  # type: ignore[no-untyped-def]
    argv = [str(BIN / "shard-server"), "--model", str(model), "--model-id", "bench", "--num-threads",
            str(args.threads), "--throughput-cache", str(args.workdir / "throughput.json"), "--cache-tokens", "8192",
            "--inference-max-length", "1024", *extra]  # fmt: skip
    t0 = time.monotonic()
    proc = procs._spawn(name, argv)
    procs.wait_ready(proc)
    return proc, time.monotonic() - t0


def startup_line(log: str) -> str:
    """The server's own start-to-ready figure and the part after imports (first log line to ready)."""
    first = re.search(r"^(\d\d):(\d\d):(\d\d\.\d+) ", log, re.M)
    ready = re.search(r"^(\d\d):(\d\d):(\d\d\.\d+) .*ready ([\d.]+) s after the process started", log, re.M)
    if not first or not ready:
        return "(no start-up figures)"
    t0, t1 = (int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) for m in (first, ready))
    return f"ready {ready[4]} s after process start, {t1 - t0:.2f} s of it after the imports"


def memory_line(log: str) -> str:
    match = re.search(r"memory: RSS .*", log)
    return match.group(0) if match else "(no memory line)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/smollm2-135m"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.workdir = Path(tempfile.mkdtemp(prefix="pollen-bench-server-"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    hidden, blocks = int(config.hidden_size), int(config.num_hidden_layers)
    counts = [int(c) for c in args.clients.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    with SwarmProcesses() as procs:
        warm, first_s = start_server(procs, "warmup", args.model, args)  # measures throughput and caches it
        print(next(x for x in warm.log().splitlines() if "measured:" in x), flush=True)
        procs.stop(warm)
        ready: list[float] = []
        for batching in ("on", "off"):
            proc, ready_s = start_server(procs, f"server-{batching}", args.model, args, "--batching", batching)
            ready.append(ready_s)
            for n in counts:
                asyncio.run(aggregate_tps(proc.address, hidden, "bench", blocks, n))  # warm-up
                results[(batching, n)] = [
                    asyncio.run(aggregate_tps(proc.address, hidden, "bench", blocks, n)) for _ in range(args.repeats)
                ]
                print(f"batching {batching:3} clients {n:2}: " + ", ".join(f"{x:.1f}" for x in results[(batching, n)]),
                      flush=True)  # fmt: skip
            mem = memory_line(proc.log())
            print(f"batching {batching}: {startup_line(proc.log())}", flush=True)
            procs.stop(proc)
    print(f"\nmodel {args.model} ({blocks} blocks, hidden {hidden}), server --num-threads {args.threads}, "
          f"{PROMPT_LEN}-token prefill, {NEW_TOKENS} decode steps per client, median of {args.repeats}")  # fmt: skip
    print("| clients | batching on (tok/s) | batching off (tok/s) | on / off |")
    print("|---|---|---|---|")
    for n in counts:
        on, off = statistics.median(results[("on", n)]), statistics.median(results[("off", n)])
        print(f"| {n} | {on:.1f} | {off:.1f} | {on / off:.2f}x |")
    one = statistics.median(results[("on", counts[0])])
    for n in counts:
        print(f"aggregate with {n} sessions / 1 session (batching on): "
              f"{statistics.median(results[('on', n)]) / one:.2f}x")  # fmt: skip
    print(
        f"start to ready: first start (measures throughput) {first_s:.2f} s; cached starts "
        + ", ".join(f"{r:.2f} s" for r in ready)
        + " (process spawn, imports and loading included)"
    )
    print(mem)


if __name__ == "__main__":
    main()
