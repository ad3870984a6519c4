"""The start-up steps of a shard server that are not about its lifecycle: which device, how many blocks fit,
the KV budget, the link speed and throughput to announce (cached or measured) and what memory the blocks took. Each is a
function of explicit inputs; `ShardServer.start` (server.py) calls them in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from shard_server import memory, throughput
from shard_server.backend import BlockBackend
from shard_server.config import ShardServerConfig
from shard_server.loader import ModelInfo
from swarm.dht_client import DhtClient
from swarm.errors import PollenError

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARD_MEASURE_TOKENS = 128  # batch of the forward-throughput measurement (kept small: it delays `ready`)

# How a start-up step runs torch work: on the server's worker thread (Scheduler.run)
RunOnWorker = Callable[..., Awaitable[Any]]


class ConfigError(ValueError):
    """The configuration cannot work on this machine (e.g. a CUDA device without CUDA)."""


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def blocks_that_fit(cfg: ShardServerConfig, info: ModelInfo, device: torch.device, dtype: torch.dtype) -> int:
    """--num-blocks, or as many blocks as fit the memory free now with some cache tokens each."""
    total = info.family.num_blocks
    if cfg.num_blocks is not None:
        return max(1, min(cfg.num_blocks, total))
    block_bytes = memory.block_bytes(info, cfg.dtype, cfg.quant)
    kv = info.family.kv_bytes_per_token(dtype.itemsize)
    free = memory.free_memory_bytes(device)
    activations = memory.activation_model(info.family, dtype)
    n = memory.plan_num_blocks(free, block_bytes, kv, total, activations)
    log.info("%d of %d blocks fit: %.2f GiB free, %.3f GiB per block + %d cache tokens each + a Backward of %d "
             "tokens", n, total, free / memory.GIB, block_bytes / memory.GIB, memory.PLAN_CACHE_TOKENS,
             memory.DEFAULT_BACKWARD_TOKENS)  # fmt: skip
    return n


def backward_limits(cfg: ShardServerConfig, backend: BlockBackend) -> tuple[int, int]:
    """(activation budget bytes, max tokens per Backward); the backend learns to estimate its activations."""
    activations = memory.activation_model(backend.span.family, backend.dtype)
    budget = memory.default_activation_bytes(memory.free_memory_bytes(backend.device))
    backend.estimate_activations = activations.bytes
    backend.activation_budget_bytes = budget
    cap = min(cfg.max_batch_size, memory.DEFAULT_BACKWARD_TOKENS)
    tokens = cfg.max_backward_tokens or activations.max_tokens(budget, len(backend.blocks), cap)
    return budget, tokens


def cache_budget_bytes(cfg: ShardServerConfig, per_token_block: int, held_blocks: int, device: torch.device) -> int:
    """The KV budget from --cache-bytes / --cache-tokens, or a share of the memory free once the weights are in."""
    if cfg.cache_bytes is not None:
        return cfg.cache_bytes
    if cfg.cache_tokens is not None:
        return cfg.cache_tokens * per_token_block * held_blocks
    return memory.default_cache_bytes(memory.free_memory_bytes(device))


def throughput_cache_path(cfg: ShardServerConfig) -> Path:
    return Path(cfg.throughput_cache) if cfg.throughput_cache else throughput.default_cache_path()


def cached_throughput(
    cfg: ShardServerConfig, model_hash: str, device: torch.device, num_blocks: int
) -> throughput.Throughput | None:
    key = throughput.cache_key(model_hash, device, cfg.dtype, cfg.quant, num_blocks)
    return throughput.load_cached(throughput_cache_path(cfg), key)


async def measure_throughput(
    cfg: ShardServerConfig,
    backend: BlockBackend,
    model_hash: str,
    network_mbps: float | None,
    run_on_worker: RunOnWorker,
) -> throughput.Throughput:
    """--throughput, else the cache file's entry, else a measurement on the worker (then cached)."""
    network = throughput.network_tps(backend.hidden_size, network_mbps)
    if cfg.throughput_tps is not None:
        # No measurement: batched steps have been faster on every device we measured (decode is weight-bound).
        return throughput.Throughput(cfg.throughput_tps, 0.0, 2.0, network)
    path = throughput_cache_path(cfg)
    key = throughput.cache_key(model_hash, backend.device, cfg.dtype, cfg.quant, len(backend.blocks))
    tp = throughput.load_cached(path, key)
    if tp is None:
        tokens = min(cfg.max_batch_size, FORWARD_MEASURE_TOKENS)
        tp = await run_on_worker(throughput.measure, backend, tokens, network_mbps)
        throughput.store_cached(path, key, tp)
        log.info("measured: %.1f tokens/s inference, %.0f tokens/s forward, batched steps x%.2f (cached in %s)",
                 tp.inference_tps, tp.forward_tps, tp.batch_speedup, path)  # fmt: skip
    return throughput.Throughput(tp.inference_tps, tp.forward_tps, tp.batch_speedup, network)


async def measure_network(dht: DhtClient | None) -> float | None:
    """Mbit/s to our dht-node (the swarm's entry point), or None (the 100 Mbit/s default) without one."""
    if dht is None:
        return None
    try:
        mbps = await dht.measure_mbps()
    except PollenError as e:
        log.warning("network speed test failed (%s); announcing the default link speed", e)
        return None
    log.info("network speed to the DHT: %.0f Mbit/s", mbps)
    return mbps


def memory_report(backend: BlockBackend, rss_before: int) -> dict[str, int]:
    weights = sum(t.numel() * t.element_size() for t in backend.span.parameters())
    rss = memory.rss_bytes()
    log.info("memory: RSS %.0f MiB = %.0f MiB before loading + %.0f MiB weights + %.0f MiB other", rss / 2**20,
             rss_before / 2**20, weights / 2**20, (rss - rss_before - weights) / 2**20)  # fmt: skip
    return {"rss_bytes": rss, "rss_before_load_bytes": rss_before, "weights_bytes": weights}


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0.0 elsewhere), for the start-to-ready figure."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
