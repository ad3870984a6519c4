"""ShardServer: the composition root and lifecycle of one shard server process (or one in-process test server).

start():  check model + range → bind gRPC (health NOT_SERVING) → load blocks on the worker → measure
          throughput → announce ONLINE (first store must succeed) → health SERVING.
stop():   health NOT_SERVING → refuse new sessions → announce OFFLINE while running sessions drain
          (bounded) → stop gRPC → close the DHT client → release the worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import swarm
from shard_server.announcer import Announcer
from shard_server.backend import BlockBackend
from shard_server.cache import SessionCache
from shard_server.config import ShardServerConfig
from shard_server.loader import ModelInfo, inspect_model, load_span
from shard_server.servicer import ShardServicer
from swarm.aio import TaskSet, install_signal_handlers, write_ready_file
from swarm.dht_client import DhtClient, parse_peers
from swarm.model_files import config_fingerprint, default_model_id
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord, ServerState
from swarm.tensors import dtype_from_name

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_SERVICE = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name  # "pollen.v1.Shard"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


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
        self.config = config
        self.peer_id = uuid.uuid4().hex  # fresh per start until signed identities exist
        self.model_id = config.model_id or default_model_id(config.model)
        self.state = ServerState.JOINING
        self.port = 0
        self.throughput_tps = 0.0
        self.cache = SessionCache(config.cache_tokens)
        self.servicer: ShardServicer | None = None  # exists from start(); its backend once blocks are loaded
        # All torch work runs here, one item at a time: the event loop never blocks on compute and the
        # model needs no locks.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-torch")
        self._tasks = TaskSet()
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._dht: DhtClient | None = None
        self._announcer: Announcer | None = None
        self._info: ModelInfo | None = None
        self._model_hash = ""
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def record(self) -> ServerRecord | None:
        """The last record announced (or, standalone, built); None until the server is ready."""
        return self._announcer.record if self._announcer is not None else None

    async def run_on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        cfg = self.config
        # Cheap checks first, so a wrong path or range fails before any port is bound or weight is read.
        info = self._info = inspect_model(cfg.model, cfg.blocks)
        device = resolve_device(cfg.device)
        try:
            dtype = dtype_from_name(cfg.dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        peers = parse_peers(",".join(cfg.initial_peers))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self._model_hash = config_fingerprint(info.path)

        servicer = self.servicer = ShardServicer(
            model_id=self.model_id,
            blocks=cfg.blocks,
            cache=self.cache,
            run=self.run_on_worker,
            record=lambda: self.record,
            inference_max_length=cfg.inference_max_length,
            max_batch_tokens=cfg.max_batch_size,
        )
        try:
            await self._start_grpc(servicer)
            t0 = time.perf_counter()
            span = await self.run_on_worker(load_span, info, cfg.blocks, device, dtype)
            backend = BlockBackend(info, span, device, dtype)
            log.info("loaded blocks %s of %s in %.2f s", cfg.blocks, info.path, time.perf_counter() - t0)
            if cfg.throughput_tps is not None:
                self.throughput_tps = cfg.throughput_tps
            else:
                self.throughput_tps = await self.run_on_worker(backend.measure_throughput)
                log.info("measured %.1f tokens/s per single-token inference step", self.throughput_tps)
            servicer.backend = backend
            self.state = ServerState.ONLINE

            if peers:
                self._dht = DhtClient(peers)
            else:
                log.warning("no --initial-peers: running standalone, this server is NOT announced to any DHT")
            self._announcer = Announcer(
                self._dht, self.model_id, cfg.blocks, self.peer_id, self._make_record, cfg.ttl_s, cfg.announce_every_s
            )
            await self._announcer.announce_until_stored(ServerState.ONLINE, timeout_s=max(10.0, cfg.ttl_s))
            # Standalone, the loop only rebuilds the record, which keeps Info's load figures as fresh as in a swarm.
            self._tasks.spawn(self._announcer._run_announce_loop(lambda: self.state), name="announce-loop")
            for service in ("", SHARD_SERVICE):
                await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.stop()
            raise
        log.info("serving model %s blocks %s at %s as peer %s", self.model_id, cfg.blocks, self.address, self.peer_id)

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
        for service in ("", SHARD_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)  # loading
        await server.start()
        log.info("gRPC listening on %s (loading blocks)", self.address)

    def _make_record(self, state: ServerState) -> ServerRecord:
        cfg = self.config
        return ServerRecord(
            peer_id=self.peer_id,
            address=self.address,
            model_id=self.model_id,
            model_hash=self._model_hash,
            start=cfg.blocks.start,
            end=cfg.blocks.end,
            state=state,
            throughput_tps=self.throughput_tps,
            active_sessions=self.cache.active_sessions,
            cache_tokens_left=self.cache.tokens_left,
            inference_max_length=cfg.inference_max_length,
            dtype=cfg.dtype,
            version=swarm.__version__,
        )

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
        self._executor.shutdown(wait=False, cancel_futures=True)
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
            log.warning("cancelling %d sessions still open after the drain timeout", self.cache.active_sessions)

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
        sys.stdout.write(f"shard-server ready at {self.address} blocks {self.config.blocks}\n")
        sys.stdout.flush()
        write_ready_file(self.config.ready_file, self.address)
        await stop.wait()
        await self.stop()
