"""InferenceSession: one open InferenceStep stream per span of a route, kept for a whole generation.

`step(hidden)` pushes hidden states through the spans in order and returns the last span's output. Each
span records the inputs it confirmed (`history`), which is what a later failover needs to rebuild a
replacement server's KV cache. Streams use `call.write` / `await call.read()` only (grpc.aio forbids
mixing that with `async for`), and every read is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from client_sdk.routing import Span
from client_sdk.transport import ChannelPool, rpc_error
from swarm.errors import PollenError, ServerDraining, StepTimeout
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import from_proto, to_proto

log = logging.getLogger(__name__)


@dataclass
class SpanStream:
    """The live stream to one server for one span, and what it has processed."""

    span: Span
    call: Any  # grpc.aio.StreamStreamCall[InferenceRequest, InferenceResponse]
    position: int = 0  # tokens in this server's cache
    history: list[torch.Tensor] = field(default_factory=list)  # inputs sent, each [batch, new_tokens, hidden]


class InferenceSession:
    """A KV-cached session across a route. Use `async with` or call `open()` / `close()`."""

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
        self.streams: list[SpanStream] = []
        self.position = 0  # tokens processed by every span
        self.failed_span: Span | None = None  # the span whose server raised the last error, for bans

    async def open(self) -> None:
        """Open every span's stream concurrently; on any failure close those that did open."""
        results = await asyncio.gather(*(self._open_span(s) for s in self.route), return_exceptions=True)
        opened = [r for r in results if isinstance(r, SpanStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.streams = opened
            await self.close()
            raise errors[0]
        self.streams = opened
        log.debug("session %s opened on %s", self.session_id, " -> ".join(map(str, self.route)))

    async def _open_span(self, span: Span) -> SpanStream:
        call = self.pool.shard(span.address).InferenceStep()
        stream = SpanStream(span, call)
        request = shard_pb2.InferenceRequest(
            open=shard_pb2.InferenceOpen(
                model_id=self.model_id,
                blocks=common_pb2.BlockRange(start=span.start, end=span.end),
                max_length=self.max_length,
                session_id=self.session_id,
                batch_size=self.batch_size,
            )
        )
        try:
            reply = await self._exchange(stream, request, self.open_timeout_s, "open")
            if reply.WhichOneof("kind") != "opened":
                raise _bad_reply(span, f"answered open with {reply.WhichOneof('kind')!r}")
        except BaseException:
            call.cancel()
            raise
        return stream

    async def step(
        self,
        hidden: torch.Tensor,  # [batch, new_tokens, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, position + new_tokens]
    ) -> torch.Tensor:  # [batch, new_tokens, hidden]
        """Run `hidden` through every span in order. The hot path: one write + one read per span."""
        if not self.streams:
            raise RuntimeError("session is not open (or was closed)")
        batch, new_tokens = hidden.shape[:2]
        if self.position + new_tokens > self.max_length:
            raise ValueError(f"step would reach {self.position + new_tokens} tokens, over max_length {self.max_length}")
        mask_msg = to_proto(attention_mask) if attention_mask is not None else None
        for stream in self.streams:
            step = shard_pb2.InferenceStepInput(
                step_id=uuid.uuid4().hex, position=stream.position, hidden=to_proto(hidden), attention_mask=mask_msg
            )
            reply = await self._exchange(stream, shard_pb2.InferenceRequest(step=step), self.step_timeout_s, "step")
            out = reply.step
            if reply.WhichOneof("kind") != "step" or out.step_id != step.step_id:
                raise _bad_reply(stream.span, f"answered step {step.step_id} with {reply.WhichOneof('kind')!r}")
            if out.position != stream.position + new_tokens:
                raise _bad_reply(
                    stream.span, f"reports position {out.position}, expected {stream.position + new_tokens}"
                )
            # The input tensor is never written to later (embeddings and from_proto make fresh tensors),
            # so the history keeps a reference instead of a copy.
            stream.history.append(hidden)
            stream.position = out.position
            hidden = from_proto(out.hidden, name=f"hidden from {stream.span.address}")
            if hidden.shape[:2] != (batch, new_tokens):
                raise _bad_reply(stream.span, f"returned hidden of shape {list(hidden.shape)}")
        self.position += new_tokens
        return hidden

    async def _exchange(
        self, stream: SpanStream, request: shard_pb2.InferenceRequest, timeout_s: float, what: str
    ) -> shard_pb2.InferenceResponse:
        """Write one request and read its reply, mapping every failure to a PollenError."""
        span = stream.span
        try:
            async with asyncio.timeout(timeout_s):
                await stream.call.write(request)
                reply = await stream.call.read()
        except TimeoutError:
            self.failed_span = span
            stream.call.cancel()
            raise StepTimeout(f"{span.address} did not answer {what} within {timeout_s} s") from None
        except grpc.aio.AioRpcError as e:
            self.failed_span = span
            raise rpc_error(e, span.address) from e
        except asyncio.InvalidStateError as e:  # write after the server already ended the call
            self.failed_span = span
            raise ServerDraining(f"{span.address} closed the inference stream") from e
        if reply is grpc.aio.EOF:
            self.failed_span = span
            code = await stream.call.code()
            raise ServerDraining(f"{span.address} ended the inference stream ({code.name}) during {what}")
        return reply

    async def close(self) -> None:
        """Half-close every stream so servers free the caches, then drop them; never raises."""
        streams, self.streams = self.streams, []
        await asyncio.gather(*(_finish(s.call) for s in streams), return_exceptions=True)

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _finish(call: Any, timeout_s: float = 2.0) -> None:
    """Tell the server we are done and wait briefly for it to end the stream; cancel if it does not."""
    if call.done():
        return
    try:
        async with asyncio.timeout(timeout_s):
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
        log.debug("closing inference stream: %s", e)
    finally:
        if not call.done():
            call.cancel()


def _bad_reply(span: Span, what: str) -> PollenError:
    """A server broke the InferenceStep protocol; another server may do better, so it is retryable."""
    exc = PollenError(f"{span.address} {what}")
    exc.retryable = True
    return exc
