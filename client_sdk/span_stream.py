"""SpanStream: the client's end of one InferenceStep stream (one server, one span of one session).

It writes requests and reads replies with bounded waits and turns every way a server can fail (stream broken,
timeout, protocol violation, corrupt tensor) into a `SpanError` that names the span. A read may be left pending
across steps (`watch`) so that a `push_failed` notice or a broken stream is noticed while the client waits on
another server.

`StepInput` is the one record of what a span is asked to compute in a step. A stream keeps the inputs its
server confirmed (`history`) next to the tokens in its cache (`position`): that is all failover needs, since
replaying a span's history on a replacement (`replay`) rebuilds exactly the lost KV cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from client_sdk.routing import Span
from client_sdk.transport import ChannelPool, rpc_error
from swarm.errors import PollenError, ServerDraining, StepTimeout
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import from_proto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInput:
    """One span's input for one step: what is sent, what the reply is checked against, what history keeps."""

    step_id: str
    hidden: torch.Tensor  # [batch, tokens, hidden]
    position: int  # tokens already in the span's cache; the new ones go to slots [position, position + tokens)
    mask: torch.Tensor | None = None  # [batch, position + tokens], 1 = real token, 0 = padding
    hypo_ids: torch.Tensor | None = None  # int64 [batch]: beam search reorders cache rows before this step
    # Deep prompts of the whole chain [num_blocks, batch or 1, pre_seq_len, hidden] for a step that writes
    # slots below pre_seq_len (the prefill); each span is sent its own blocks' slices.
    prompts: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def end(self) -> int:
        """Tokens in the span's cache after this step."""
        return self.position + self.tokens


class SpanError(Exception):
    """A server failed its span; `error` says how (and whether another server may do better)."""

    def __init__(self, stream: SpanStream, error: PollenError) -> None:
        super().__init__(str(error))
        self.stream = stream
        self.error = error


def bad_reply(span: Span, what: str) -> PollenError:
    """A server broke the protocol or sent garbage: its fault, so another server may do better."""
    exc = PollenError(f"{span.address} {what}")
    exc.retryable = True
    return exc


@dataclass(eq=False)
class SpanStream:
    span: Span
    session_id: str
    call: Any = None  # grpc.aio.StreamStreamCall[InferenceRequest, InferenceResponse]
    position: int = 0  # tokens in this server's cache
    # Inputs that built the cache this span should hold: confirmed by this server, or moved here from a
    # failed server for replay (then `position` is behind the session's).
    history: list[StepInput] = field(default_factory=list)
    error: SpanError | None = None  # set when the stream broke outside a step's critical path
    push_failed: str = ""  # step_id of the last push_failed notice from this server
    # The secret a previous server must show to push into this session (sent at open and in the hop to this
    # server): without it, anyone who learns the session id could inject steps.
    push_token: bytes = field(default_factory=lambda: os.urandom(16), repr=False)
    _pending: asyncio.Task[Any] | None = None

    @classmethod
    async def open(
        cls,
        pool: ChannelPool,
        span: Span,
        model_id: str,
        session_id: str,
        max_length: int,
        batch: int,
        timeout_s: float,
        tuning: shard_pb2.Tuning | None = None,  # adapter and client LoRA of the span's blocks
    ) -> SpanStream:
        stream = cls(span, session_id)
        try:
            stream.call = pool.shard(span.address).InferenceStep()
            request = shard_pb2.InferenceRequest(
                open=shard_pb2.InferenceOpen(
                    model_id=model_id,
                    blocks=common_pb2.BlockRange(start=span.start, end=span.end),
                    max_length=max_length,
                    session_id=session_id,
                    batch_size=batch,
                    tuning=tuning,
                    push_token=stream.push_token,
                )
            )
            await stream.write(request)
            reply = await stream.read(timeout_s, "open")
            if reply.WhichOneof("kind") != "opened":
                raise SpanError(stream, bad_reply(span, f"answered open with {reply.WhichOneof('kind')!r}"))
        except BaseException:
            stream.cancel()
            raise
        return stream

    def hop(self) -> shard_pb2.NextHop:
        return shard_pb2.NextHop(address=self.span.address, session_id=self.session_id, push_token=self.push_token)

    async def write(self, request: shard_pb2.InferenceRequest) -> None:
        try:
            await self.call.write(request)
        except grpc.aio.AioRpcError as e:
            raise SpanError(self, rpc_error(e, self.span.address)) from e
        except asyncio.InvalidStateError as e:  # write after the server already ended the call
            raise SpanError(self, ServerDraining(f"{self.span.address} closed the inference stream")) from e

    def watch(self) -> asyncio.Task[Any]:
        """The next message of the stream as a task (started once; shared until consumed by `read`)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read_raw())
        return self._pending

    async def read(self, timeout_s: float, what: str = "step") -> shard_pb2.InferenceResponse:
        """The next message; a broken stream or timeout raises SpanError at once."""
        task = self.watch()
        try:
            async with asyncio.timeout(timeout_s):
                reply = await asyncio.shield(task)
        except TimeoutError:
            self.cancel()
            timeout = StepTimeout(f"{self.span.address} did not answer {what} within {timeout_s} s")
            raise SpanError(self, timeout) from None
        finally:
            if task.done():
                self._pending = None
        if reply is grpc.aio.EOF:
            code = await self.call.code()
            raise SpanError(self, ServerDraining(f"{self.span.address} ended the inference stream ({code.name})"))
        return reply

    async def _read_raw(self) -> Any:
        try:
            return await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise SpanError(self, rpc_error(e, self.span.address)) from e
        except asyncio.InvalidStateError as e:
            raise SpanError(self, ServerDraining(f"{self.span.address} closed the inference stream")) from e

    async def read_step(self, step_id: str, timeout_s: float) -> shard_pb2.InferenceStepOutput:
        """The reply to `step_id`, remembering push_failed notices that arrive first."""
        while True:
            reply = await self.read(timeout_s)
            kind = reply.WhichOneof("kind")
            if kind == "push_failed":
                self.push_failed = reply.push_failed.step_id
                continue
            if kind != "step" or reply.step.step_id != step_id:
                raise SpanError(self, bad_reply(self.span, f"answered step {step_id} with {kind!r}"))
            return reply.step

    def decode(self, out: shard_pb2.InferenceStepOutput, inp: StepInput) -> torch.Tensor:
        """The output for `inp` ([batch, tokens, hidden]), checked; a corrupt reply is this server's failure."""
        try:
            hidden = from_proto(out.hidden, name=f"hidden from {self.span.address}")
        except PollenError as e:
            raise SpanError(self, bad_reply(self.span, f"sent a corrupt tensor: {e}")) from e
        if hidden.dim() != 3 or hidden.shape[:2] != inp.hidden.shape[:2]:
            raise SpanError(self, bad_reply(self.span, f"returned hidden of shape {list(hidden.shape)}"))
        if out.position != inp.end:
            raise SpanError(self, bad_reply(self.span, f"reports position {out.position}, expected {inp.end}"))
        return hidden

    def confirm(self, inp: StepInput) -> None:
        """The server computed `inp`: its cache now holds `inp.end` tokens built from history + inp."""
        if inp.position == 0:
            self.history = [inp]  # a first step or a replay: everything before it is superseded
        else:
            self.history.append(inp)
        self.position = inp.end

    def rollback(self, position: int) -> None:
        """Forget every token from `position` on (speculative decoding's rejected drafts). The server keeps them
        in its cache until the next step, written at `position`, overwrites them; the history is cut so that a
        replay on a replacement server rebuilds only the tokens that stay."""
        kept: list[StepInput] = []
        for inp in self.history:
            if inp.end <= position:
                kept.append(inp)
            elif inp.position < position:  # the step that straddles `position`: keep its first tokens
                cut = position - inp.position
                mask = None if inp.mask is None else inp.mask[:, :position]
                kept.append(dataclasses.replace(inp, hidden=inp.hidden[:, :cut], mask=mask))
        self.history = kept
        self.position = min(self.position, position)

    def replay(self, current: StepInput, full: torch.Tensor | None) -> StepInput:
        """The one step that rebuilds this (replacement) server's cache and runs `current` too: the span's
        history plus `current`, from position 0. `full` ([batch, current.end, hidden]) is the previous span's
        output over all tokens when that span was replayed too (then it is exactly this span's input)."""
        hidden = full if full is not None else consolidate([*self.history, current])
        if hidden is None or hidden.shape[1] != current.end:  # a bug in the session's bookkeeping, not input
            raise RuntimeError(f"replay on {self.span} would rebuild {0 if hidden is None else hidden.shape[1]} "
                               f"tokens, not {current.end}")  # fmt: skip
        first = self.history[0] if self.history else current  # the prefill, with the deep prompts if any
        return StepInput(current.step_id, hidden, 0, current.mask, None, first.prompts)

    def _drop_pending(self) -> None:
        """Forget the pending read; a read the server already failed (it ended the stream) is collected, so
        asyncio does not log "Task exception was never retrieved" for an error the client has handled."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled():
            pending.exception()

    def cancel(self) -> None:
        self._drop_pending()
        if self.call is not None and not self.call.done():
            self.call.cancel()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Tell the server we are done and wait briefly for it to end the stream; cancel if it does not."""
        call = self.call
        if call is None or call.done():
            self._drop_pending()
            return
        try:
            async with asyncio.timeout(timeout_s):
                # Half-close first: a read still pending (a push_failed watch) only ends once the server
                # sees the end of our stream and closes its side.
                await call.done_writing()
                last: Any = None
                if self._pending is not None:
                    (last,) = await asyncio.gather(self._pending, return_exceptions=True)
                    self._pending = None
                while last is not grpc.aio.EOF and not isinstance(last, BaseException):
                    last = await call.read()
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("closing inference stream: %s", e)
        finally:
            self.cancel()


def consolidate(history: Sequence[StepInput]) -> torch.Tensor | None:
    """One tensor that rebuilds the same KV cache as `history` in a single step: [batch, tokens, hidden].

    Reordering cache rows (beam search) only permutes whole rows, so row i of the cache equals the
    lineage of row i's inputs; applying each step's hypo_ids to the inputs so far reproduces it exactly.
    """
    acc: torch.Tensor | None = None
    for inp in history:
        if acc is not None and inp.hypo_ids is not None:
            acc = acc.index_select(0, inp.hypo_ids)
        acc = inp.hidden if acc is None else torch.cat([acc, inp.hidden], dim=1)
    return acc
