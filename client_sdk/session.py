"""InferenceSession: a KV-cached session across a chain of spans that survives servers going away.

`step(hidden)` sends hidden states through the spans and returns the last span's output. Every span keeps
the inputs its server confirmed (`SpanStream.history`). When a server fails (broken stream, error reply,
timeout, corrupt tensor), the session bans it, asks the router for a replacement chain for exactly the
lost blocks, replays that span's history there in one message (the current step's input appended) to
rebuild the KV cache, and carries on, so the outputs are the same as without the failure.

With `push`, the client writes each step to the first server only, and every server forwards its output
to the next one itself (client -> A -> B -> client); servers still return their outputs to the client, for
history. A failed push is reported by the pushing server (`push_failed`), and the client then sends that
hop itself; a server that dies is noticed from its broken stream at once, never from a long timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from client_sdk.routing import Span
from client_sdk.span_stream import SpanError, SpanStream, consolidate
from client_sdk.transport import ChannelPool
from swarm.errors import PollenError
from swarm.pb import shard_pb2
from swarm.tensors import to_proto

log = logging.getLogger(__name__)


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
        max_retries: int = 0,
        push: bool = False,
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
        self.max_retries = max_retries
        self.push = push
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed by every span
        self.failovers: list[Failover] = []
        self._failures = 0  # in the current step (or open)
        self._closed = False

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
            self._failures = 0
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
        return await SpanStream.open(
            self.pool, span, self.model_id, self.session_id, self.max_length, self.batch_size, self.open_timeout_s
        )

    async def step(
        self,
        hidden: torch.Tensor,  # [batch, new_tokens, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, position + new_tokens]
        hypo_ids: torch.Tensor | None = None,  # int64 [batch]: beam search reorders cache rows first
    ) -> torch.Tensor:  # [batch, new_tokens, hidden]
        """Run `hidden` through every span in order (the hot path), recovering from failed servers."""
        if not self.streams:
            raise RuntimeError("session is not open (or was closed)")
        new_tokens = hidden.shape[1]
        if self.position + new_tokens > self.max_length:
            raise ValueError(f"step would reach {self.position + new_tokens} tokens, over max_length {self.max_length}")
        if attention_mask is not None and attention_mask.shape != (hidden.shape[0], self.position + new_tokens):
            raise ValueError(f"attention_mask must be [batch, {self.position + new_tokens}]")
        self._failures = 0
        step_id = uuid.uuid4().hex
        mask_msg = to_proto(attention_mask) if attention_mask is not None else None
        hypo_msg = to_proto(hypo_ids) if hypo_ids is not None else None
        args = (step_id, attention_mask, mask_msg, hypo_ids, hypo_msg)
        first, x = 0, hidden
        if self.push and len(self.streams) > 1 and all(s.error is None for s in self.streams):
            first, x = await self._push_chain(x, *args)
        out = await self._sequential(first, x, *args)
        self.position += new_tokens
        return out

    async def _push_chain(
        self,
        x: torch.Tensor,
        step_id: str,
        mask: torch.Tensor | None,
        mask_msg: object,
        hypo_ids: torch.Tensor | None,
        hypo_msg: object,
    ) -> tuple[int, torch.Tensor]:
        """Write once to the first server and collect every server's reply. Returns (index, input) where
        the sequential path must continue: (len(streams), final output) when the chain completed."""
        streams, n = self.streams, x.shape[1]
        position = self.position
        hops = [s.hop() for s in streams]
        step = self._step_msg(step_id, x, mask_msg, hypo_msg, hops[1:])
        try:
            await streams[0].write(shard_pb2.InferenceRequest(step=step))
        except SpanError as e:
            streams[0].error = e
            return 0, x
        sent_by_client = {0}
        for i, stream in enumerate(streams):
            try:
                if i not in sent_by_client:
                    await self._await_push(i, step_id, x, mask_msg, hypo_msg, hops, sent_by_client)
                out = stream.decode(await stream.read_step(step_id, self.step_timeout_s), (x.shape[0], n), position + n)
            except SpanError as e:
                e.stream.error = e
                if e.stream is stream:
                    return i, x
                continue  # the previous server died after replying; it is replaced at the next step
            stream.history.append((x, hypo_ids))
            stream.position = position + n
            x = out
        return len(streams), x

    async def _await_push(
        self,
        i: int,
        step_id: str,
        x: torch.Tensor,
        mask_msg: object,
        hypo_msg: object,
        hops: list[shard_pb2.NextHop],
        sent_by_client: set[int],
    ) -> None:
        """Wait until stream i answers, or its predecessor says the push failed (then send it ourselves)."""
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
                prev.error = e  # it replied before dying: replace it at the next step
                break
            if msg.WhichOneof("kind") == "push_failed":
                prev.push_failed = msg.push_failed.step_id
            else:
                prev.error = SpanError(prev, _unexpected(prev, msg))
        if not reply.done() and (prev.push_failed == step_id or prev.error is not None):
            step = self._step_msg(step_id, x, mask_msg, hypo_msg, hops[i + 1 :])
            await stream.write(shard_pb2.InferenceRequest(step=step))  # the server drops a duplicate step_id
            sent_by_client.add(i)

    async def _sequential(
        self,
        i: int,
        x: torch.Tensor,
        step_id: str,
        mask: torch.Tensor | None,
        mask_msg: object,
        hypo_ids: torch.Tensor | None,
        hypo_msg: object,
    ) -> torch.Tensor:
        """Streams i.. one after another (client -> server -> client each), replacing failed ones."""
        position, n = self.position, x.shape[1]
        x_full: torch.Tensor | None = None  # [batch, position + n, hidden] after a replayed span
        while i < len(self.streams):
            stream = self.streams[i]
            if stream.error is not None:
                await self._replace(i, stream.error)
                continue
            fresh = stream.position < position  # a replacement: replay its history with this step
            if fresh:
                if x_full is None:
                    x_full = consolidate([*stream.history, (x, hypo_ids)])
                inp, at, hyp_msg = x_full, 0, None
            else:
                inp, at, hyp_msg = x, position, hypo_msg
            assert inp is not None
            step = self._step_msg(step_id, inp, mask_msg, hyp_msg, [])
            step.position = at
            try:
                await stream.write(shard_pb2.InferenceRequest(step=step))
                reply = await stream.read_step(step_id, self.step_timeout_s)
                out = stream.decode(reply, (inp.shape[0], inp.shape[1]), at + inp.shape[1])
            except SpanError as e:
                e.stream.error = e
                continue
            if fresh:
                stream.history = [(inp, None)]
                x_full, x = out, out[:, -n:]
            else:
                stream.history.append((inp, hypo_ids))
                x_full, x = None, out
            stream.position = position + n
            i += 1
        return x

    def _step_msg(
        self, step_id: str, x: torch.Tensor, mask_msg: object, hypo_msg: object, hops: list[shard_pb2.NextHop]
    ) -> shard_pb2.InferenceStepInput:
        step = shard_pb2.InferenceStepInput(step_id=step_id, position=self.position, hidden=to_proto(x))
        if mask_msg is not None:
            step.attention_mask.CopyFrom(mask_msg)  # type: ignore[arg-type]
        if hypo_msg is not None:
            step.hypo_ids.CopyFrom(hypo_msg)  # type: ignore[arg-type]
        if hops:
            step.next_servers.extend(hops)
        return step

    async def _replace(self, i: int, failure: SpanError) -> None:
        """Swap stream i for a fresh chain over exactly its blocks; its history moves to the first new stream
        (the next step replays it). Raises the error if it is not retryable or retries are used up."""
        t0 = time.perf_counter()
        old = self.streams[i]
        error = failure.error
        if self.router is None or not error.retryable or self._failures >= self.max_retries:
            raise error
        self._failures += 1
        self.router.on_failure(old.span.peer_id)
        old.cancel()
        log.warning(
            "session %s: %s failed at position %d (%s); re-routing blocks %d:%d, retry %d/%d",
            self.session_id, old.span, self.position, error, old.span.start, old.span.end,
            self._failures, self.max_retries,
        )  # fmt: skip
        delay = self.router.backoff_s(self._failures)
        if delay > 0:
            await asyncio.sleep(delay)
        route = await self.router.route(old.span.start, old.span.end)
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
        history = consolidate(old.history)
        new[0].history = [(history, None)] if history is not None else []
        self.streams[i : i + 1] = new
        self.failovers.append(
            Failover(str(old.span), str(error), [str(s.span) for s in new], self.position, time.perf_counter() - t0)
        )

    async def close(self) -> None:
        """Half-close every stream so servers free the caches, then drop them; never raises."""
        streams, self.streams = self.streams, []
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _unexpected(stream: SpanStream, msg: shard_pb2.InferenceResponse) -> PollenError:
    from client_sdk.span_stream import bad_reply

    return bad_reply(stream.span, f"sent {msg.WhichOneof('kind')!r} between steps")
