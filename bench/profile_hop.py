"""Where a server hop's time goes: py-spy samples one shard-server while a client decodes through it.

One dht-node and --servers shard-servers (1 torch thread each) on loopback; after a warm-up generation,
`py-spy record` attaches to server --which and samples it (wall clock, idle samples dropped) while this
process runs --generations greedy generations of --tokens tokens. Then: the server's CPU per generated token
(from /proc, all threads, gRPC's C threads included), the sampled Python time split into coarse kinds
(model math, tensor (de)serialization, gRPC, asyncio, other server code), the top frames by self time and
the project's functions by inclusive time, all in ms per generated token. The raw stacks (collapsed format:
open them in https://www.speedscope.app or flamegraph.pl) stay in --out.

Needs py-spy (in the dev extras: `make install`) and permission to ptrace the server
(root, or kernel.yama.ptrace_scope=0). `--perf` adds Linux perf's on-CPU samples (no runnable bias; C, C++ and
kernel frames, no Python ones) by library and symbol; needs `perf` on PATH.

Usage: python bench/profile_hop.py [--model small] [--generations 10] [--rate 500] [--native] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
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
# Leaf frames of a thread entering or leaving a wait (gRPC's poller thread waits in C called from Thread.run):
# their CPU is the syscalls' and the wake-ups', not work.
WAITING = (
    "select, poll and lock waits (their syscalls)",
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


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """CPU ns so far of each live thread of `pid`, by thread id (py-spy labels threads `thread (<tid>)`)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass  # the thread just ended
    return out


def split_thread(frames: list[str]) -> tuple[str, str, list[str]]:
    """`thread (<tid>): name;frames...` -> (tid, name, frames)."""
    if frames and frames[0].startswith("thread ("):
        tid, _, name = frames[0].removeprefix("thread (").partition(")")
        return tid, name.lstrip(": "), frames[1:]
    return "?", "?", frames


def summarize(stacks: list[tuple[list[str], int]], rate: float, tokens: int, top: int, cpu_ns: dict[str, int]) -> str:
    """Tables in CPU ms per generated token: each thread's samples are scaled to that thread's CPU time.

    py-spy counts a thread as busy while the OS shows it runnable, also when it waits for a core (on a
    loaded machine, up to several times its CPU time); scaling per thread keeps the split of each thread's
    samples over frames but makes the totals the CPU it really used. Frames where a thread tends to be
    preempted (just after waking another thread: `_write_to_self`, which costs ~8 us of CPU per call) still
    get more than their share on a loaded machine: profile on an idle one for a clean split.
    """
    names: dict[str, str] = {}
    samples: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        tid, name, _ = split_thread(frames)
        names[tid] = name
        samples[tid] += n
    cpu_ms = {tid: ns / 1e6 / tokens for tid, ns in cpu_ns.items()}
    ms_per_sample = {tid: cpu_ms.get(tid, 0.0) / n for tid, n in samples.items() if n}
    total = sum(cpu_ms.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    leaves: dict[str, float] = collections.defaultdict(float)
    inclusive: dict[str, float] = collections.defaultdict(float)
    for frames, n in stacks:
        tid, _, body = split_thread(frames)
        ms = n * ms_per_sample.get(tid, 0.0)
        kinds[kind_of(body)] += ms
        if body:
            leaves[function(body[-1])] += ms
        for fn in {function(f) for f in body if is_project(f)}:
            inclusive[fn] += ms
    kinds["threads without Python frames (gRPC core, OpenMP, ...)"] = sum(
        ms for tid, ms in cpu_ms.items() if tid not in samples
    )

    def rows(ms_by_name: dict[str, float], k: int) -> list[list[str]]:
        top_k = sorted(ms_by_name.items(), key=lambda item: -item[1])[:k]
        return [[f"`{name}`", f"{ms:.3f}", f"{100 * ms / total:.1f} %"] for name, ms in top_k]

    sampled_ms = 1000.0 / rate / tokens
    threads = [
        [f"{tid} `{names.get(tid, '(no Python frames)')}`", f"{ms:.3f}", f"{samples[tid] * sampled_ms:.3f}"]
        for tid, ms in sorted(cpu_ms.items(), key=lambda item: -item[1])
        if ms >= 0.001 or samples[tid]
    ]
    parts = [
        markdown(["thread", "CPU ms/token (/proc)", "py-spy busy-or-runnable ms/token"], threads),
        markdown(["kind (first match in the stack)", "CPU ms/token", "share"], rows(kinds, len(KINDS) + 3)),
        markdown([f"top {top} frames by self time", "CPU ms/token", "share"], rows(leaves, top)),
        markdown([f"top {top} project functions, inclusive", "CPU ms/token", "share"], rows(inclusive, top)),
    ]
    return "\n\n".join(parts)


def perf_tables(data: Path, tokens: int, top: int) -> str:
    """`perf report` of on-CPU samples (cpu-clock: no runnable bias; C, C++ and kernel frames) by library
    and by symbol, in CPU ms per generated token."""

    def report(sort: str) -> tuple[float, list[tuple[float, str]]]:
        argv = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "--sort", sort]
        text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        count = re.search(r"Event count \(approx\.\): (\d+)", text)
        rows = []
        for line in text.splitlines():
            match = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
            if match:
                rows.append((float(match.group(1)), match.group(2)))
        return (int(count.group(1)) if count else 0) / 1e6 / tokens, rows  # cpu-clock counts ns

    total, by_dso = report("dso")
    _, by_sym = report("sym")

    def rows(items: list[tuple[float, str]]) -> list[list[str]]:
        return [[f"`{name[:100]}`", f"{pct * total / 100:.3f}", f"{pct:.1f} %"] for pct, name in items[:top]]

    return "\n\n".join(
        [
            f"perf, on-CPU samples: {total:.3f} CPU ms/token",
            markdown(["library (perf)", "CPU ms/token", "share"], rows(by_dso)),
            markdown([f"top {top} symbols (perf; [k] = kernel)", "CPU ms/token", "share"], rows(by_sym)),
        ]
    )


def start_perf(pid: int, data: Path) -> subprocess.Popen[bytes]:
    argv = ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-o", str(data), "-p", str(pid)]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not data.exists():  # perf writes the file's header once attached
        if recorder.poll() is not None:
            raise SystemExit(f"perf failed: {recorder.stderr.read().decode() if recorder.stderr else ''}")
        time.sleep(0.02)
    return recorder


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
    parser.add_argument("--perf", action="store_true", help="also record with Linux perf (on-CPU, native, kernel)")
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
            perf = start_perf(pid, out / f"{name}.perf.data") if args.perf else None
            threads0, cpu0, t0 = thread_cpu_ns(pid), cpu_seconds(pid), time.perf_counter()
            tokens = 0
            for _ in range(args.generations):
                tokens += len(client.generate(prompt, max_new_tokens=args.tokens))
            wall, cpu, threads1 = time.perf_counter() - t0, cpu_seconds(pid) - cpu0, thread_cpu_ns(pid)
            for tool in (recorder, perf):
                if tool is not None:
                    tool.send_signal(signal.SIGINT)  # both write their files on Ctrl-C
                    tool.wait(60)
    stacks = parse_raw(raw)
    if os.getloadavg()[0] > 1.5:
        print("note: the machine is busy (load average above 1.5): frames just after a wake-up are over-weighted")

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
            ],
        )
    )
    print()
    cpu_ns = {tid: ns - threads0.get(tid, 0) for tid, ns in threads1.items()}
    print(summarize(stacks, args.rate, tokens, args.top, cpu_ns))
    if args.perf:
        print()
        print(perf_tables(out / f"{name}.perf.data", tokens, args.top))
    if args.out is None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
