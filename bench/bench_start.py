"""How fast a shard-server starts and how much memory it takes, next to `import torch` in the same run;
and how long `from client_sdk import SwarmClient` takes.

- start -> ready: from spawning `shard-server --blocks 0:N` (all blocks, plain float32, 1 torch thread, one
  dht-node on loopback) to its ready file (polled every 5 ms). The first start in a fresh cache folder also
  measures throughput ("cold"); the --repeats starts after it find it cached ("warm"). Model files are in the
  page cache for both (the cold start's "cold" is the throughput cache only).
- RSS above weights: the server's VmRSS minus the bytes of its blocks' weights as float32 (from the
  safetensors headers), when ready and after one 64-token generation through it ("after decode": weights
  mapped from the file count in RSS only once touched; "file-backed" is the RssFile part of RSS then).
- `python -c "import torch"` and `python -c "from client_sdk import SwarmClient"`: wall time (medians), and
  the RSS of a process that only imported torch; also `import torch` with the cyclic GC paused, as the
  shard-server does while it imports.
All kinds of measurement are interleaved round by round, so a load change on the shared machine hits all.

Usage: python bench/bench_start.py [--models small,models/smollm2-135m] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    MIB,
    REPO,
    SMALL,
    block_weight_bytes,
    child_env,
    code_version,
    decode_once,
    load_average,
    markdown,
    median,
    memory,
    num_blocks,
    resolve_model,
    rss_bytes,
    swarm_processes,
    use_threads,
)

TORCH = "import torch"
TORCH_NO_GC = "import gc; gc.disable(); import torch"  # as shard-server imports (its cli.py pauses the collector)
CLIENT = "from client_sdk import SwarmClient"
# VmRSS, not ru_maxrss: the latter survives exec, so a child would report this (big) process's peak
RSS = "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024)"


def python_c(code: str, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of `python -c code` run from the repo root (this tree's packages), and its stdout."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout


def start_server(procs: Any, model: Path, dht: str, name: str) -> tuple[float, Any]:
    """Spawn a shard-server for all blocks; returns (seconds to its ready file, the Proc)."""
    t0 = time.perf_counter()
    proc = procs.start_server(model, f"0:{num_blocks(model)}", [dht], "--num-threads", "1", name=name, wait=False)
    while not (proc.ready_path.exists() and proc.ready_path.read_text().strip()):
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; log:\n{proc.log()}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    procs.wait_ready(proc)  # sets proc.address
    return elapsed, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        "--model",
        default=SMALL,
        help="comma-separated: 'small' (Petals' random 8-block Llama) and/or model folders",
    )
    parser.add_argument("--repeats", type=int, default=5, help="warm starts and imports timed (default: 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the small model, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = SMALL, 2
    from tqdm import tqdm

    use_threads(1)
    env = {**os.environ, **child_env(1)}
    scratch = tempfile.TemporaryDirectory(prefix="pollen-bench-start-")
    print(f"code: {code_version()}; load average before: {load_average()}", file=sys.stderr)
    models = [resolve_model(name, Path(scratch.name)) for name in args.models.split(",")]

    torch_s: list[float] = []
    torch_no_gc_s: list[float] = []
    client_s: list[float] = []
    starts: dict[Path, list[float]] = {m: [] for m in models}
    ready: dict[Path, list[int]] = {m: [] for m in models}  # VmRSS when ready
    decoded: dict[Path, list[dict[str, int]]] = {m: [] for m in models}  # memory() after one generation
    cold: dict[Path, float] = {}
    with swarm_processes(1) as procs:  # one workdir = one XDG_CACHE_HOME: the throughput cache persists
        dht = str(procs.start_dht().address)
        for model in models:  # cold: the first start in this cache folder measures throughput
            cold[model], proc = start_server(procs, model, dht, f"cold-{model.name}")
            procs.stop(proc)
        for round_ in tqdm(range(args.repeats), desc="rounds", leave=False):
            torch_s.append(python_c(TORCH, env)[0])
            torch_no_gc_s.append(python_c(TORCH_NO_GC, env)[0])
            client_s.append(python_c(CLIENT, env)[0])
            for model in models:
                seconds, proc = start_server(procs, model, dht, f"warm-{model.name}-{round_}")
                starts[model].append(seconds)
                ready[model].append(rss_bytes(proc.popen.pid))
                decode_once(dht, model)
                decoded[model].append(memory(proc.popen.pid))
                procs.stop(proc)
    torch_rss = int(python_c(f"import torch; {RSS}", env)[1])
    python_rss = int(python_c(RSS, env)[1])
    pulls_transformers = python_c(f"{CLIENT}; import sys; print('transformers' in sys.modules)", env)[1].strip()

    t_torch = median(torch_s)
    print(f"\ncode: {code_version()}; load average after: {load_average()}")
    print(
        f"shard-server --blocks 0:N (all blocks), float32, 1 torch thread, with a dht-node; medians of "
        f"{args.repeats} (min-max); weights = the served blocks as float32, from the safetensors headers\n"
    )
    rows = []
    for model in models:
        weights = block_weight_bytes(model, range(num_blocks(model)))
        s = starts[model]
        rows.append(
            [
                "Petals' small (random)" if model.name == "random-small" else model.name,
                f"{median(s):.2f} ({min(s):.2f}-{max(s):.2f})",
                f"{median(s) - t_torch:+.2f}",
                f"{cold[model]:.2f}",
                f"{weights / MIB:.0f}",
                f"{(median(ready[model]) - weights) / MIB:.0f}",
                f"{(median(m['VmRSS'] for m in decoded[model]) - weights) / MIB:.0f}",
                f"{median(m['RssFile'] for m in decoded[model]) / MIB:.0f}",
            ]
        )
    header = ["model", "start -> ready, warm (s)", "minus `import torch` (s)", "cold first start (s)", "weights (MiB)"]
    header += ["RSS - weights, ready (MiB)", "RSS - weights, after decode (MiB)", "of RSS: file-backed (MiB)"]
    print(markdown(header, rows))
    print()
    print(
        markdown(
            ["command", "wall time (s)", "RSS after it (MiB)"],
            [
                [
                    f'`python -c "{TORCH}"`',
                    f"{t_torch:.2f} ({min(torch_s):.2f}-{max(torch_s):.2f})",
                    f"{torch_rss / MIB:.0f} (bare python: {python_rss / MIB:.0f})",
                ],
                [
                    f'`python -c "{TORCH_NO_GC}"`',
                    f"{median(torch_no_gc_s):.2f} ({min(torch_no_gc_s):.2f}-{max(torch_no_gc_s):.2f})",
                    "",
                ],
                [
                    f'`python -c "{CLIENT}"`',
                    f"{median(client_s):.2f} ({min(client_s):.2f}-{max(client_s):.2f}), "
                    f"{median(client_s) - t_torch:+.2f} vs torch",
                    f"imports transformers: {pulls_transformers}",
                ],
            ],
        )
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
