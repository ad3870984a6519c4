"""Scheduler: the server's one torch worker thread and the queues that feed it.

Three queues, served in this order: control jobs (loading blocks, measurements), inference steps, and
Forward/Backward from fine-tuning clients. Training work runs only when no inference step waits, unless its
oldest request has waited longer than `training_max_wait_s` (so it is never starved either).

Forward/Backward requests wait in a queue bounded twice: by count (`max_queued`) and by the bytes of their
input tensors (`max_queued_bytes`); over either the request is refused with Overloaded (one request is always
let into an empty queue, so a large one still runs). Inference steps need no such bound: each session has at
most one step here (its stream waits for the result), and sessions are bounded by the cache budget.

Batching is decided here, once, by one rule: the inference steps waiting when the worker becomes free are taken
in arrival order, every step over the same blocks joins the first one's batch while the batch stays within
`max_batch_tokens` rows (batch x new tokens), and the batch runs as one `BlockBackend.step`. Decode steps,
prefills and left-padded steps all batch alike. Whether batching is faster at all is measured at start-up
(`startup.measure_throughput`); `batching=False` runs every step alone.

A lone session's small step may skip the worker (`run_now`): when the worker is idle, nothing is queued and no
other session is open, nothing could batch with it, and handing it to the worker and back (a futex wake-up of
the worker, a self-pipe wake-up of the event loop, two Futures) would cost each token two thread switches, which
on a busy machine means two waits for a core. The step then runs on the event loop's thread, the worker waits
meanwhile (so the model still runs on one thread at a time), and the event loop is blocked for at most one small
step (INLINE_MAX_ROWS).
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

from shard_server.backend import BlockBackend, StepItem
from swarm.errors import Overloaded, ServerDraining

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_WINDOW_MAX_S = 0.01  # longest wait for the rest of a batch (see Scheduler._gather_window)
INLINE_MAX_ROWS = 32  # largest step (batch x new tokens) `run_now` runs on the event loop (decode, short prefill)

# on_batch(steps, rows, seconds): called on the worker after each executed inference batch
BatchHook = Callable[[int, int, float], None]


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    nbytes: int = 0  # input tensor bytes held while queued (Forward/Backward)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class PendingStep:
    """An inference step handed to the worker. `result()` waits for its output; `settled()` waits until the
    worker is done with the step's KV cache even if the waiter went away (before its bytes are released)."""

    backend: BlockBackend
    item: StepItem
    future: asyncio.Future[torch.Tensor]
    abandoned: bool = False  # the stream went away before the worker took the step: skip it

    async def result(self) -> torch.Tensor:
        try:
            # shield: if the stream is cancelled, the worker may still be writing this session's cache, and
            # `settled` must be able to wait for that
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.abandoned = True
            raise

    async def settled(self, timeout_s: float = 60.0) -> None:
        if not self.future.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self.future), timeout_s)


class Scheduler:
    def __init__(
        self,
        max_batch_tokens: int,
        batching: bool = True,
        max_queued: int = 64,
        training_max_wait_s: float = 1.0,
        on_batch: BatchHook | None = None,
        max_queued_bytes: int = 256 << 20,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.max_queued = max_queued  # Forward/Backward requests waiting; each holds its input in memory
        self.max_queued_bytes = max_queued_bytes  # ...and the bytes of those inputs
        self.training_bytes = 0  # input bytes of the queued Forward/Backward requests (changed under _cond)
        self.training_max_wait_s = training_max_wait_s
        self.on_batch = on_batch
        self._control: deque[_Job] = deque()
        self._steps: deque[PendingStep] = deque()
        self._training: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # the worker (or `run_now` on the event loop) is running something
        self._last_batch_steps = 0  # steps (sessions) in the last batch, for the gather window
        self._last_batch_s = 0.0
        # torch's thread count is per thread (OpenMP's setting, MKL's): torch.set_num_threads in the event loop's
        # thread does not bind this worker, which would start with one OpenMP thread per core, spinning between
        # steps. So the worker adopts the count of the thread that hands it work (see `_put`).
        self._threads = torch.get_num_threads()  # wanted on the worker (changed under _cond)
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

    async def run_training(self, fn: Callable[..., T], *args: Any, nbytes: int = 0) -> T:
        """A Forward/Backward holding `nbytes` of input: lower priority than inference steps; refused when too
        many requests or bytes already wait."""
        job = _Job(fn, args, asyncio.get_running_loop().create_future(), nbytes)
        with self._cond:
            if len(self._training) >= self.max_queued:
                raise Overloaded(
                    f"server overloaded: {len(self._training)} Forward/Backward requests are queued (limit "
                    f"{self.max_queued}); retry later or use another server"
                )
            if self._training and self.training_bytes + nbytes > self.max_queued_bytes:
                raise Overloaded(
                    f"server overloaded: {self.training_bytes} bytes of Forward/Backward input are queued and this "
                    f"request adds {nbytes} (limit {self.max_queued_bytes}); retry later or use another server"
                )
            self.training_bytes += nbytes
            try:
                self._put(self._training, job)
            except BaseException:
                self.training_bytes -= nbytes
                raise
        return await job.future  # type: ignore[no-any-return]

    def submit(self, backend: BlockBackend, item: StepItem) -> PendingStep:
        """Queue one inference step; it may run batched with other sessions' steps."""
        step = PendingStep(backend, item, asyncio.get_running_loop().create_future())
        self._put(self._steps, step)
        return step

    def run_now(self, backend: BlockBackend, item: StepItem) -> torch.Tensor | None:
        """Run one small step at once on this (the event loop's) thread if the worker is idle and nothing is
        queued; None if not (then `submit` it). The caller knows that no other session could batch with it."""
        if item.rows > INLINE_MAX_ROWS:
            return None
        with self._cond:
            if self._busy or self._closed or self._control or self._steps or self._training:
                return None
            self._busy = True  # the worker takes nothing until this step is done
        try:
            t0 = time.perf_counter()
            (out,) = backend.step([item])
            elapsed = time.perf_counter() - t0
            self._last_batch_steps, self._last_batch_s = 1, elapsed
            if self.on_batch is not None:
                self.on_batch(1, item.rows, elapsed)
            return out
        finally:
            with self._cond:
                self._busy = False
                if self._control or self._steps or self._training:  # queued meanwhile: the worker's now
                    self._cond.notify()  # (only then: a needless wake-up costs the worker a switch and the GIL)

    def close(self) -> None:
        """Fail everything still queued and let the worker exit after its current item (see `join`)."""
        with self._cond:
            self._closed = True
            pending: list[_Job | PendingStep] = [*self._control, *self._steps, *self._training]
            self._control.clear()
            self._steps.clear()
            self._training.clear()
            self.training_bytes = 0
            self._cond.notify()
        for item in pending:
            _deliver(item.future, ServerDraining("server stopped before this request ran"), failed=True)

    async def join(self, timeout_s: float) -> bool:
        """After `close`: wait (off the event loop) for the worker to finish its current item; True if it
        exited. A process must not end while the worker runs torch code: at interpreter exit such a thread
        is killed as it retakes the GIL, inside a C++ destructor, and the process aborts (SIGABRT, "terminate
        called without an active exception")."""
        await asyncio.to_thread(self._thread.join, timeout_s)
        return not self._thread.is_alive()

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    def _put(self, queue: deque[Any], item: Any) -> None:
        with self._cond:
            if self._closed:
                raise ServerDraining("server is stopping; use another server")
            self._threads = torch.get_num_threads()  # a few ns; follows a later torch.set_num_threads too
            queue.append(item)
            self._cond.notify()

    # ---- worker side ----------------------------------------------------------------------------------

    def _run_worker(self) -> None:
        applied = 0  # the thread count set on this thread (0: none yet: the process default is one per core)
        while True:
            with self._cond:
                while not (self._closed or (not self._busy and (self._control or self._steps or self._training))):
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True  # before _take: its gather window lets go of the lock
                work = self._take()
                threads = self._threads
            try:
                if threads != applied:
                    torch.set_num_threads(threads)  # this thread's own OpenMP/MKL setting
                    applied = threads
                if isinstance(work, _Job):
                    self._run_job(work)
                else:
                    self._run_steps(work)
            finally:
                with self._cond:
                    self._busy = False

    def _take(self) -> _Job | list[PendingStep]:
        """Pick the next item under the lock (see the module docstring for the order and the batching rule)."""
        if self._control:
            return self._control.popleft()
        if self._training and (
            not self._steps or time.monotonic() - self._training[0].enqueued_at > self.training_max_wait_s
        ):
            job = self._training.popleft()
            self.training_bytes -= job.nbytes
            return job
        if not self.batching:
            return [self._steps.popleft()]
        self._gather_window()
        first = self._steps.popleft()
        batch, rows = [first], first.item.rows
        rest: deque[PendingStep] = deque()
        while self._steps:
            step = self._steps.popleft()
            if (
                step.backend is first.backend
                and step.item.kv.blocks == first.item.kv.blocks
                and rows + step.item.rows <= self.max_batch_tokens
            ):
                batch.append(step)
                rows += step.item.rows
            else:
                rest.append(step)
        self._steps.extendleft(reversed(rest))  # the others keep their order
        return batch

    def _gather_window(self) -> None:
        """Wait briefly for the rest of the sessions that ran in the last batch.

        Their clients send the next step as soon as they get the previous reply, so those steps arrive within a
        millisecond or two of each other; taking only the first one would split one batch into several small
        ones, each paying the full weight-streaming cost. The wait is bounded by a quarter of the last batch's
        time (and BATCH_WINDOW_MAX_S), and skipped when nobody else was stepping.
        """
        deadline = time.monotonic() + min(BATCH_WINDOW_MAX_S, 0.25 * self._last_batch_s)
        while len(self._steps) < self._last_batch_steps and not self._control:
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

    def _run_steps(self, steps: list[PendingStep]) -> None:
        for s in steps:
            if s.abandoned:  # a client that hung up needs no answer; resolve it so `settled` returns
                _deliver(s.future, None)
        steps = [s for s in steps if not s.abandoned]
        if not steps:
            return
        t0 = time.perf_counter()
        try:
            outs = steps[0].backend.step([s.item for s in steps])
        except Exception as e:  # noqa: BLE001 — handed to the awaiting coroutine(s)
            if len(steps) == 1:
                _deliver(steps[0].future, e, failed=True)
                return
            # Run them one by one, where an error belongs to one step (positions are explicit and a reorder is
            # applied once, so re-running a step that already wrote part of its cache gives the same result).
            log.warning("a step batch of %d sessions failed; running them one by one", len(steps), exc_info=True)
            for s in steps:
                self._run_steps([s])
            return
        elapsed = time.perf_counter() - t0
        self._last_batch_steps, self._last_batch_s = len(steps), elapsed
        if self.on_batch is not None:
            self.on_batch(len(steps), sum(s.item.rows for s in steps), elapsed)  # before the replies: tests read it
        for s, out in zip(steps, outs, strict=True):
            _deliver(s.future, out)


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
