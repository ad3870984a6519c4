"""The gateway's shared state: served models, the concurrency limit, open conversations, the swarm's health
(rebuilt in the background), metrics, and the mapping of errors to HTTP statuses. One per process; the HTTP
and WebSocket handlers receive it from the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from client_sdk.config import ClientConfig
from client_sdk.transport import ChannelPool
from gateway.config import GatewayConfig
from gateway.conversation import Conversation, LengthExceeded
from gateway.health import read_state
from gateway.metrics import GatewayMetrics
from gateway.registry import ModelEntry, Registry, UnknownModel
from swarm.aio import TaskSet
from swarm.dht_client import DhtClient
from swarm.errors import (
    CacheExhausted,
    DhtUnavailable,
    InvalidRequest,
    MissingBlocks,
    Overloaded,
    PollenError,
    ServerDraining,
    StepTimeout,
    Unauthenticated,
)

log = logging.getLogger(__name__)


class Busy(PollenError):
    """The gateway's concurrency limit is reached (HTTP 429)."""


class ShuttingDown(PollenError):
    """The gateway is stopping and takes no new work (HTTP 503)."""


def http_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, machine-readable code) for an error raised while serving a request."""
    if isinstance(exc, Busy):
        return 429, "rate_limit_exceeded"
    if isinstance(exc, UnknownModel):
        return 404, "model_not_found"
    if isinstance(exc, InvalidRequest):
        code = getattr(exc, "code_name", None)  # a BadParam may name its own code
        return 400, code or ("context_length_exceeded" if isinstance(exc, LengthExceeded) else "invalid_request")
    if isinstance(exc, Unauthenticated):
        return 401, "invalid_api_key"
    if isinstance(exc, ShuttingDown | MissingBlocks | DhtUnavailable | ServerDraining | CacheExhausted | Overloaded):
        return 503, "swarm_unavailable"
    if isinstance(exc, StepTimeout):
        return 504, "swarm_timeout"
    if isinstance(exc, PollenError):
        return 502, "swarm_error"
    if isinstance(exc, ValueError | TypeError):  # the client's own input checks (empty prompt, bad ids...)
        return 400, "invalid_request"
    return 500, "internal_error"


def describe(exc: BaseException) -> str:
    """What a client is told: the class and message, never a server-side traceback."""
    return f"{type(exc).__name__}: {exc}"


class Gateway:
    def __init__(self, config: GatewayConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.metrics = GatewayMetrics()
        self.metrics.capacity.set(config.max_concurrency)
        self.busy = 0
        self.draining = False
        self.started_at = time.time()
        self.conversations: set[Conversation] = set()
        self.state: dict[str, Any] | None = None
        self.state_error: str | None = None
        self.state_changed = asyncio.Event()
        self._tasks = TaskSet()
        # the swarm key and TLS CA the CLI put in the environment (ClientConfig reads them), as every client here
        security = ClientConfig().security()
        self._dht = DhtClient(list(config.initial_peers), security=security)
        self._pool = ChannelPool(security=security)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.update_state()
        self._tasks.spawn(self._run_state_loop(), name="swarm-state")

    async def stop(self) -> None:
        """Close every open session (servers free their caches), then the clients."""
        self.draining = True
        await self._tasks.cancel_all()
        conversations, self.conversations = list(self.conversations), set()
        if conversations:
            log.info("closing %d open inference sessions", len(conversations))
        await asyncio.gather(*(c.close() for c in conversations), return_exceptions=True)
        await self.registry.aclose()
        await self._pool.close()
        await self._dht.close()

    # ---- swarm state -------------------------------------------------------------------------------------

    async def update_state(self) -> None:
        known = {e.name: e.num_blocks for e in self.registry}
        try:
            state = await read_state(
                self._dht, self._pool, self.config.initial_peers, known, update_period_s=self.config.update_period_s
            )
        except PollenError as e:
            self.state_error = describe(e)
            self.metrics.state_errors.inc()
            log.warning("swarm state update failed: %s", e)
            return
        self.state, self.state_error = state, None
        self.metrics.observe_state(state)
        self.state_changed.set()
        self.state_changed = asyncio.Event()

    async def _run_state_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.update_period_s)
            await self.update_state()

    # ---- admission ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def slot(self) -> Any:
        """Hold one of the `max_concurrency` slots (raises Busy when none is free, ShuttingDown when stopping)."""
        if self.draining:
            raise ShuttingDown("the gateway is shutting down")
        if self.busy >= self.config.max_concurrency:
            self.metrics.rejected.labels("busy").inc()
            raise Busy(
                f"too many requests at once: this gateway runs at most {self.config.max_concurrency} "
                "generations and WebSocket sessions together; retry shortly"
            )
        self.busy += 1
        self.metrics.busy.set(self.busy)
        try:
            yield
        finally:
            self.busy -= 1
            self.metrics.busy.set(self.busy)

    def model(self, name: str | None) -> ModelEntry:
        return self.registry.get(name)

    def max_length(self, entry: ModelEntry) -> int:
        return entry.max_length(self.config.max_length)

    @contextlib.asynccontextmanager
    async def conversation(self, entry: ModelEntry, max_length: int) -> AsyncIterator[Conversation]:
        """A Conversation registered for shutdown and always closed at the end."""
        limit = self.max_length(entry)
        if max_length > limit:
            raise InvalidRequest(
                f"Maximum length exceeded: max_length {max_length} is over this gateway's limit of {limit} tokens "
                f"for {entry.name}"
            )
        conv = Conversation(entry.client, max_length)
        self.conversations.add(conv)
        try:
            yield conv
        finally:
            self.conversations.discard(conv)
            await conv.close()
