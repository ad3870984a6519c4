"""InferenceSession: a KV-cached session across a chain of spans that survives servers going away.

`step(hidden)` sends hidden states through the spans and returns the last span's output; each span's share is
one `_span_step`, in both modes below. Every span keeps the inputs its server confirmed (`SpanStream.history`,
records of `StepInput`). When a server fails (broken stream, error reply, timeout, corrupt tensor), the session
bans it, asks the router for a replacement chain for exactly the lost blocks, replays that span's history there
in one message (the current step's input appended) to rebuild the KV cache, and carries on, so the outputs are
the same as without the failure. Failovers are bounded by time, not by a count (`failover_budget_s`, from a
step's first failure): under churn a session may meet several dead servers whose DHT records have not expired
yet, each banned and skipped at once, and it keeps going as long as some route exists within the budget.

With `push`, the client writes each step to the first server only, and every server forwards its output
to the next one itself (client -> A -> B -> client); servers still return their outputs to the client, for
history. A failed push is reported by the pushing server (`push_failed`), and the client then sends that
hop itself; a server that dies is noticed from its broken stream at once, never from a long timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from client_sdk.routing import Span
from client_sdk.span_stream import SpanError, SpanStream, StepInput, bad_reply, consolidate
from client_sdk.transport import ChannelPool, rpc_error
from client_sdk.tuning import Tuning
from client_sdk.verify import OutputVerifier
from swarm.errors import PollenError, SessionEvicted
from swarm.pb import shard_pb2
from swarm.tensors import to_proto

log = logging.getLogger(__name__)

MIN_ROUTE_POLL_S = 0.2  # between two route requests that found nothing: records and bans change over seconds


@dataclass(frozen=True)
class SessionRouter:
    """How a session finds replacement spans and reports who failed (the client's SwarmView behind it)."""

    route: Callable[[int, int], Awaitable[list[Span]]]  # a fresh chain for blocks [start, end)
    on_failure: Callable[[str], object]  # ban this peer_id
    backoff_s: Callable[[int], float] = lambda attempt: 0.0  # sleep before retry number `attempt`


@dataclass
class Failover:
    """One recovery, for logs, tests and benchmarks."""

    span: str  # the failed span, "start:end@address"
    error: str
    replacement: list[str]
    at_position: int
    seconds: float = 0.0  # from the failure until the replacement caught up


class InferenceSession:
    """Use `async with` or `open()` / `close()`; `step()` as many times as max_length allows."""

    def __init__(
        self,
        pool: ChannelPool,
        model_id: str,
        route: Sequence[Span],
        max_length: int,
        batch_size: int = 1,
        step_timeout_s: float = 30.0,
        open_timeout_s: float = 30.0,
        session_id: str | None = None,
        router: SessionRouter | None = None,
        push: bool = False,
        tuning: Tuning | None = None,
        failover_budget_s: float = 60.0,
        verifier: OutputVerifier | None = None,
    ) -> None:
        if not route:
            raise ValueError("an inference session needs at least one span")
        self.pool = pool
        self.model_id = model_id
        self.route = list(route)
        self.max_length = max_length
        self.batch_size = batch_size
        self.step_timeout_s = step_timeout_s
        self.open_timeout_s = open_timeout_s
        self.session_id = session_id or uuid.uuid4().hex
        self.router = router
        self.failover_budget_s = failover_budget_s  # seconds of failovers per step (or open), from its first failure
        self.push = push
        self.tuning = tuning  # adapter and client LoRA, sent to every span at open (its blocks' share)
        self.verifier = verifier  # checks a random share of span steps on other servers (verify.py)
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed by every span
        self.failovers: list[Failover] = []
        self._failures = 0  # in the current step (or open)
        self._failing_since: float | None = None  # monotonic time of the current step's first failure

    @property
    def spans(self) -> list[Span]:
        return [s.span for s in self.streams]

    async def open(self) -> None:
        """Open every span's stream concurrently; a span that fails to open is re-routed like a failure."""
        results = await asyncio.gather(*(self._open(s) for s in self.route), return_exceptions=True)
        self.streams = []
        for result in results:
            if isinstance(result, SpanStream):
                self.streams.append(result)
            elif isinstance(result, SpanError):
                stream = result.stream
                stream.error = result
                self.streams.append(stream)
            else:
                await self.close()
                raise result
        try:
            self._failures, self._failing_since = 0, None
            i = 0
            while i < len(self.streams):
                error = self.streams[i].error
                if error is None:
                    i += 1
                else:
                    await self._replace(i, error)
        except BaseException:
            await self.close()
            raise
        log.debug("session %s opened on %s", self.session_id, " -> ".join(map(str, self.spans)))

    async def _open(self, span: Span) -> SpanStream:
        tuning = None if self.tuning is None else self.tuning.for_span(span.start, span.end, prompts=False)
        return await SpanStream.open(
            self.pool, span, self.model_id, self.session_id, self.max_length, self.batch_size, self.open_timeout_s,
            tuning,
        )  # fmt: skip

    async def step(
        self,
        hidden: torch.Tensor,  # [batch, new_tokens, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, position + new_tokens]
        hypo_ids: torch.Tensor | None = None,  # int64 [batch]: beam search reorders cache rows first
        prompts: torch.Tensor | None = None,  # deep prompts [num_blocks, batch or 1, pre_seq_len, hidden] (prefill)
    ) -> torch.Tensor:  # [batch, new_tokens, hidden]
        """Run `hidden` through every span in order (the hot path), recovering from failed servers.

        Each span gets the previous span's output. With push, the client writes to the first server only and
        reads every server's reply; otherwise (or once something failed in this step) it writes each span's
        input itself. Either way each span goes through `_span_step`. A step with deep prompts is never pushed:
        the prompts differ per span, and a pushed step carries none.
        """
        if not self.streams:
            raise RuntimeError("session is not open (or was closed)")
        n = hidden.shape[1]
        if self.position + n > self.max_length:
            raise ValueError(f"step would reach {self.position + n} tokens, over max_length {self.max_length}")
        if attention_mask is not None and attention_mask.shape != (hidden.shape[0], self.position + n):
            raise ValueError(f"attention_mask must be [batch, {self.position + n}]")
        self._failures, self._failing_since = 0, None
        x = StepInput(uuid.uuid4().hex, hidden, self.position, attention_mask, hypo_ids, prompts)  # span i's input
        push = self.push and len(self.streams) > 1 and prompts is None
        push = push and all(s.error is None and s.position == self.position for s in self.streams)
        full: torch.Tensor | None = None  # [batch, position + n, hidden]: the last span's output, if replayed
        i = 0
        while i < len(self.streams):
            stream = self.streams[i]
            if stream.error is not None:
                await self._replace(i, stream.error)  # raises when out of retries
                push = False  # the rest of this step goes client -> server -> client
                continue
            # A replacement server (its cache behind the session's) gets its span's whole history at once.
            inp = x if stream.position == self.position else stream.replay(x, full)
            try:
                out = await self._span_step(i, inp, push)
            except SpanError as e:
                e.stream.error = e
                push = False
                continue
            if await self._outvoted(i, inp, out, prompts):
                push = False  # stream i is replaced at the top of the loop; its steps are redone there
                continue
            full = out if inp.position < x.position else None
            x = dataclasses.replace(x, hidden=out[:, -n:])
            i += 1
        self.position += n
        return x.hidden

    async def _span_step(self, i: int, inp: StepInput, push: bool) -> torch.Tensor:
        """One span's share of a step: deliver `inp` to stream i, read and check the reply, record `inp` in the
        span's history. Returns the output [batch, tokens, hidden]. With `push`, the client writes to the first
        server only, naming the rest of the chain (each server pushes its output on to the next), and writes to
        a later one only if the push to it failed."""
        stream = self.streams[i]
        if not (push and i > 0) or not await self._push_arrives(i, inp.step_id):
            hops = [s.hop() for s in self.streams[i + 1 :]] if push else []
            # a server ignores a step_id it already got pushed
            await stream.write(step_request(inp, hops, stream.span))
        reply = await stream.read_step(inp.step_id, self.step_timeout_s)
        out = stream.decode(reply, inp)
        stream.confirm(inp)
        return out

    async def _outvoted(self, i: int, inp: StepInput, out: torch.Tensor, prompts: torch.Tensor | None) -> bool:
        """Maybe (verify_fraction) check span i's output on other servers; True if two of them outvoted it.
        Its stream then fails (replaced, its history replayed elsewhere) and every later span rebuilds its cache
        by replay: what they hold may come from the wrong server's earlier, unchecked steps."""
        # Sessions with deep prompts or tuning are not checked: a plain Forward would not apply them.
        if self.verifier is None or prompts is not None or self.tuning is not None or not self.verifier.wants():
            return False
        stream = self.streams[i]
        full_input = consolidate(stream.history)  # [batch, inp.end, hidden]: confirm() already appended inp
        if full_input is None or full_input.shape[1] != inp.end:
            return False
        verdict = await self.verifier.check(stream.span, full_input, inp.mask, out)
        if verdict.wrong != stream.span.peer_id:
            return False
        stream.error = SpanError(stream, bad_reply(stream.span, "returned outputs that two other servers outvoted"))
        for later in self.streams[i + 1 :]:
            later.position = 0  # behind the session: replayed from the corrected outputs
        return True

    async def _push_arrives(self, i: int, step_id: str) -> bool:
        """Wait until stream i answers (True), or its predecessor reports that the push failed or its stream
        broke (False: the client sends the step itself)."""
        prev, stream = self.streams[i - 1], self.streams[i]
        reply = stream.watch()
        while not reply.done() and prev.push_failed != step_id and prev.error is None:
            notice = prev.watch()
            await asyncio.wait({reply, notice}, timeout=self.step_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not notice.done():
                break  # stream i answered (or timed out: its read reports that)
            try:
                msg = await prev.read(self.step_timeout_s)
            except SpanError as e:
                prev.error = e  # it replied before dying: replaced at the next step
                break
            if msg.WhichOneof("kind") == "push_failed":
                prev.push_failed = msg.push_failed.step_id
            else:
                prev.error = SpanError(prev, bad_reply(prev.span, f"sent {msg.WhichOneof('kind')!r} between steps"))
        return reply.done() or (prev.push_failed != step_id and prev.error is None)

    def _time_left_s(self) -> float:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        return self.failover_budget_s - (now - self._failing_since)

    async def _replace(self, i: int, failure: SpanError) -> None:
        """Swap stream i for a fresh chain over exactly its blocks; its history moves to the first new stream,
        which replays it when the step reaches it. Raises the error if it is not retryable or the step's failover
        budget (time) is used up."""
        t0 = time.perf_counter()
        old = self.streams[i]
        error = failure.error
        if not isinstance(error, SessionEvicted):
            error = await ended_by_eviction(old) or error
        if self.router is None or not error.retryable:
            raise error
        left = self._time_left_s()
        if left <= 0:
            log.warning("session %s: giving up on blocks %d:%d after %d failover(s) in %.1f s: %s",
                        self.session_id, old.span.start, old.span.end, self._failures,
                        self.failover_budget_s - left, error)  # fmt: skip
            raise error
        old.cancel()  # a read its end already failed is collected there (SpanStream._drop_pending)
        if isinstance(error, SessionEvicted):
            # The server evicted our idle session to serve another: no fault of its own, so no ban, no backoff and
            # no failover counted (the time budget still bounds the step). The router may well
            # pick it again; the reopen then evicts someone else's idle session or waits for room, as any open.
            log.info("session %s: %s evicted it at position %d; reopening blocks %d:%d and replaying",
                     self.session_id, old.span, self.position, old.span.start, old.span.end)  # fmt: skip
        else:
            self._failures += 1
            self.router.on_failure(old.span.peer_id)  # banned: a dead server with a live record is not picked again
            log.warning(
                "session %s: %s failed at position %d (%s); re-routing blocks %d:%d (failover %d, %.0f s left)",
                self.session_id, old.span, self.position, error, old.span.start, old.span.end, self._failures, left,
            )  # fmt: skip
        route = await self._new_route(old.span.start, old.span.end, error)
        results = await asyncio.gather(*(self._open(s) for s in route), return_exceptions=True)
        new: list[SpanStream] = []
        for result in results:
            if isinstance(result, SpanError):
                result.stream.error = result
                new.append(result.stream)
            elif isinstance(result, BaseException):
                for s in new:
                    s.cancel()
                raise result
            else:
                new.append(result)
        history = consolidate(old.history)  # beams folded in: one input from position 0
        prompts = old.history[0].prompts if old.history else None  # the prefill's deep prompts
        new[0].history = [StepInput("", history, 0, prompts=prompts)] if history is not None else []
        self.streams[i : i + 1] = new
        self.failovers.append(
            Failover(str(old.span), str(error), [str(s.span) for s in new], self.position, time.perf_counter() - t0)
        )

    async def _new_route(self, start: int, end: int, error: PollenError) -> list[Span]:
        """A chain for blocks [start, end), asking the router again (after backoff) while it finds none (every
        holder failed recently, the DHT is unreachable for a moment) and the budget lasts; then `error`."""
        if self.router is None:
            raise error
        attempt, delay = self._failures, self.router.backoff_s(self._failures)
        if isinstance(error, SessionEvicted):
            delay = 0.0  # the server is fine: reopen at once
        while True:
            delay = min(delay, max(0.0, self._time_left_s()))
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                return await self.router.route(start, end)
            except PollenError as e:
                if not e.retryable or self._time_left_s() <= 0:
                    raise e from error
                log.info("session %s: no route for blocks %d:%d yet (%s); trying again", self.session_id, start, end, e)
            attempt += 1
            delay = max(MIN_ROUTE_POLL_S, self.router.backoff_s(attempt))

    def rollback(self, position: int) -> None:
        """Forget the tokens from `position` on (speculative decoding drops the drafts the model rejected): the
        next step is written at `position`, overwriting them in every server's cache, and no failover replays
        them (each span's history is cut to `position`). Costs no message."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to position {position}: the session holds {self.position} tokens")
        for stream in self.streams:
            stream.rollback(position)
        self.position = position

    async def close(self) -> None:
        """Half-close every stream so servers free the caches, then drop them; never raises."""
        streams, self.streams = self.streams, []
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def ended_by_eviction(stream: SpanStream) -> SessionEvicted | None:
    """SessionEvicted if the server ended `stream` by evicting the session. A session evicted while its client
    was between steps fails at the next write, which only says the stream is closed: its status says why."""
    call = stream.call
    if call is None or not call.done() or call.cancelled():  # still open, or ended by this client
        return None
    code = await call.code()
    if code != grpc.StatusCode.NOT_FOUND:
        return None
    status = grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(), await call.details()
    )
    error = rpc_error(status, stream.span.address)
    return error if isinstance(error, SessionEvicted) else None


def step_request(inp: StepInput, hops: list[shard_pb2.NextHop], span: Span | None = None) -> shard_pb2.InferenceRequest:
    """The wire form of a span's step input; `hops` asks the server to push its output along the chain.
    Deep prompts are cut to the span's blocks."""
    step = shard_pb2.InferenceStepInput(step_id=inp.step_id, position=inp.position, hidden=to_proto(inp.hidden))
    if inp.prompts is not None and span is not None:
        step.prompts.CopyFrom(to_proto(inp.prompts[span.start : span.end].to(inp.hidden.dtype)))
    if inp.mask is not None:
        step.attention_mask.CopyFrom(to_proto(inp.mask))
    if inp.hypo_ids is not None:
        step.hypo_ids.CopyFrom(to_proto(inp.hypo_ids))
    step.next_servers.extend(hops)
    return shard_pb2.InferenceRequest(step=step)
