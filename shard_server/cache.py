"""SessionCache: the server's KV-cache memory manager. One byte budget for all sessions on the server.

A session reserves the KV bytes of `max_length × batch_size` tokens over its blocks when it opens, and its
preallocated KV cache (`swarm.models.KVCache`, allocated at its first step) can never use more, so the sum of
reservations bounds real memory: clients cannot make the server run out of memory, however many sessions they
open. When the budget (or the session limit) is full, `open` waits in FIFO order up to the alloc timeout, then
fails with RESOURCE_EXHAUSTED saying how much was asked and how much is free. Only the event loop touches this
object; the KV tensors themselves are created and written on the worker thread.

A full cache need not turn newcomers away: with `evict_idle_after_s` > 0, an open that does not fit first evicts
sessions idle at least that long, idle longest first, as many as needed, and only if evicting them really makes
room (`pick_evictions`, a pure function). Idle means no step in flight and the last one ended that long ago, so a
session mid-step is never evicted. An evicted session's stream ends with SessionEvicted (NOT_FOUND, retryable):
its client reopens, on this server or another, and replays its history as in failover, so its output stays exact;
what eviction costs is one replayed prefill, later, for a client that was not using its cache, instead of a
refusal now for one that wants to work. A waiting open re-checks whenever an open session becomes old enough.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shard_server.backend import KvHandle
from shard_server.session import Session, pick_evictions
from swarm.blocks import BlockRange
from swarm.errors import CacheExhausted, ServerDraining, SessionEvicted

log = logging.getLogger(__name__)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(eq=False)
class _Waiter:
    need_bytes: int
    future: asyncio.Future[None]
    session_id: str = ""  # for the eviction log line


class SessionCache:
    def __init__(
        self,
        budget_bytes: int = 0,
        token_bytes_per_block: int = 1,
        held_blocks: int = 1,
        max_sessions: int = 1 << 20,
        alloc_timeout_s: float = 0.0,
        evict_idle_after_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,  # the sessions' `last_active` clock; tests pass their own
    ) -> None:
        self.max_sessions = max_sessions
        self.alloc_timeout_s = alloc_timeout_s
        self.evict_idle_after_s = evict_idle_after_s  # 0: never evict, newcomers wait (and maybe fail) instead
        self.clock = clock
        self.evictions = 0  # sessions evicted so far
        self.on_evict: Callable[[Session], None] | None = None  # e.g. a metrics counter
        self.set_budget(budget_bytes, token_bytes_per_block, held_blocks)
        self._used_bytes = 0
        self._admitted = 0  # sessions open + granted but not yet registered (the session limit counts both)
        self._sessions: dict[int, Session] = {}
        self._handles = itertools.count(1)
        self._waiters: deque[_Waiter] = deque()
        self._draining = False
        self._draining_reason = ""

    def set_budget(self, budget_bytes: int, token_bytes_per_block: int, held_blocks: int) -> None:
        """Size the budget once the blocks are loaded and a token's KV bytes are measured."""
        self.budget_bytes = max(0, budget_bytes)
        self.token_bytes_per_block = max(1, token_bytes_per_block)
        self.held_blocks = max(1, held_blocks)

    # ---- figures (announced, exported as metrics) ---------------------------------------------------

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token through all held blocks."""
        return self.token_bytes_per_block * self.held_blocks

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.token_bytes

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self._used_bytes

    @property
    def tokens_left(self) -> int:
        return max(0, self.free_bytes) // self.token_bytes

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def allocated_bytes(self) -> int:
        """Bytes of KV buffers that really exist now (<= used_bytes; buffers appear at a session's first step).
        Safe from another thread (/metrics): it walks a copy of the sessions."""
        return sum(s.kv.nbytes for s in list(self._sessions.values()))

    # ---- admission --------------------------------------------------------------------------------------

    async def open(
        self,
        session_id: str,
        blocks: BlockRange,
        max_length: int,
        batch_size: int,
        timeout_s: float | None = None,
        extra_bytes: int = 0,
    ) -> Session:
        """Admit a session, waiting up to the alloc timeout for room; the caller must `release` it.

        `extra_bytes`: what else the session keeps on the server for its life (the client's LoRA weights); it is
        reserved from the same budget as the cache, so no client can grow the server's memory past it.
        Raises ServerDraining while shutting down or moving, CacheExhausted when the budget stays full.
        """
        if self._draining:
            raise ServerDraining(self._draining_reason)
        tokens = max_length * batch_size
        need = tokens * self.token_bytes_per_block * len(blocks) + extra_bytes
        what = f"session {session_id!r} asks for {tokens} cache tokens (max_length {max_length} x batch {batch_size})"
        if extra_bytes:
            what += f" + {format_bytes(extra_bytes)} of LoRA weights"
        if need > self.budget_bytes:
            raise CacheExhausted(
                f"{what} = {format_bytes(need)} over blocks {blocks} but only {self.tokens_left} of "
                f"{self.budget_tokens} are free, and it can never fit: that is more than this server's whole cache "
                f"budget ({format_bytes(self.budget_bytes)}); ask for a shorter max_length or another server"
            )
        timeout = self.alloc_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        if not self._waiters and (self._fits(need) or self._evict_for(need, session_id)):
            self._admit(need)  # the fast path: no waiting, no future
        else:
            waiter = _Waiter(need, asyncio.get_running_loop().create_future(), session_id)
            self._waiters.append(waiter)
            try:
                await self._wait(waiter, t0 + timeout)
            except TimeoutError:
                self._abandon(waiter)
                raise CacheExhausted(
                    f"{what} but {self._why_full()} ({format_bytes(self.free_bytes)} of "
                    f"{format_bytes(self.budget_bytes)} free) after waiting {time.monotonic() - t0:.1f} s; "
                    f"try another server or later"
                ) from None
            except asyncio.CancelledError:
                self._abandon(waiter)
                raise
        kv = KvHandle(blocks, batch_size, max_length)
        session = Session(
            next(self._handles), session_id, blocks, max_length, batch_size, tokens, need, kv, last_active=self.clock()
        )
        self._sessions[session.handle] = session
        log.info(
            "session %s opened: blocks %s, max_length %d, batch %d, %d cache tokens left",
            session_id, blocks, max_length, batch_size, self.tokens_left,
        )  # fmt: skip
        return session

    def release(self, session: Session) -> None:
        """Free the session's reservation and drop its KV tensors; idempotent."""
        if self._free(session):
            log.info("session %s closed after %d tokens; %d cache tokens left", session.session_id, session.length,
                     self.tokens_left)  # fmt: skip
            self._grant_waiters()
            self._evict_for_waiters()  # what is free now plus an idle session's room may be enough for the head

    def _free(self, session: Session) -> bool:
        if self._sessions.pop(session.handle, None) is None:
            return False
        self._used_bytes -= session.reserved_bytes
        self._admitted -= 1
        session.kv.cache = None
        session.lora = None  # the worker is done with it (its last step settled, or it has none in flight)
        return True

    # ---- eviction of idle sessions ------------------------------------------------------------------------

    def _evict_for(self, need: int, for_whom: str) -> bool:
        """Evict idle sessions so that `need` bytes fit (see `pick_evictions`); False if that cannot make room."""
        now = self.clock()
        victims = pick_evictions(
            self._sessions.values(), need, self.free_bytes, self.max_sessions - self._admitted,
            self.evict_idle_after_s, now,
        )  # fmt: skip
        if not victims:
            return False
        for session in victims:
            idle_s = now - session.last_active
            log.info("session %s evicted after %.1f s idle: %s (%d cache tokens) freed for session %s",
                     session.session_id, idle_s, format_bytes(session.reserved_bytes), session.reserved_tokens,
                     for_whom)  # fmt: skip
            session.close(
                f"session {session.session_id} was idle for {idle_s:.1f} s and was evicted (its cache freed) to "
                f"make room for another session: open a new session and replay its history",
                SessionEvicted,
            )
            # No step is in flight (evictable), so nothing writes its KV: its bytes go back now, not when its
            # handler gets round to the cancellation (its `release` is then a no-op).
            self._free(session)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(session)
        return True

    def _evict_for_waiters(self) -> None:
        """Make room for the head of the queue by eviction, then the next, while that works."""
        for _ in range(len(self._waiters)):
            if not self._waiters or self._fits(self._waiters[0].need_bytes):
                return  # nobody waits, or the head is being granted by _grant_waiters
            head = self._waiters[0]
            if not self._evict_for(head.need_bytes, head.session_id):
                return
            self._grant_waiters()

    def _next_evictable_in(self) -> float:
        """Seconds until one more open session may become evictable (inf with eviction off): those evictable now
        did not make room. A session mid-step (or still setting up) counts from now: it cannot be sooner."""
        after = self.evict_idle_after_s
        if after <= 0:
            return float("inf")
        now = self.clock()
        later = [
            (now if s.in_step or s.task is None or s.task.done() else s.last_active) + after - now
            for s in self._sessions.values()
            if not s.closed_reason and not s.evictable(after, now)
        ]
        return max(0.0, min(later, default=after))

    async def _wait(self, waiter: _Waiter, deadline: float) -> None:
        """Wait in the queue until granted; meanwhile, whenever an open session becomes idle long enough, try to
        make room by eviction. TimeoutError at `deadline` (time.monotonic)."""
        while True:
            self._evict_for_waiters()
            if waiter.future.done():
                waiter.future.result()  # raises ServerDraining if the server started draining
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            # Wake at the next moment a session may become evictable (a little after, so that it has), or at
            # the deadline. shield: a timeout must not cancel a grant that is being handed over at that moment.
            wake = min(left, self._next_evictable_in() + 0.01)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), wake)
            except TimeoutError:
                continue
            return

    def close_idle(self, timeout_s: float, now: float | None = None) -> int:
        """End sessions with no step for `timeout_s` (none in flight); returns how many. Their streams free them on
        the way out."""
        now = time.monotonic() if now is None else now
        idle = [
            s
            for s in self._sessions.values()
            if now - s.last_active > timeout_s and not s.closed_reason and not s.in_step
        ]
        for session in idle:
            log.info("session %s idle for %.0f s: closing it", session.session_id, now - session.last_active)
            session.close(f"session {session.session_id} was idle for more than {timeout_s:.0f} s and was closed "
                          f"by the server (its cache is freed); open a new session and replay")  # fmt: skip
        return len(idle)

    def close_all(self, reason: str) -> int:
        sessions = list(self._sessions.values())
        for session in sessions:
            session.close(reason)
        return len(sessions)

    def start_draining(
        self, reason: str = "server is shutting down and accepts no new sessions; use another server"
    ) -> None:
        """Refuse new sessions (and fail the waiting ones) with `reason` until `stop_draining`; running sessions go
        on."""
        self._draining, self._draining_reason = True, reason
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(ServerDraining(reason))

    def stop_draining(self) -> None:
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def _fits(self, need: int) -> bool:
        return self._used_bytes + need <= self.budget_bytes and self._admitted < self.max_sessions

    def _admit(self, need: int) -> None:
        self._used_bytes += need
        self._admitted += 1

    def _why_full(self) -> str:
        if self._admitted >= self.max_sessions:
            return f"{self.active_sessions} sessions are open (limit {self.max_sessions})"
        return f"only {self.tokens_left} of {self.budget_tokens} are free"

    def _grant_waiters(self) -> None:
        # FIFO without overtaking: a big request at the head is not starved by a stream of small ones
        # (it is bounded by its own alloc timeout, after which the next waiter gets its turn).
        while self._waiters and self._fits(self._waiters[0].need_bytes):
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._admit(waiter.need_bytes)
                waiter.future.set_result(None)

    def _abandon(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            # Already granted (the grant raced with the timeout or a cancel): give the reservation back.
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._used_bytes -= waiter.need_bytes
                self._admitted -= 1
                self._grant_waiters()
