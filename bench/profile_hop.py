"""Where a server hop's time goes: py-spy samples one shard-server while a client decodes through it.

One dht-node and --servers shard-servers (1 torch thread each) on loopback; after a warm-up generation,
`py-spy record` attaches to server --which and samples it (wall clock, idle samples dropped) while this
process runs --generations greedy generations of --tokens tokens. Then: the server's CPU per generated token
(from /proc, all threads, gRPC's C threads included), the sampled Python time split into coarse kinds
(model math, tensor (de)serialization, gRPC, asyncio, other server code), the top frames by self time and
the project's functions by inclusive time, all in ms per generated token. The raw stacks (collapsed format:
open them in https://www.speedscope.app or flamegraph.pl) stay in --out.

Needs py-spy in the venv (`.venv/bin/python -m pip install py-spy`) and permission to ptrace the server
(root, or kernel.yama.ptrace_scope=0).

Usage: python bench/profile_hop.py [--model small] [--generations 10] [--rate 500] [--native] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    SMALL,
    code_version,
    cpu_seconds,
    load_average,
    markdown,
    resolve_model,
    start_swarm,
    swarm_processes,
    use_threads,
)

# The first kind whose pattern appears in any frame of a stack names the stack's time.
KINDS = [
    (
        "model math (family code, torch.nn, transformers)",
        ("swarm/models/", "shard_server/decode.py", "transformers/", "torch/nn/", "torch/functional.py"),
    ),
    ("tensor (de)serialization", ("swarm/tensors.py", "google/protobuf")),
    ("gRPC (python side)", ("grpc/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py", "uvloop")),
]
OTHER = "other server code"
# Leaf frames of a thread that waits (py-spy counts a waiting thread as busy when the OS shows it runnable,
# e.g. just woken on a loaded machine; gRPC's poller thread blocks inside C code called from Thread.run).
WAITING = (
    "waiting (select, poll, locks)",
    (
        "select (selectors.py",
        "Condition.wait (",
        "Event.wait (",
        "Thread.run (threading.py",
        "_poll_wrapper",
        "Queue.get (",
        "_wait_for_tstate_lock",
    ),
)


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's collapsed stacks: `thread (tid): name;root frame;...;leaf frame count` per line."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def function(frame: str) -> str:
    """`forward (swarm/models/llama.py:88)` -> `forward (swarm/models/llama.py)`: lines merged per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else frame


def kind_of(frames: list[str]) -> str:
    if frames and any(p in frames[-1] for p in WAITING[1]):
        return WAITING[0]
    for kind, patterns in KINDS:
        if any(p in frame for frame in frames for p in patterns):
            return kind
    return OTHER


def is_project(frame: str) -> bool:
    return any(f"({pkg}/" in frame for pkg in ("shard_server", "swarm", "client_sdk"))


def summarize(stacks: list[tuple[list[str], int]], rate: float, tokens: int, top: int) -> str:
    to_ms = 1000.0 / rate / tokens  # samples -> ms per generated token
    total = sum(n for _, n in stacks)
    kinds: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        thread, body = (frames[0], frames[1:]) if frames[0].startswith("thread (") else ("?", frames)
        kinds[kind_of(body)] += n
        threads[thread.split(")", 1)[-1].lstrip(": ") or thread] += n
        if body:
            leaves[function(body[-1])] += n
        for fn in {function(f) for f in body if is_project(f)}:
            inclusive[fn] += n

    def rows(counter: collections.Counter[str], k: int) -> list[list[str]]:
        return [[f"`{name}`", f"{n * to_ms:.3f}", f"{100 * n / total:.1f} %"] for name, n in counter.most_common(k)]

    parts = [
        markdown(["kind (first match in the stack)", "ms/token", "share"], rows(kinds, len(KINDS) + 2)),
        markdown(["thread", "ms/token", "share"], rows(threads, 8)),
        markdown([f"top {top} frames by self time", "ms/token", "share"], rows(leaves, top)),
        markdown([f"top {top} project functions by inclusive time", "ms/token", "share"], rows(inclusive, top)),
    ]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMALL, help="'small' (Petals' random 8-block Llama) or a model folder")
    parser.add_argument("--servers", type=int, default=1, help="servers splitting the blocks (default: 1)")
    parser.add_argument("--which", type=int, default=0, help="index of the server to profile (default: 0)")
    parser.add_argument("--client", action="store_true", help="profile this process (the client) instead")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default: 64)")
    parser.add_argument("--generations", type=int, default=10, help="generations while sampling (default: 10)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second (default: 500)")
    parser.add_argument("--native", action="store_true", help="also sample C/C++ frames (blocks the server)")
    parser.add_argument("--top", type=int, default=15, help="rows of the frame tables (default: 15)")
    parser.add_argument("--out", default=None, help="folder for the raw stacks (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 generations of 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.generations, args.tokens = 2, 16
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: .venv/bin/python -m pip install py-spy")
    use_threads(1)
    scratch = tempfile.TemporaryDirectory(prefix="pollen-profile-")
    out = Path(args.out or scratch.name)
    out.mkdir(parents=True, exist_ok=True)
    print(f"code: {code_version()}; load average before: {load_average()}", file=sys.stderr)
    model = resolve_model(args.model, Path(scratch.name))
    prompt = list(range(100, 116))

    from client_sdk import SwarmClient

    with swarm_processes(1) as procs:
        dht, servers = start_swarm(procs, "p", model, args.servers, 1)
        server = servers[args.which]
        pid = os.getpid() if args.client else server.popen.pid
        target = "the client (this process)" if args.client else f"server {args.which} ({server.name})"
        with SwarmClient(initial_peers=[dht], model=str(model)) as client:
            client.generate(prompt, max_new_tokens=args.tokens)  # warm-up: the route, the streams, the caches
            name = "client" if args.client else f"server-{args.which}"
            raw, log = out / f"{name}.raw.txt", out / "py-spy.log"
            argv = [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "-o",
                str(raw),
                "--threads",
                "--native" if args.native else "--nonblocking",
            ]
            with open(log, "wb") as log_file:
                recorder = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
            while b"Sampling process" not in log.read_bytes():  # py-spy says so once attached
                if recorder.poll() is not None:
                    raise SystemExit(f"py-spy failed:\n{log.read_text()}")
                time.sleep(0.02)
            cpu0, t0 = cpu_seconds(pid), time.perf_counter()
            tokens = 0
            for _ in range(args.generations):
                tokens += len(client.generate(prompt, max_new_tokens=args.tokens))
            wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            recorder.wait(60)
    stacks = parse_raw(raw)
    sampled_ms = sum(n for _, n in stacks) * 1000.0 / args.rate / tokens

    print(f"\ncode: {code_version()}; load average after: {load_average()}")
    print(
        f"model {model.name}, {args.servers} server(s), profiled {target}; "
        f"{args.generations} generations x {args.tokens} tokens; py-spy at {args.rate} Hz"
        f"{' with native frames' if args.native else ''}; "
        f"{f'raw stacks: {raw}' if args.out else 'pass --out DIR to keep the raw stacks'}\n"
    )
    print(
        markdown(
            ["per generated token", "ms"],
            [
                ["wall time (client's view, whole route)", f"{1000 * wall / tokens:.3f}"],
                ["profiled process CPU, all threads (/proc)", f"{1000 * cpu / tokens:.3f}"],
                ["its Python threads busy or runnable (py-spy samples)", f"{sampled_ms:.3f}"],
            ],
        )
    )
    print()
    print(summarize(stacks, args.rate, tokens, args.top))
    if args.out is None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
