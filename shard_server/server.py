"""ShardServer: the composition root and lifecycle of one shard server process (or one in-process test server).

start():  check model (config.json only) → choose blocks (pinned, or from the swarm's records) → bind gRPC
          (health NOT_SERVING) and the /metrics endpoint if asked → load blocks on the worker → size the KV
          budget from a real cache's bytes per token → throughput (--throughput, cached file, or measured and
          cached) → announce ONLINE (the first store must succeed) → health SERVING → background loops (announce,
          idle sessions, peer RTTs, rebalancing when the blocks were not pinned).
          The admin endpoint (admin.py, a Unix socket) starts once the gRPC port is bound.
move_to(): health NOT_SERVING → refuse new sessions → announce DRAINING → let running sessions finish (bounded),
          close the rest → announce the old blocks OFFLINE → unload → load the new blocks (the old ones again if
          that fails) → announce ONLINE → health SERVING (see rebalancer.py for when; skipped unless ONLINE).
pause():  (admin Pause, only when ONLINE) health NOT_SERVING → refuse new sessions (UNAVAILABLE "paused") →
          announce PAUSED → let running sessions finish within the grace period, close the rest (their clients
          fail over) → drop the blocks and free their memory (gc, CUDA cache, heap trim). Kept: identity, gRPC
          port (Info says "paused"), DHT membership (the announce loop refreshes PAUSED), blocks, KV budget and
          throughput.
resume(): (admin Resume, only when PAUSED) load the same blocks → take sessions → announce ONLINE (same peer
          id, nothing re-measured) → health SERVING. A failed reload leaves the server PAUSED.
          move_to/pause/resume live in lifecycle.py and never overlap: a pause or resume during a start, a move
          or another transition is refused (FAILED_PRECONDITION); pause when paused, resume when online are
          no-ops.
stop():   health NOT_SERVING → refuse new sessions, stop the background loops → announce OFFLINE (also when
          paused) while running sessions drain (bounded) → stop gRPC (cancels what is left) → close the DHT
          client, peer channels, /metrics and the admin socket → stop the worker and wait for it to finish its
          current step (a process must not exit while torch runs on it).

Security (`config.security`, swarm.net) covers the gRPC port (swarm-key proofs, TLS) and every call the
server makes itself: the DHT client, pushes and RTT probes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from typing import Any

import torch

import swarm
from shard_server import startup
from shard_server.adapters import AdapterSpec, load_adapters, parse_specs, read_config
from shard_server.admin import AdminEndpoint, start_admin
from shard_server.announcer import Announcer
from shard_server.backend import BlockBackend
from shard_server.block_selection import choose_blocks
from shard_server.cache import SessionCache
from shard_server.config import ShardServerConfig
from shard_server.frontend import GrpcFront
from shard_server.lifecycle import Lifecycle
from shard_server.loader import ModelInfo, inspect_model, load_span
from shard_server.memory import rss_bytes
from shard_server.next_hops import NextHops
from shard_server.peer_rtt import PeerRtts
from shard_server.reachability import Reachability
from shard_server.rebalancer import Rebalancer, fetch_records
from shard_server.scheduler import Scheduler
from shard_server.servicer import ShardServicer
from shard_server.throughput import Throughput
from shard_server.tuning import TuningLimits
from swarm.access import CallLimits
from swarm.aio import TaskSet, install_signal_handlers, write_ready_file
from swarm.blocks import BlockRange
from swarm.dht_client import DhtClient
from swarm.identity import Identity
from swarm.model_files import config_fingerprint, default_model_id
from swarm.net import PLAINTEXT, format_address, parse_addresses
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.tensors import dtype_from_name

log = logging.getLogger(__name__)

WORKER_JOIN_S = 30.0  # longest wait at stop for the step the worker is running (a long prefill on a slow CPU)


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
        self.throughput: Throughput | None = None
        self.throughput_tps = 0.0
        self.memory_report: dict[str, int] = {}  # rss / weights bytes, filled once loaded
        self.cache = SessionCache(max_sessions=cfg.max_sessions, alloc_timeout_s=cfg.alloc_timeout_s)
        self.cache.evict_idle_after_s = cfg.evict_idle_after_s  # a full cache evicts idle sessions for newcomers
        # All torch work runs on the scheduler's one worker thread: the event loop never blocks on compute and
        # the model needs no locks.
        self.scheduler = Scheduler(
            cfg.max_batch_size, cfg.batching != "off", cfg.max_queued_requests, max_queued_bytes=cfg.max_queued_bytes
        )
        self.security = cfg.security or PLAINTEXT
        self.metrics: Any = None  # metrics.ServerMetrics with --metrics-port (imported only then)
        self.servicer: ShardServicer | None = None  # exists from start(); its backend once blocks are loaded
        self._tasks = TaskSet()
        self._reach: Reachability | None = None  # how the swarm reaches us (direct or relayed), from start()
        self._announce_task: asyncio.Task[Any] | None = None
        self._front: GrpcFront | None = None
        self._metrics_http: Any = None
        self._dht: DhtClient | None = None
        self._announcer: Announcer | None = None
        self._peer_rtts: PeerRtts | None = None  # RTTs to the servers after ours, announced for routing
        self._info: ModelInfo | None = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._model_hash = ""
        self._stopped = False
        self._adapter_specs: tuple[AdapterSpec, ...] = ()  # --adapters, checked before anything is bound
        self.lifecycle = Lifecycle(self)  # move_to, pause, resume
        self._admin: AdminEndpoint | None = None  # the Unix-socket admin endpoint (config.admin_socket)

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

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

    async def start(self) -> None:
        cfg = self.config
        # Cheap checks first, so a wrong path or range fails before any port is bound or weight is read.
        info = self._info = inspect_model(cfg.model, cfg.blocks or BlockRange(0, 1))
        device = self._device = startup.resolve_device(cfg.device)
        try:
            self._dtype = dtype_from_name(cfg.dtype)
        except ValueError as e:
            raise startup.ConfigError(str(e)) from None
        peers = parse_addresses(cfg.initial_peers)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self._model_hash = config_fingerprint(info.path)
        self._adapter_specs = parse_specs(cfg.adapters)
        for spec in self._adapter_specs:
            read_config(spec.path)  # a missing folder or an unsupported feature fails before any port is bound
        try:
            if peers:
                self._dht = DhtClient(peers, security=self.security)
            else:
                log.warning("no --initial-peers: running standalone, this server is NOT announced to any DHT")
            blocks = self.blocks = await self._choose_blocks(info, device)
            servicer = self.servicer = ShardServicer(
                self.model_id, blocks, self.cache, self.scheduler, self.live_record, cfg.inference_max_length,
                cfg.max_batch_size, cfg.max_message_bytes, max_backward_tokens=cfg.max_backward_tokens,
                security=self.security, next_hops=NextHops(self._dht, self.model_id, self._model_hash),
                max_inbox_bytes=cfg.max_inbox_bytes, max_streams_per_ip=cfg.max_streams_per_ip,
            )  # fmt: skip
            front = self._front = GrpcFront(
                servicer, cfg.host, cfg.port, cfg.max_message_bytes, security=self.security,
                limits=CallLimits(cfg.calls_per_ip_s, cfg.max_calls_in_flight_per_ip),
                max_receive_bytes=cfg.max_receive_bytes,
            )  # fmt: skip
            reach = self._reach = Reachability(
                host=cfg.host, public_address=cfg.public_address, dht_peers=peers, dht=self._dht,
                model_id=self.model_id, peer_id=self.peer_id, security=self.security, use_relay=cfg.use_relay,
                relay_limits=cfg.relay,
            )  # fmt: skip
            reach.num_blocks = info.family.num_blocks
            reach.add_services(front.server)  # --relay: the Relay service shares our gRPC port
            await front.start()
            self.port = front.port
            log.info("gRPC listening on %s (%s; loading blocks)", self.address, self.security.describe())
            # Dialled back by a dht-node; through a relay if it cannot (re-announced when the relay changes).
            await reach.start(self.port, self._reannounce)
            self._admin = await start_admin(cfg.admin_socket, self.port, self)
            if cfg.metrics_port is not None:
                await self._start_metrics(cfg.metrics_port)
            rss_before = rss_bytes()
            backend = await self._load(blocks)
            await self._size_cache(backend)
            await self._measure(backend)
            self.memory_report = startup.memory_report(backend, rss_before)
            await self._serve_backend(backend)
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
                self._peer_rtts = PeerRtts(self._dht, self.model_id, blocks, self.peer_id, security=self.security)
                self._tasks.spawn(self._peer_rtts.run(cfg.announce_every_s), name="peer-rtt-loop")
                if cfg.blocks is None and cfg.balance_period_s > 0:
                    rebalancer = Rebalancer(
                        self._dht, self.model_id, self.peer_id, info.family.num_blocks, cfg.balance_period_s,
                        cfg.balance_quality, lambda: self.blocks, lambda: self.throughput_tps, self.move_to,
                    )  # fmt: skip
                    self._tasks.spawn(rebalancer.run(), name="balance-loop")
            await front.set_serving(True)
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
        num_blocks = startup.blocks_that_fit(cfg, info, device, self._dtype)
        records = await fetch_records(self._dht, self.model_id, total) if self._dht is not None else []
        cached = startup.cached_throughput(cfg, self._model_hash, device, num_blocks)
        blocks = choose_blocks(records, num_blocks, total, cached.announced_tps if cached else 1.0)
        log.info("chose blocks %s of %d (%d servers announced)", blocks, total, len({r.peer_id for r in records}))
        return blocks

    async def _load(self, blocks: BlockRange) -> BlockBackend:
        cfg, info = self.config, self._info
        assert info is not None
        t0 = time.perf_counter()
        device, dtype = self._device, self._dtype
        span = await self.scheduler.run(
            lambda: load_span(info, blocks, device, dtype, quant=cfg.quant, int8_threshold=cfg.int8_threshold)
        )
        log.info("loaded blocks %s of %s in %.2f s", blocks, info.path, time.perf_counter() - t0)
        return BlockBackend(span, device, dtype)

    async def _serve_backend(self, backend: BlockBackend) -> None:
        """Hand the loaded blocks to the servicer with what fine-tuning clients may use on them: the adapters
        (for these blocks), the LoRA modules and rank limit, the Backward token limit from the activation budget."""
        assert self.servicer is not None
        adapters = await self.scheduler.run(load_adapters, self._adapter_specs, backend.span, backend.dtype)
        budget, tokens = startup.backward_limits(self.config, backend)
        self.servicer.max_backward_tokens = tokens
        self.servicer.limits = TuningLimits(
            backend.lora_modules(), backend.hidden_size, self.config.max_lora_rank, adapters
        )
        log.info("Backward: up to %d tokens per request (activation budget %.1f MiB)%s", tokens, budget / 2**20,
                 f"; adapters {', '.join(adapters)}" if adapters else "")  # fmt: skip
        self.servicer.backend = backend

    async def _size_cache(self, backend: BlockBackend) -> None:
        per_token_block = await self.scheduler.run(backend.kv_bytes_per_token)
        held = len(backend.blocks)
        budget = startup.cache_budget_bytes(self.config, per_token_block, held, self._device)
        self.cache.set_budget(budget, per_token_block, held)
        log.info("KV cache budget %.1f MiB = %d tokens through %d blocks (%d bytes per token per block)",
                 budget / 2**20, self.cache.budget_tokens, held, per_token_block)  # fmt: skip

    async def _measure(self, backend: BlockBackend) -> None:
        """The throughput to announce; decides batching."""
        cfg = self.config
        mbps = cfg.network_mbps or await startup.measure_network(self._dht)
        tp = await startup.measure_throughput(cfg, backend, self._model_hash, mbps, self.scheduler.run)
        self.throughput = tp
        self.throughput_tps = tp.announced_tps if cfg.throughput_tps is None else cfg.throughput_tps
        # "auto": batch steps of different sessions only when measured faster
        self.scheduler.batching = cfg.batching == "on" or (cfg.batching == "auto" and tp.batch_speedup > 1.1)
        log.info("announcing %.1f tokens/s; cross-session batching %s", self.throughput_tps,
                 "on" if self.scheduler.batching else "off")  # fmt: skip

    async def _start_metrics(self, port: int) -> None:
        from shard_server.metrics import MetricsEndpoint, ServerMetrics, register_gauges

        m = self.metrics = ServerMetrics()
        register_gauges(m, self.cache, lambda: self.scheduler.queued, lambda: self.throughput_tps, lambda: self.blocks)
        self.scheduler.on_batch = m.batch
        assert self.servicer is not None
        self.servicer.observer = m
        self._metrics_http = MetricsEndpoint(m, self.config.host, port)
        await self._metrics_http.start()

    def _start_announce_loop(self) -> None:
        # Standalone, the loop only rebuilds the record, which keeps Info's load figures as fresh as in a swarm.
        assert self._announcer is not None
        self._announce_task = self._tasks.spawn(self._announcer.run(lambda: self.state), name="announce-loop")

    def _make_record(self, state: ServerState) -> ServerRecord:
        cfg, blocks, tp = self.config, self.blocks, self.throughput
        assert blocks is not None
        return ServerRecord(
            peer_id=self.peer_id,
            address=self._reach.address if self._reach and self._reach.address else cfg.public_address or self.address,
            reachable=self._reach.reachable if self._reach is not None else True,
            relay=self._reach.relay if self._reach is not None else "",
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
            adapters=[spec.name for spec in self._adapter_specs],
        )

    async def _reannounce(self) -> None:
        """Announce at once (the address changed: a new relay)."""
        if self._announcer is not None and self.state != ServerState.OFFLINE:
            await self._announcer.announce(self.state)

    # ---- background work ----------------------------------------------------------------------------------

    async def _run_idle_loop(self) -> None:
        timeout = self.config.session_timeout_s
        while True:
            await asyncio.sleep(max(0.2, min(timeout / 4, 10.0)))
            self.cache.close_idle(timeout)

    async def move_to(self, target: BlockRange) -> None:
        """Serve `target` instead of the current blocks (see the module docstring for the steps)."""
        await self.lifecycle.move_to(target)

    # ---- shutdown ---------------------------------------------------------------------------------------

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Graceful shutdown; safe to call twice and after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        if self._front is not None:
            await self._front.enter_graceful_shutdown()
        self.cache.start_draining()
        # The refresh loop must not re-announce ONLINE after OFFLINE.
        await self._tasks.cancel_all()
        drain_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        was_online = self.state in (ServerState.ONLINE, ServerState.PAUSED)  # announced: say OFFLINE
        self.state = ServerState.DRAINING
        leaving = self._announcer.leave() if self._announcer is not None and was_online else asyncio.sleep(0)
        await asyncio.gather(leaving, self.lifecycle.drain(drain_s))
        self.state = ServerState.OFFLINE
        if self._front is not None:
            await self._front.stop()
        if self._reach is not None:  # after the drain: relayed sessions kept their path until now
            await self._reach.close()
        if self._dht is not None:
            await self._dht.close()
        if self._peer_rtts is not None:
            await self._peer_rtts.close()
        if self.servicer is not None:
            await self.servicer.pusher.close()
            await self.servicer.next_hops.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        if self._admin is not None:
            await self._admin.stop()
        self.scheduler.close()
        if not await self.scheduler.join(WORKER_JOIN_S):
            log.warning("the worker is still running a step after %.0f s; exiting anyway", WORKER_JOIN_S)
        log.info("stopped (peer %s)", self.peer_id)

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
        # What exists now (modules, weights, the server) lives as long as the process: keep the cyclic collector
        # from walking it ever again (and turn it back on if the CLI turned it off for the start).
        gc.freeze()
        gc.enable()
        metrics = f" metrics port {self.metrics_port}" if self._metrics_http is not None else ""
        log.info("ready %.2f s after the process started", startup.process_age_s())
        sys.stdout.write(f"shard-server ready at {self.address} blocks {self.blocks}{metrics}\n")
        sys.stdout.flush()
        write_ready_file(self.config.ready_file, self.address)
        await stop.wait()
        await self.stop()
