"""Prometheus metrics of one shard server, in a private registry (two servers in one process never collide),
served at /metrics by prometheus_client's own HTTP server (a thread; its request parsing is the standard
library's, with its limits on line length and header count).

Load figures (sessions, cache bytes, queue) are read when scraped, on that server's thread: they read plain
numbers or copies of the containers they walk, never state that is half updated. The hot path pays only for
counters and one histogram observation per request. Imported only with `--metrics-port` (prometheus_client
costs start-up time and memory a server without an endpoint would never use).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from shard_server.cache import SessionCache
from shard_server.memory import rss_bytes
from swarm.blocks import BlockRange

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = Counter(
            "pollen_rpcs", "RPC calls (streams) by method and final status", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "pollen_request_seconds",
            "Time to answer one request message (one step of an InferenceStep stream), queueing included",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("pollen_tokens_processed", "Tokens run through the blocks", ["kind"], registry=r)
        self.batch_rows = Histogram(
            "pollen_batch_rows", "Rows per executed inference batch on the worker", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_steps = Histogram(
            "pollen_batch_sessions", "Sessions per executed inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "pollen_batch_seconds", "Worker time per executed inference batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.moves = Counter("pollen_block_moves", "Times the server moved to other blocks", registry=r)
        self.evictions = Counter(
            "pollen_sessions_evicted", "Idle sessions evicted to make room for a new session", registry=r
        )
        self._latency_children = {rpc: self.latency.labels(rpc) for rpc in ("Forward", "Backward", "InferenceStep")}
        self._token_children = {kind: self.tokens.labels(kind) for kind in ("inference", "forward", "backward")}

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge computed when scraped (load figures owned by other objects)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def request(self, rpc: str, seconds: float, tokens: int, kind: str) -> None:
        self._latency_children[rpc].observe(seconds)
        self._token_children[kind].inc(tokens)

    def rpc_status(self, rpc: str, code: str) -> None:
        self.rpcs.labels(rpc, code).inc()

    def batch(self, steps: int, rows: int, seconds: float) -> None:
        """The scheduler's on_batch hook, called on the worker thread (prometheus_client metrics are thread-safe)."""
        self.batch_steps.observe(steps)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def register_gauges(
    m: ServerMetrics,
    cache: SessionCache,
    queued: Callable[[], int],
    throughput_tps: Callable[[], float],
    blocks: Callable[[], BlockRange | None],
) -> None:
    """Load figures read when scraped: the session cache's, the worker queue's and the server's; and the cache's
    evictions, counted as they happen."""
    cache.on_evict = lambda session: m.evictions.inc()
    m.gauge("pollen_active_sessions", "Open inference sessions", lambda: cache.active_sessions)
    m.gauge("pollen_sessions_waiting", "Session opens waiting for cache room", lambda: cache.waiting)
    m.gauge("pollen_cache_bytes_budget", "KV-cache budget in bytes", lambda: cache.budget_bytes)
    m.gauge("pollen_cache_bytes_used", "KV-cache bytes reserved by open sessions", lambda: cache.used_bytes)
    m.gauge("pollen_cache_bytes_free", "KV-cache bytes free for new sessions", lambda: cache.free_bytes)
    m.gauge("pollen_cache_bytes_allocated", "KV-cache bytes allocated now", cache.allocated_bytes)
    m.gauge("pollen_cache_tokens_left", "Cache tokens left through all held blocks", lambda: cache.tokens_left)
    m.gauge("pollen_queued_requests", "Requests waiting for the worker", queued)
    m.gauge("pollen_throughput_tps", "Announced tokens/s", throughput_tps)
    m.gauge("pollen_rss_bytes", "Resident memory of the process", rss_bytes)
    m.gauge("pollen_blocks_start", "First held block", lambda: b.start if (b := blocks()) else -1)
    m.gauge("pollen_blocks_end", "End of the held range (exclusive)", lambda: b.end if (b := blocks()) else -1)


class MetricsEndpoint:
    """prometheus_client's HTTP server on `host:port` (0 picks a free port), serving the metrics."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server: Any = None  # a wsgiref WSGIServer
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._server, self._thread = start_http_server(self.requested_port, self.host, registry=self.metrics.registry)
        self.port = self._server.server_port
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        server, thread = self._server, self._thread
        self._server = self._thread = None
        # shutdown() waits for serve_forever to notice (up to its 0.5 s poll): off the event loop
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 2.0)
