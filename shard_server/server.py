"""ShardServer: the composition root and lifecycle of one shard server process (or one in-process test server).

start():  check model → choose blocks (pinned, or from the swarm's records) → bind gRPC (health NOT_SERVING)
          → load blocks on the worker → measure KV bytes/token, size the cache budget → throughput (cached file
          or measured) → announce ONLINE (first store must succeed) → health SERVING → background loops
          (announce, idle sessions, rebalancing, peer RTTs) and the /metrics endpoint.
move_to(): see rebalancer.py.
stop():   health NOT_SERVING → refuse new sessions → announce OFFLINE while running sessions drain
          (bounded) → stop gRPC → close the DHT client → stop the worker thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import swarm
from shard_server import memory, throughput
from shard_server.announcer import Announcer
from shard_server.backend import BlockBackend
from shard_server.block_selection import choose_blocks
from shard_server.cache import SessionCache
from shard_server.config import ShardServerConfig
from shard_server.kv_cache import kv_bytes_per_token_estimate
from shard_server.loader import ModelInfo, inspect_model, load_span
from shard_server.metrics import MetricsEndpoint, ServerMetrics, process_age_s, register_server_gauges
from shard_server.peer_rtt import PeerRtts
from shard_server.rebalancer import Rebalancer, fetch_records
from shard_server.scheduler import Scheduler
from shard_server.servicer import ShardServicer
from swarm.aio import TaskSet, install_signal_handlers, write_ready_file
from swarm.blocks import BlockRange
from swarm.dht_client import DhtClient, parse_peers
from swarm.errors import PollenError
from swarm.identity import Identity
from swarm.model_files import config_fingerprint, default_model_id
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.tensors import dtype_from_name

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_SERVICE = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name  # "pollen.v1.Shard"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
FORWARD_MEASURE_TOKENS = 128  # batch of the forward-throughput measurement (kept small: it delays `ready`)


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


class ShardServer:
    def __init__(self, config: ShardServerConfig) -> None:
        cfg = self.config = config
        # Signed announcements: the peer id is the identity's, so only this key pair can replace or retract
        # them. Without --identity the key pair is ephemeral (a restart is a new peer; old records expire).
        self.identity = Identity.load_or_create(cfg.identity_path) if cfg.identity_path else Identity.generate()
        self.peer_id = self.identity.peer_id
        self.model_id = cfg.model_id or default_model_id(cfg.model)
        self.state = ServerState.JOINING
        self.port = 0
        self.blocks: BlockRange | None = cfg.blocks  # the range served now (rebalancing changes it)
        self.throughput: throughput.Throughput | None = None
        self.throughput_tps = 0.0
        self.memory_report: dict[str, int] = {}  # rss / weights bytes, filled once loaded
        self.metrics = ServerMetrics()
        self.cache = SessionCache(max_sessions=cfg.max_sessions, alloc_timeout_s=cfg.alloc_timeout_s)
        # All torch work runs on the scheduler's one worker thread: the event loop never blocks on compute and
        # the model needs no locks.
        self.scheduler = Scheduler(
            cfg.max_batch_size, cfg.batching != "off", cfg.max_queued_requests, on_batch=self.metrics.batch
        )
        self.servicer: ShardServicer | None = None  # exists from start(); its backend once blocks are loaded
        self._tasks = TaskSet()
        self._announce_task: asyncio.Task[Any] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._dht: DhtClient | None = None
        self._announcer: Announcer | None = None
        self._peer_rtts: PeerRtts | None = None  # RTTs to the servers after ours, announced for routing
        self._metrics_http: MetricsEndpoint | None = None
        self._info: ModelInfo | None = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._model_hash = ""
        self._stopped = False
        register_server_gauges(self.metrics, self)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        return self._metrics_http.port if self._metrics_http is not None else 0

    @property
    def record(self) -> ServerRecord | None:
        """The last record announced (or, standalone, built); None until the server is ready."""
        return self._announcer.record if self._announcer is not None else None

    def live_record(self) -> ServerRecord | None:
        """The announcement with this moment's load figures (for Info); None until the server is ready."""
        return self._make_record(self.state) if self._announcer is not None else None

    async def run_on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.scheduler.run(fn, *args)

    async def start(self) -> None:
        cfg = self.config
        # Cheap checks first, so a wrong path or range fails before any port is bound or weight is read.
        info = self._info = inspect_model(cfg.model, cfg.blocks or BlockRange(0, 1))
        device = self._device = resolve_device(cfg.device)
        try:
            self._dtype = dtype_from_name(cfg.dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        peers = parse_peers(",".join(cfg.initial_peers))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self._model_hash = config_fingerprint(info.path)
        try:
            if peers:
                self._dht = DhtClient(peers)
            else:
                log.warning("no --initial-peers: running standalone, this server is NOT announced to any DHT")
            blocks = self.blocks = await self._choose_blocks(info, device)
            servicer = self.servicer = ShardServicer(
                model_id=self.model_id,
                blocks=blocks,
                cache=self.cache,
                scheduler=self.scheduler,
                record=self.live_record,
                inference_max_length=cfg.inference_max_length,
                max_batch_tokens=cfg.max_batch_size,
                metrics=self.metrics,
            )
            await self._start_grpc(servicer)
            if cfg.metrics_port is not None:
                self._metrics_http = MetricsEndpoint(self.metrics, cfg.host, cfg.metrics_port)
                await self._metrics_http.start()
            rss_before = memory.rss_bytes()
            backend = await self._load(blocks)
            await self._size_cache(backend)
            await self._measure(backend)
            self._report_memory(backend, rss_before)
            servicer.backend = backend
            self.state = ServerState.ONLINE

            self._announcer = Announcer(
                self._dht, self.model_id, blocks, self.peer_id, self._make_record, cfg.ttl_s, cfg.announce_every_s,
                identity=self.identity,
                model_info=ModelRecord(model_id=self.model_id, name=info.family.name,
                                       num_blocks=info.family.num_blocks, model_hash=self._model_hash),
            )  # fmt: skip
            await self._announcer.announce_until_stored(ServerState.ONLINE, timeout_s=max(10.0, cfg.ttl_s))
            self._start_announce_loop()
            self._tasks.spawn(self._run_idle_loop(), name="idle-session-loop")
            if self._dht is not None:
                self._peer_rtts = PeerRtts(self._dht, self.model_id, blocks, self.peer_id)
                self._tasks.spawn(self._peer_rtts._run_measure_loop(cfg.announce_every_s), name="peer-rtt-loop")
                if cfg.blocks is None and cfg.balance_period_s > 0:
                    rebalancer = Rebalancer(
                        self, self._dht, info.family.num_blocks, cfg.balance_period_s, cfg.balance_quality
                    )
                    self._tasks.spawn(rebalancer._run_balance_loop(), name="balance-loop")
            await self._set_health(serving=True)
        except BaseException:
            await self.stop()
            raise
        log.info("serving model %s blocks %s at %s as peer %s", self.model_id, blocks, self.address, self.peer_id)

    # ---- start-up steps ---------------------------------------------------------------------------------

    async def _choose_blocks(self, info: ModelInfo, device: torch.device) -> BlockRange:
        cfg = self.config
        if cfg.blocks is not None:
            return cfg.blocks
        total = info.family.num_blocks
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            block_bytes = memory.block_bytes(info, cfg.dtype, cfg.quant)
            kv = kv_bytes_per_token_estimate(info.config, self._dtype.itemsize)
            free = memory.free_memory_bytes(device)
            num_blocks = memory.plan_num_blocks(free, block_bytes, kv, total)
            log.info("%d of %d blocks fit: %.2f GiB free, %.3f GiB per block + %d cache tokens each", num_blocks,
                     total, free / memory.GIB, block_bytes / memory.GIB, memory.PLAN_CACHE_TOKENS)  # fmt: skip
        records = await fetch_records(self._dht, self.model_id, total) if self._dht is not None else []
        cached = self._cached_throughput(max(1, min(num_blocks, total)))
        blocks = choose_blocks(records, num_blocks, total, cached.announced_tps if cached else 1.0)
        log.info("chose blocks %s of %d (%d servers announced)", blocks, total, len({r.peer_id for r in records}))
        return blocks

    async def _load(self, blocks: BlockRange) -> BlockBackend:
        cfg, info = self.config, self._info
        assert info is not None
        t0 = time.perf_counter()
        device, dtype = self._device, self._dtype
        span = await self.run_on_worker(
            lambda: load_span(info, blocks, device, dtype, quant=cfg.quant, int8_threshold=cfg.int8_threshold)
        )
        log.info("loaded blocks %s of %s in %.2f s", blocks, info.path, time.perf_counter() - t0)
        return BlockBackend(info, span, self._device, self._dtype)

    async def _size_cache(self, backend: BlockBackend) -> None:
        """The KV budget in bytes from the flags, or from the memory free now that the weights are loaded."""
        cfg = self.config
        per_token_block = await self.run_on_worker(backend.measure_kv_bytes_per_token)  # also a warm-up
        held = len(backend.blocks)
        if cfg.cache_bytes is not None:
            budget = cfg.cache_bytes
        elif cfg.cache_tokens is not None:
            budget = cfg.cache_tokens * per_token_block * held
        else:
            budget = memory.default_cache_bytes(memory.free_memory_bytes(self._device))
        self.cache.set_budget(budget, per_token_block, held)
        log.info("KV cache budget %.1f MiB = %d tokens through %d blocks (%d bytes per token per block)",
                 budget / 2**20, self.cache.budget_tokens, held, per_token_block)  # fmt: skip

    def _cached_throughput(self, num_blocks: int) -> throughput.Throughput | None:
        path = throughput.default_cache_path() if self.config.throughput_cache is None else self.config.throughput_cache
        key = throughput.cache_key(self._model_hash, self._device, self.config.dtype, self.config.quant, num_blocks)
        return throughput.load_cached(Path(path), key)

    async def _measure_network(self) -> float | None:
        """Mbit/s to our dht-node (the swarm's entry point), or None (the 100 Mbit/s default) without one."""
        if self._dht is None:
            return None
        try:
            mbps = await self._dht.measure_mbps()
        except PollenError as e:
            log.warning("network speed test failed (%s); announcing the default link speed", e)
            return None
        log.info("network speed to the DHT: %.0f Mbit/s", mbps)
        return mbps

    async def _measure(self, backend: BlockBackend) -> None:
        """Throughput from --throughput, the cache file, or a measurement (then cached); decides batching."""
        cfg = self.config
        network = throughput.network_tps(backend.hidden_size, cfg.network_mbps or await self._measure_network())
        if cfg.throughput_tps is not None:
            # No measurement: batched decode has been faster on every device we measured (decode is weight-bound).
            tp = throughput.Throughput(cfg.throughput_tps, 0.0, float(backend.can_batch(backend.blocks)) * 2, network)
        else:
            path = Path(cfg.throughput_cache) if cfg.throughput_cache else throughput.default_cache_path()
            key = throughput.cache_key(self._model_hash, self._device, cfg.dtype, cfg.quant, len(backend.blocks))
            tp = throughput.load_cached(path, key)
            if tp is None:
                tokens = min(cfg.max_batch_size, FORWARD_MEASURE_TOKENS)
                tp = await self.run_on_worker(throughput.measure, backend, tokens, cfg.network_mbps)
                throughput.store_cached(path, key, tp)
                log.info("measured: %.1f tokens/s inference, %.0f tokens/s forward, batched decode x%.2f (cached in "
                         "%s)", tp.inference_tps, tp.forward_tps, tp.batch_speedup, path)  # fmt: skip
            tp = throughput.Throughput(tp.inference_tps, tp.forward_tps, tp.batch_speedup, network)
        self.throughput = tp
        self.throughput_tps = tp.announced_tps if cfg.throughput_tps is None else cfg.throughput_tps
        # "auto": batch only when measured faster (the worker also runs prefill alone, see scheduler.py)
        self.scheduler.batching = cfg.batching == "on" or (cfg.batching == "auto" and tp.batch_speedup > 1.1)
        log.info("announcing %.1f tokens/s; cross-session batching %s", self.throughput_tps,
                 "on" if self.scheduler.batching else "off")  # fmt: skip

    def _report_memory(self, backend: BlockBackend, rss_before: int) -> None:
        weights = sum(t.numel() * t.element_size() for t in [*backend.span_for(backend.blocks).parameters()])
        rss = memory.rss_bytes()
        self.memory_report = {"rss_bytes": rss, "rss_before_load_bytes": rss_before, "weights_bytes": weights}
        log.info("memory: RSS %.0f MiB = %.0f MiB before loading + %.0f MiB weights + %.0f MiB other", rss / 2**20,
                 rss_before / 2**20, weights / 2**20, (rss - rss_before - weights) / 2**20)  # fmt: skip

    async def _start_grpc(self, servicer: ShardServicer) -> None:
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        )
        shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SHARD_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        bind = f"{self.config.host}:{self.config.port}"
        try:
            self.port = server.add_insecure_port(bind)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {bind}: {e}") from None
        self._grpc = server
        await self._set_health(serving=False)  # loading
        await server.start()
        log.info("gRPC listening on %s (loading blocks)", self.address)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SHARD_SERVICE):
            await self._health.set(service, status)

    def _start_announce_loop(self) -> None:
        # Standalone, the loop only rebuilds the record, which keeps Info's load figures as fresh as in a swarm.
        assert self._announcer is not None
        self._announce_task = self._tasks.spawn(
            self._announcer._run_announce_loop(lambda: self.state), name="announce-loop"
        )

    def _make_record(self, state: ServerState) -> ServerRecord:
        cfg = self.config
        blocks = self.blocks
        assert blocks is not None
        tp = self.throughput
        return ServerRecord(
            peer_id=self.peer_id,
            address=cfg.public_address or self.address,
            next_rtts_ms=self._peer_rtts.snapshot() if self._peer_rtts is not None else {},
            model_id=self.model_id,
            model_hash=self._model_hash,
            start=blocks.start,
            end=blocks.end,
            state=state,
            throughput_tps=self.throughput_tps,
            forward_tps=tp.forward_tps if tp is not None else 0.0,
            network_tps=tp.network_tps if tp is not None else 0.0,
            active_sessions=self.cache.active_sessions,
            queued_requests=self.scheduler.queued + self.cache.waiting,
            cache_tokens_left=self.cache.tokens_left,
            inference_max_length=cfg.inference_max_length,
            dtype=cfg.dtype,
            quant=cfg.quant,
            version=swarm.__version__,
        )

    # ---- background work ----------------------------------------------------------------------------------

    async def _run_idle_loop(self) -> None:
        timeout = self.config.session_timeout_s
        while True:
            await asyncio.sleep(max(0.2, min(timeout / 4, 10.0)))
            self.cache.close_idle(timeout)

    async def move_to(self, target: BlockRange) -> None:
        """Drain, announce the old blocks OFFLINE, swap the loaded blocks, announce ONLINE (see rebalancer.py)."""
        old, servicer, announcer = self.blocks, self.servicer, self._announcer
        assert old is not None and servicer is not None and announcer is not None
        self.metrics.moves.inc()
        self.state = ServerState.DRAINING
        await self._set_health(serving=False)
        self.cache.start_draining()
        await announcer.announce(ServerState.DRAINING)  # routing stops sending new sessions here
        await self._drain(self.config.drain_timeout_s)
        reason = f"server is moving from blocks {old} to {target}; continue on another server"
        self.cache.close_all(reason)
        await self._drain(2.0)
        if self._announce_task is not None:
            self._announce_task.cancel()
        await announcer.announce_offline()  # blocks of the old range; the new range's ONLINE comes later
        servicer.backend = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            backend = await self._load(target)
        except Exception:
            log.exception("loading blocks %s failed; reloading %s", target, old)
            target, backend = old, await self._load(old)
        self.blocks = servicer.blocks = announcer.blocks = target
        if self._peer_rtts is not None:
            self._peer_rtts.blocks = target
        servicer.backend = backend
        self.cache.stop_draining()
        self.state = ServerState.ONLINE
        # Later than the OFFLINE just stored for overlapping blocks, or the DHT would keep OFFLINE for them.
        expiration = max(time.time() + self.config.ttl_s, announcer.last_expiration + 1)
        await announcer.announce(ServerState.ONLINE, expiration)
        self._start_announce_loop()
        await self._set_health(serving=True)
        log.info("moved from blocks %s to %s", old, target)

    # ---- shutdown ---------------------------------------------------------------------------------------

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Graceful shutdown; safe to call twice and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        self.cache.start_draining()
        # The refresh loop must not re-announce ONLINE after OFFLINE.
        await self._tasks.cancel_all()
        drain_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        was_online = self.state == ServerState.ONLINE
        self.state = ServerState.DRAINING
        await asyncio.gather(self._announce_offline(was_online), self._drain(drain_s))
        self.state = ServerState.OFFLINE
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)  # cancels streams still open after the drain
        if self._dht is not None:
            await self._dht.close()
        if self._peer_rtts is not None:
            await self._peer_rtts.close()
        if self.servicer is not None:
            await self.servicer.push.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        self.scheduler.close()
        log.info("stopped (peer %s)", self.peer_id)

    async def _announce_offline(self, was_online: bool) -> None:
        if self._announcer is None or self._dht is None or not was_online:
            return
        try:
            stored = await asyncio.wait_for(self._announcer.announce_offline(), timeout=3.0)
        except TimeoutError:
            stored = False
        if not stored:
            log.warning("OFFLINE announcement not stored; the ONLINE record expires by itself within the ttl")

    async def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self.cache.active_sessions:
            log.info("draining %d open sessions (up to %.1f s)", self.cache.active_sessions, timeout_s)
        while self.cache.active_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.cache.active_sessions:
            log.warning("%d sessions still open after %.1f s of draining", self.cache.active_sessions, timeout_s)

    async def run(self) -> None:
        """CLI lifecycle: start, say ready, serve until SIGINT/SIGTERM, stop gracefully."""
        stop = asyncio.Event()
        install_signal_handlers(stop)
        starting = asyncio.create_task(self.start(), name="start")
        stopping = asyncio.create_task(stop.wait(), name="wait-for-signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # signalled while loading: abandon the start
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self.stop()
            return
        stopping.cancel()
        starting.result()  # re-raise a failed start
        metrics = f" metrics port {self.metrics_port}" if self._metrics_http is not None else ""
        log.info("ready %.2f s after the process started", process_age_s())
        sys.stdout.write(f"shard-server ready at {self.address} blocks {self.blocks}{metrics}\n")
        sys.stdout.flush()
        write_ready_file(self.config.ready_file, self.address)
        await stop.wait()
        await self.stop()
