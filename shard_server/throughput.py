"""How fast this server is: measured once per model/device/dtype/blocks and cached in a JSON file.

- inference_tps: tokens/s of single-token steps of one session through the whole span (what one client sees);
- forward_tps: tokens/s of a batched Forward (what a fine-tuning client sees);
- batch_speedup: aggregate tokens/s of `BATCH_SESSIONS` sessions decoding together over one session alone,
  which decides whether cross-session batching is on (it is when > 1.1, i.e. when it is faster);
- network_tps: hidden states/s the link carries: `--network-mbps`, else the speed measured to the dht-node at
  every start (the `SpeedTest` RPC; networks change, so it is not cached), else 100 Mbit/s (Petals' fallback).
The announced throughput is min(inference_tps, network_tps).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shard_server.backend import BlockBackend, KvHandle, StepItem

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BATCH_SESSIONS = 4
DEFAULT_NETWORK_MBPS = 100.0


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pollen" / "throughput.json"


@dataclass(frozen=True)
class Throughput:
    inference_tps: float
    forward_tps: float
    batch_speedup: float
    network_tps: float

    @property
    def announced_tps(self) -> float:
        return min(self.inference_tps, self.network_tps)


def network_tps(hidden_size: int, mbps: float | None) -> float:
    """Tokens/s the link can carry one way, with 16-bit hidden states (Petals' formula)."""
    return (mbps if mbps is not None else DEFAULT_NETWORK_MBPS) * 1e6 / (hidden_size * 16)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} x{torch.get_num_threads()} threads"


def cache_key(model_hash: str, device: torch.device, dtype: str, quant: str, num_blocks: int) -> str:
    parts = (
        f"v{CACHE_VERSION}",
        model_hash,
        device_name(device),
        dtype,
        quant,
        f"{num_blocks} blocks",
        torch.__version__,
    )
    return "|".join(parts)


def load_cached(path: Path, key: str) -> Throughput | None:
    try:
        with open(path) as f:
            entry = json.load(f).get(key)
        return Throughput(**entry) if isinstance(entry, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def store_cached(path: Path, key: str, value: Throughput) -> None:
    """Merge one entry into the file under an exclusive lock (several servers may share one cache dir)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            try:
                data = json.loads(f.read() or "{}")
            except ValueError:
                data = {}
            data[key] = asdict(value)
            f.seek(0)
            f.truncate()
            json.dump(data, f, indent=1, sort_keys=True)
    except OSError as e:
        log.warning("could not write the throughput cache %s: %s", path, e)


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # not statistics.median: importing `statistics` after torch costs ~0.2 s (its `decimal` C module)
    return max(sorted(times)[len(times) // 2], 1e-9)


def measure_inference_tps(backend: BlockBackend, steps: int = 5) -> float:
    """Single-token steps of one session (batch 1) through the whole span, after warm-up."""
    kv = KvHandle(backend.blocks, batch=1, max_length=steps + 8)
    token = torch.randn(1, 1, backend.hidden_size)
    backend.step([StepItem(kv, 0, token)])  # warm-up: first calls allocate and pick kernels
    position = [1]

    def one() -> None:
        backend.step([StepItem(kv, position[0], token)])
        position[0] += 1

    return 1.0 / _median_s(one, steps)


def measure(backend: BlockBackend, forward_tokens: int, mbps: float | None) -> Throughput:
    """All compute figures for the loaded span; runs on the worker thread (about a second on small models)."""
    inference = measure_inference_tps(backend)
    blocks = backend.blocks
    hidden = torch.randn(1, forward_tokens, backend.hidden_size)
    backend.forward(blocks, hidden)  # warm-up
    forward = forward_tokens / _median_s(lambda: backend.forward(blocks, hidden), 2)

    # BATCH_SESSIONS sessions decoding together, each at position 1 of its own cache (re-written every round)
    token = torch.randn(1, 1, backend.hidden_size)
    kvs = [KvHandle(blocks, batch=1, max_length=16) for _ in range(BATCH_SESSIONS)]
    for kv in kvs:
        backend.step([StepItem(kv, 0, token)])
    batched_s = _median_s(lambda: backend.step([StepItem(kv, 1, token) for kv in kvs]), 3)
    speedup = (BATCH_SESSIONS / batched_s) / inference
    return Throughput(inference, forward, speedup, network_tps(backend.hidden_size, mbps))
