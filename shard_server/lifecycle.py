"""Lifecycle transitions of a running ShardServer: move to other blocks, pause, resume (the contract is the
module docstring of server.py). All three stop taking sessions the same way, drain the same way and load
blocks the same way; they differ in what they announce and whether the blocks come back at once.

Transitions never overlap: one runs at a time (`busy` names it), and a pause or resume asked while another
transition runs is refused with TransitionRefused rather than queued, so the owner sees at once why nothing
happened. A move the rebalancer asks for while paused is skipped (a paused server holds no blocks to move).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import torch
from torch import nn

from shard_server.announcer import Announcer
from shard_server.backend import BlockBackend
from shard_server.cache import SessionCache
from shard_server.config import ShardServerConfig
from shard_server.frontend import GrpcFront
from shard_server.peer_rtt import PeerRtts
from shard_server.scheduler import Scheduler
from shard_server.servicer import ShardServicer
from shard_server.tuning import TuningLimits
from swarm.blocks import BlockRange
from swarm.errors import PollenError
from swarm.records import ServerState

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 2.0  # after closing the sessions left at the end of a drain: their streams unwind within this
PAUSED_REASON = "server is paused by its owner and takes no sessions; use another server"


class TransitionRefused(PollenError):
    """A pause/resume that cannot run now (starting, moving, another transition running, stopping)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LifecycleHost(Protocol):
    """The parts of ShardServer the transitions drive (a Protocol, so this module does not import server.py)."""

    config: ShardServerConfig
    state: ServerState
    blocks: BlockRange | None
    servicer: ShardServicer | None
    cache: SessionCache
    scheduler: Scheduler
    metrics: Any
    _front: GrpcFront | None
    _announcer: Announcer | None
    _announce_task: asyncio.Task[Any] | None
    _peer_rtts: PeerRtts | None
    _device: torch.device
    _stopped: bool

    async def _load(self, blocks: BlockRange) -> BlockBackend: ...

    async def _serve_backend(self, backend: BlockBackend) -> None: ...

    def _start_announce_loop(self) -> None: ...


@dataclass
class DrainResult:
    finished: int = 0  # sessions that ended by themselves within the grace period
    closed: int = 0  # sessions the server closed at its end (their clients fail over)
    gone_ms: float = 0.0  # from the start of the transition to the last session leaving


@dataclass
class Outcome:
    """What a pause or resume did, for the admin endpoint."""

    changed: bool
    message: str
    transition_ms: float = 0.0
    drain: DrainResult | None = None


class Lifecycle:
    def __init__(self, server: LifecycleHost) -> None:
        self.server = server
        self.busy = ""  # "moving", "pausing" or "resuming" while that transition runs
        self.state_since = time.monotonic()  # when the current state (or transition) began

    @property
    def phase(self) -> str:
        """What an operator should read: the running transition, else the announced state."""
        return self.busy or self.server.state.value

    # ---- the transitions -------------------------------------------------------------------------------

    async def move_to(self, target: BlockRange) -> None:
        """Serve `target` instead of the current blocks (the rebalancer's move)."""
        s = self.server
        if s.state != ServerState.ONLINE or self.busy:
            log.info("not moving to blocks %s: the server is %s", target, self.phase)
            return
        old, servicer, announcer = s.blocks, s.servicer, s._announcer
        assert old is not None and servicer is not None and announcer is not None
        if s.metrics is not None:
            s.metrics.moves.inc()
        t0 = self._begin("moving")
        try:
            await self._stop_taking_sessions(ServerState.DRAINING, f"server is moving from blocks {old} to {target}; "
                                             "use another server")  # fmt: skip
            await self._drain(s.config.drain_timeout_s, f"server is moving from blocks {old} to {target}; continue "
                              "on another server", t0)  # fmt: skip
            # The announce loop must not refresh the old range after its OFFLINE.
            if s._announce_task is not None:
                s._announce_task.cancel()
            await announcer.announce_offline()  # blocks of the old range; the new range's ONLINE comes later
            await self._unload()
            try:
                backend = await s._load(target)
            except Exception:
                log.exception("loading blocks %s failed; reloading %s", target, old)
                target, backend = old, await s._load(old)
            s.blocks = servicer.blocks = announcer.blocks = target
            if s._peer_rtts is not None:
                s._peer_rtts.blocks = target
            await self._serve(backend)  # adapters re-read for the new blocks
            s._start_announce_loop()
        finally:
            self._end()
        log.info("moved from blocks %s to %s", old, target)

    async def pause(self, grace_s: float | None = None) -> Outcome:
        """Lend the hardware back: PAUSED, sessions drained (bounded by `grace_s`), weights and KV freed."""
        s = self.server
        if s.state == ServerState.PAUSED and not self.busy:
            return Outcome(False, "already paused; nothing to do (`pollen server resume` brings it back)")
        self._refuse_unless_idle("pause", ServerState.ONLINE)
        grace = s.config.drain_timeout_s if grace_s is None else grace_s
        t0 = self._begin("pausing")
        try:
            await self._stop_taking_sessions(ServerState.PAUSED, PAUSED_REASON)
            drained = await self._drain(grace, f"{PAUSED_REASON}: continue on another server", t0)
            await self._unload()
        finally:
            self._end()
        ms = (time.monotonic() - t0) * 1000
        log.info("paused in %.0f ms: %d sessions finished, %d closed, the last one left after %.0f ms; weights and "
                 "KV cache freed", ms, drained.finished, drained.closed, drained.gone_ms)  # fmt: skip
        return Outcome(True, f"paused: {drained.finished} sessions finished and {drained.closed} were closed "
                       f"(their clients continue elsewhere); weights and KV cache freed", ms, drained)  # fmt: skip

    async def resume(self) -> Outcome:
        """Reload the same blocks (nothing re-measured) and announce ONLINE with the same peer id."""
        s = self.server
        if s.state == ServerState.ONLINE and not self.busy:
            return Outcome(False, "already online; nothing to do")
        self._refuse_unless_idle("resume", ServerState.PAUSED)
        assert s.blocks is not None
        t0 = self._begin("resuming")
        try:
            backend = await s._load(s.blocks)  # on failure the server stays paused and the error is returned
            await self._serve(backend)
        finally:
            self._end()
        ms = (time.monotonic() - t0) * 1000
        log.info("resumed blocks %s in %.0f ms (ONLINE announced)", s.blocks, ms)
        return Outcome(True, f"online again with blocks {s.blocks} after {ms:.0f} ms", ms)

    # ---- shared steps ------------------------------------------------------------------------------------

    def _refuse_unless_idle(self, what: str, needed: ServerState) -> None:
        s = self.server
        if s._stopped:
            raise TransitionRefused(f"cannot {what}: the server is stopping")
        if self.busy:
            raise TransitionRefused(f"cannot {what} while the server is {self.busy}; try again when it is done")
        if s.state != needed:
            raise TransitionRefused(f"cannot {what} while the server is {s.state.value}; try again when it is "
                                    f"{needed.value}")  # fmt: skip

    def _begin(self, busy: str) -> float:
        self.busy = busy
        self.state_since = time.monotonic()
        return self.state_since

    def _end(self) -> None:
        self.busy = ""
        self.state_since = time.monotonic()

    async def _stop_taking_sessions(self, state: ServerState, reason: str) -> None:
        """Health NOT_SERVING, new opens refused with `reason` (UNAVAILABLE: clients go elsewhere), `state`
        announced so that routing stops sending sessions here."""
        s = self.server
        assert s._front is not None and s._announcer is not None and s.servicer is not None
        s.state = state
        s.servicer.unavailable_reason = reason
        await s._front.set_serving(False)
        s.cache.start_draining(reason)
        await s._announcer.announce(state, self._later_expiration())

    async def _serve(self, backend: BlockBackend) -> None:
        """Hand `backend` to the servicer, take sessions again, announce ONLINE, health SERVING."""
        s = self.server
        assert s._front is not None and s._announcer is not None and s.servicer is not None
        await s._serve_backend(backend)
        s.cache.stop_draining()
        s.servicer.unavailable_reason = ""
        s.state = ServerState.ONLINE
        await s._announcer.announce(ServerState.ONLINE, self._later_expiration())
        await s._front.set_serving(True)

    async def _drain(self, grace_s: float, close_reason: str, t0: float) -> DrainResult:
        """Let running sessions end within `grace_s`, then close the rest (their clients get NOT_FOUND with
        `close_reason` and replay elsewhere) and wait for their streams to unwind."""
        s = self.server
        before = s.cache.active_sessions
        await self.drain(grace_s)
        left = s.cache.close_all(close_reason)
        await self.drain(CLOSE_WAIT_S)
        return DrainResult(before - left, left, (time.monotonic() - t0) * 1000 if before else 0.0)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the open sessions to end; also used by stop()."""
        cache = self.server.cache
        deadline = time.monotonic() + timeout_s
        if cache.active_sessions:
            log.info("draining %d open sessions (up to %.1f s)", cache.active_sessions, timeout_s)
        while cache.active_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if cache.active_sessions:
            log.warning("%d sessions still open after %.1f s of draining", cache.active_sessions, timeout_s)

    async def _unload(self) -> None:
        """Drop the blocks and give their memory back: to the CUDA driver, or on CPU to the OS (glibc keeps
        freed heap pages for the process otherwise, so RSS would not drop). Run as a job on the worker: until
        the worker takes another job, its last one (a step, a load) keeps the old blocks referenced."""
        s = self.server
        assert s.servicer is not None
        backend, s.servicer.backend = s.servicer.backend, None
        s.servicer.limits = TuningLimits({}, 0)  # its adapters are weights too; _serve_backend sets them again
        span = backend.span if backend is not None else None
        if backend is not None:
            backend.released = True  # read on the worker: requests queued behind this job are refused clearly
        del backend
        await s.scheduler.run(_release_memory, span, s._device.type == "cuda")

    def _later_expiration(self) -> float:
        """Now + ttl, but later than anything announced before (an OFFLINE included, which is stored with the
        last expiration + 1 s): the DHT keeps the later-expiring value of a sub-key, so a state change must
        outlive the record it replaces."""
        s = self.server
        assert s._announcer is not None
        return max(time.time() + s.config.ttl_s, s._announcer.last_expiration + 1.0)


def _release_memory(span: nn.Module | None, cuda: bool) -> None:
    """On the worker, between two jobs (so no step or training job is using the blocks)."""
    if span is not None:
        # Empty the old blocks' tensors in place: whatever still references the modules (gRPC keeps the last
        # RPC's error with its traceback, whose frames hold the backend; a training stream between two
        # requests) then keeps empty shells, not the memory. Quantized weights keep side tensors: drop them too.
        for t in itertools.chain(span.parameters(), span.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            for side in ("CB", "SCB", "quant_state"):
                if getattr(t, side, None) is not None:
                    setattr(t, side, None)
    gc.collect()  # the sessions' KV caches and whatever cycles the unload left (objects frozen at start excepted)
    if cuda:
        torch.cuda.empty_cache()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc (musl, macOS): nothing to trim with
        pass
