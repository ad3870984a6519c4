"""Scheduler: the server's one torch worker thread and the queues that feed it.

Three queues, served in this order: control jobs (loading blocks, measurements), inference steps, and
Forward/Backward from fine-tuning clients. Training work only runs when no inference step waits, unless its
oldest request has waited longer than `training_max_wait_s` (so it is never starved either). Inference steps
that are waiting when the worker becomes free are taken together: single-token decode steps over the same
blocks run as one batched forward (decode.py) of up to `max_batch_tokens` rows; any other step (prefill,
padding mask, families without a batched path) runs alone. Prefill is not batched on purpose: it is compute-
bound already and batching it would only make decode steps queued behind it wait longer.
Whether batched decode is faster at all is measured at start-up (`ShardServer`); `batching=False` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from shard_server.backend import BlockBackend
from shard_server.cache import Session
from swarm.errors import CacheExhausted, ServerDraining

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_WINDOW_MAX_S = 0.01  # longest wait for the rest of a decode batch (see Scheduler._gather_window)


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Step:
    backend: BlockBackend
    session: Session
    position: int
    hidden: torch.Tensor  # [batch, new_tokens, hidden] as the client sent it (CPU)
    mask: torch.Tensor | None
    hypo_ids: torch.Tensor | None
    future: asyncio.Future[torch.Tensor]
    abandoned: bool = False  # the stream went away before the worker took the step

    @property
    def batchable(self) -> bool:
        return self.hidden.shape[1] == 1 and self.mask is None and self.backend.can_batch(self.session.blocks)


class Scheduler:
    def __init__(
        self,
        max_batch_tokens: int,
        batching: bool = True,
        max_queued: int = 64,
        training_max_wait_s: float = 1.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.max_queued = max_queued  # Forward/Backward requests waiting; each holds its input in memory
        self.training_max_wait_s = training_max_wait_s
        self.on_batch = on_batch  # (rows, seconds) per executed inference batch, called on the worker
        self._control: deque[_Job] = deque()
        self._steps: deque[_Step] = deque()
        self._training: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch_rows = 0  # rows (~sessions) of the last batched decode, for the gather window
        self._last_batch_s = 0.0
        self._thread = threading.Thread(target=self._run_worker, name="shard-torch", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._control) + len(self._steps) + len(self._training)

    # ---- event-loop side ------------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker ahead of all client work (loading, measuring, freeing)."""
        job = _Job(fn, args, asyncio.get_running_loop().create_future())
        self._put(self._control, job)
        return await job.future  # type: ignore[no-any-return]

    async def run_training(self, fn: Callable[..., T], *args: Any) -> T:
        """A Forward/Backward: lower priority than inference steps; refused when too many already wait."""
        if len(self._training) >= self.max_queued:
            raise CacheExhausted(
                f"server overloaded: {len(self._training)} Forward/Backward requests are queued (limit "
                f"{self.max_queued}); retry later or use another server"
            )
        job = _Job(fn, args, asyncio.get_running_loop().create_future())
        self._put(self._training, job)
        return await job.future  # type: ignore[no-any-return]

    async def step(
        self,
        backend: BlockBackend,
        session: Session,
        position: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        hypo_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """One inference step of `session`; may run batched with other sessions' steps."""
        step = _Step(backend, session, position, hidden, mask, hypo_ids, asyncio.get_running_loop().create_future())
        self._put(self._steps, step)
        session.inflight = step.future
        try:
            # shield: if the stream is cancelled, the worker may still be writing this session's cache, and
            # `settled` must be able to wait for that
            return await asyncio.shield(step.future)
        except asyncio.CancelledError:
            step.abandoned = True  # skipped if the worker has not taken it yet
            raise

    async def settled(self, session: Session, timeout_s: float = 60.0) -> None:
        """Wait until no step of `session` is running on the worker (returns at once in the normal case)."""
        future = session.inflight
        if future is not None and not future.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(future), timeout_s)

    def close(self) -> None:
        """Fail everything still queued and let the worker exit after its current item."""
        with self._cond:
            self._closed = True
            pending = [*self._control, *self._steps, *self._training]
            self._control.clear()
            self._steps.clear()
            self._training.clear()
            self._cond.notify()
        for item in pending:
            _deliver(item.future, ServerDraining("server stopped before this request ran"), failed=True)

    def _put(self, queue: deque[Any], item: Any) -> None:
        with self._cond:
            if self._closed:
                raise ServerDraining("server is stopping; use another server")
            queue.append(item)
            self._cond.notify()

    # ---- worker side ----------------------------------------------------------------------------------

    def _run_worker(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._control or self._steps or self._training):
                    self._cond.wait()
                if self._closed:
                    return
                work = self._take()
            if isinstance(work, _Job):
                self._run_job(work)
            else:
                self._run_steps(work)

    def _take(self) -> _Job | list[_Step]:
        """Pick the next item under the lock (see the module docstring for the order)."""
        if self._control:
            return self._control.popleft()
        if self._training and (
            not self._steps or time.monotonic() - self._training[0].enqueued_at > self.training_max_wait_s
        ):
            return self._training.popleft()
        if self.batching and self._steps[0].batchable:
            self._gather_window()
        first = self._steps.popleft()
        if not (self.batching and first.batchable):
            return [first]
        batch, rows = [first], first.hidden.shape[0]
        rest: deque[_Step] = deque()
        while self._steps:
            step = self._steps.popleft()
            if (
                step.batchable
                and step.backend is first.backend
                and step.session.blocks == first.session.blocks
                and rows + step.hidden.shape[0] <= self.max_batch_tokens
            ):
                batch.append(step)
                rows += step.hidden.shape[0]
            else:
                rest.append(step)
        self._steps.extendleft(reversed(rest))  # the others keep their order
        return batch

    def _gather_window(self) -> None:
        """Wait briefly for the rest of the sessions that decoded in the last batch.

        Their clients send the next step as soon as they get the previous reply, so those steps arrive within a
        millisecond or two of each other; taking only the first one would split one batch into several small
        ones, each paying the full weight-streaming cost. The wait is bounded by a quarter of the last batch's
        time (and BATCH_WINDOW_MAX_S), and skipped when nobody else was decoding.
        """
        deadline = time.monotonic() + min(BATCH_WINDOW_MAX_S, 0.25 * self._last_batch_s)
        while len(self._steps) < self._last_batch_rows and not self._control:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _run_job(self, job: _Job) -> None:
        if job.future.cancelled():
            return
        try:
            result = job.fn(*job.args)
        except BaseException as e:  # noqa: BLE001 — handed to the awaiting coroutine
            _deliver(job.future, e, failed=True)
        else:
            _deliver(job.future, result)

    def _run_steps(self, steps: list[_Step]) -> None:
        for s in steps:
            if s.abandoned:  # a client that hung up needs no answer; resolve it so `settled` returns
                _deliver(s.future, None)
        steps = [s for s in steps if not s.abandoned]
        if not steps:
            return
        t0 = time.perf_counter()
        if len(steps) > 1 or steps[0].batchable:
            try:
                outs = steps[0].backend.decode_batch(
                    steps[0].session.blocks, [(s.session, s.position, s.hidden, s.hypo_ids) for s in steps]
                )
            except Exception:  # noqa: BLE001 — retried one by one below, where the error belongs to one step
                log.warning("batched step of %d sessions failed; running them one by one", len(steps), exc_info=True)
            else:
                rows = sum(s.hidden.shape[0] for s in steps)
                self._last_batch_rows, self._last_batch_s = rows, time.perf_counter() - t0
                self._report(rows, t0)  # before the replies: tests read it
                for s, out in zip(steps, outs, strict=True):
                    _deliver(s.future, out)
                return
        for s in steps:
            t0 = time.perf_counter()
            try:
                out = s.backend.session_step(s.session, s.position, s.hidden, s.mask, s.hypo_ids)
            except BaseException as e:  # noqa: BLE001
                _deliver(s.future, e, failed=True)
            else:
                self._report(s.hidden.shape[0], t0)
                _deliver(s.future, out)

    def _report(self, rows: int, t0: float) -> None:
        if self.on_batch is not None:
            self.on_batch(rows, time.perf_counter() - t0)


def _deliver(future: asyncio.Future[Any], value: Any, failed: bool = False) -> None:
    """Hand a result (or an exception) to the event loop that awaits `future`."""

    def settle() -> None:
        if future.done():
            return  # cancelled meanwhile
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more
