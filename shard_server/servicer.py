"""ShardServicer: the `pollen.v1.Shard` RPCs. Decodes and validates protos, hands domain tensors to the
BlockBackend on the worker thread, encodes the replies. Every error leaves through one decorator
(`map_errors`): PollenError → its gRPC status and message; anything else → INTERNAL, traceback logged.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

from shard_server.backend import BlockBackend
from shard_server.cache import Session, SessionCache
from shard_server.metrics import ServerMetrics
from shard_server.push import PushHub
from shard_server.scheduler import Scheduler
from swarm.blocks import BlockRange
from swarm.errors import (
    BlocksNotServed,
    CacheExhausted,
    InvalidRequest,
    ModelMismatch,
    PollenError,
    ServerDraining,
    SessionNotFound,
)
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord
from swarm.tensors import dtype_name, from_proto, to_proto

log = logging.getLogger(__name__)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


def map_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a coroutine or async-generator handler so no exception escapes as an unexplained status."""

    rpc = handler.__name__

    def count(servicer: Any, code: str) -> None:
        metrics = getattr(servicer, "metrics", None)
        if metrics is not None:
            metrics.rpcs.labels(rpc, code).inc()

    async def abort(self: Any, context: grpc.aio.ServicerContext, e: Exception) -> None:
        count(self, e.code.name if isinstance(e, PollenError) else "ABORTED" if isinstance(e, grpc.aio.AbortError)
              else "INTERNAL")  # fmt: skip
        if isinstance(e, grpc.aio.AbortError):
            raise e  # a handler aborted on purpose; the status is already set
        if isinstance(e, PollenError):
            log.info("%s rejected: %s %s", handler.__name__, e.code.name, e)
            await context.abort(e.code, str(e))
        log.error("%s failed with an unexpected error", handler.__name__, exc_info=e)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {handler.__name__}: {type(e).__name__}: {e}")

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in handler(self, request, context):
                    yield response
            except Exception as e:  # noqa: BLE001 — this is the one place errors become statuses
                await abort(self, context, e)
            else:
                count(self, "OK")

        return gen_wrapper

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = await handler(self, request, context)
        except asyncio.CancelledError:
            count(self, "CANCELLED")
            raise
        except Exception as e:  # noqa: BLE001 — this is the one place errors become statuses
            await abort(self, context, e)
        else:
            count(self, "OK")
            return result

    return wrapper


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        model_id: str,
        blocks: BlockRange,
        cache: SessionCache,
        scheduler: Scheduler,
        record: Callable[[], ServerRecord | None],
        inference_max_length: int,
        max_batch_tokens: int,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.model_id = model_id
        self.blocks = blocks
        self.cache = cache
        self.scheduler = scheduler  # the torch worker: inference steps first, Forward/Backward after them
        self.metrics = metrics
        self.record = record
        self.inference_max_length = inference_max_length
        self.max_batch_tokens = max_batch_tokens
        self.push = PushHub(max_message_bytes=256 << 20)  # sessions that accept pushes; channels to peers
        self.backend: BlockBackend | None = None  # set by the server once the blocks are loaded

    # ---- RPCs ---------------------------------------------------------------------------------------

    @map_errors
    async def Info(self, request: shard_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> shard_pb2.InfoResponse:
        record = self.record()
        if record is None:
            raise ServerDraining("server is still loading its blocks")
        return shard_pb2.InfoResponse(
            peer_id=record.peer_id,
            model_id=record.model_id,
            blocks=common_pb2.BlockRange(start=record.start, end=record.end),
            version=record.version,
            dtype=record.dtype,
            quant=record.quant,
            throughput_tps=record.throughput_tps,
            active_sessions=record.active_sessions,
            cache_tokens_left=record.cache_tokens_left,
            inference_max_length=record.inference_max_length,
            state=record.state.value,
            record_json=record.encode(),
        )

    @map_errors
    async def Forward(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        backend = self._ready_backend()
        while (request := await context.read()) is not grpc.aio.EOF:
            blocks = self._check_target(request.model_id, request, any_sub_range=True)
            hidden = self._decode_hidden(request.hidden, "hidden")
            self._check_batch_tokens(hidden)
            mask = self._decode_mask(request, hidden.shape[0], hidden.shape[1])
            t0 = time.perf_counter()
            out = await self.scheduler.run_training(backend.forward, blocks, hidden, mask)
            if self.metrics is not None:
                self.metrics.request("Forward", time.perf_counter() - t0, hidden.shape[0] * hidden.shape[1], "forward")
            await context.write(shard_pb2.ForwardResponse(request_id=request.request_id, hidden=to_proto(out)))

    @map_errors
    async def Backward(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        backend = self._ready_backend()
        while (request := await context.read()) is not grpc.aio.EOF:
            blocks = self._check_target(request.model_id, request, any_sub_range=True)
            hidden = self._decode_hidden(request.hidden, "hidden")
            self._check_batch_tokens(hidden)
            grad_output = self._decode_hidden(request.grad_output, "grad_output")
            if grad_output.shape != hidden.shape:
                raise InvalidRequest(
                    f"grad_output shape {list(grad_output.shape)} differs from hidden shape {list(hidden.shape)}"
                )
            mask = self._decode_mask(request, hidden.shape[0], hidden.shape[1])
            t0 = time.perf_counter()
            grad = await self.scheduler.run_training(backend.backward, blocks, hidden, grad_output, mask)
            if self.metrics is not None:
                tokens = hidden.shape[0] * hidden.shape[1]
                self.metrics.request("Backward", time.perf_counter() - t0, tokens, "backward")
            await context.write(shard_pb2.BackwardResponse(request_id=request.request_id, grad_input=to_proto(grad)))

    @map_errors
    async def InferenceStep(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "open":
            raise SessionNotFound("no open session: the first message of an InferenceStep stream must be `open`")
        backend = self._ready_backend()
        session = await self._open_session(first.open)
        session.task = asyncio.current_task()  # so an idle or moving server can end the stream
        push_key = first.open.session_id
        pushing: asyncio.Task[None] | None = None  # the last step's push to the next server, if any
        step_id = ""
        try:
            await context.write(
                shard_pb2.InferenceResponse(
                    opened=shard_pb2.InferenceOpened(session_id=session.session_id, max_length=session.max_length)
                )
            )
            # The per-token hot path: validate only what can change per step, no logging above DEBUG.
            async for request in self.push.requests(context, push_key):  # client's stream + pushes
                if request.WhichOneof("kind") != "step":
                    raise InvalidRequest(f"session {session.session_id}: the stream already has an open session")
                step = request.step
                step_id = step.step_id
                position, hidden, mask, hypo_ids = self._decode_step(session, step)
                t0 = time.perf_counter()
                out = await self.scheduler.step(backend, session, position, hidden, mask, hypo_ids)
                session.length = position + hidden.shape[1]
                session.last_active = time.monotonic()
                if self.metrics is not None:
                    self.metrics.request("InferenceStep", time.perf_counter() - t0, hidden.shape[0] * hidden.shape[1],
                                         "inference")  # fmt: skip
                hidden_msg = to_proto(out)
                if pushing is not None:
                    await pushing  # keeps its push_failed notice ahead of this reply
                if step.next_servers:
                    pushing = asyncio.create_task(self.push.push_after(context, push_key, step, hidden_msg))
                reply = shard_pb2.InferenceStepOutput(step_id=step_id, hidden=hidden_msg, position=session.length)
                async with self.push.write_lock(push_key):
                    await context.write(shard_pb2.InferenceResponse(step=reply))
        except asyncio.CancelledError:
            if session.closed_reason:  # ended by this server (idle, or blocks moving), not by the client
                raise SessionNotFound(session.closed_reason) from None
            raise
        except Exception as e:
            if not isinstance(e, PollenError | grpc.aio.AbortError):
                e.add_note(f"in session {session.session_id} step {step_id!r}")
            raise
        finally:
            if pushing is not None and not pushing.done():
                pushing.cancel()
            # A step the worker is running still writes this session's buffers: wait for it (one step at most)
            # before the bytes go back to the budget, so the budget bounds real memory at every moment.
            await self.scheduler.settled(session)
            self.cache.release(session)  # also on client cancel: the handler task is cancelled here

    @map_errors
    async def Push(self, request: shard_pb2.PushRequest, context: grpc.aio.ServicerContext) -> shard_pb2.PushResponse:
        return self.push.accept(request)

    # ---- validation (proto → domain) ------------------------------------------------------------------

    def _ready_backend(self) -> BlockBackend:
        if self.cache.draining:
            raise ServerDraining("server is shutting down; use another server")
        if self.backend is None:
            raise ServerDraining("server is still loading its blocks; retry shortly or use another server")
        return self.backend

    def _check_target(self, model_id: str, request: Any, any_sub_range: bool) -> BlockRange:
        if model_id != self.model_id:
            raise ModelMismatch(f"this server serves model {self.model_id!r}, not {model_id!r}")
        if not request.HasField("blocks"):
            return self.blocks  # absent = the whole held range
        start, end = request.blocks.start, request.blocks.end
        if end <= start:
            raise InvalidRequest(f"block range {start}:{end} is empty or reversed")
        held = self.blocks
        if any_sub_range:
            if not (held.start <= start and end <= held.end):
                raise BlocksNotServed(f"blocks {start}:{end} are not served here: this server holds {held}")
        elif start != held.start or end > held.end:
            # Session caches are indexed by local layer 0..n-1, so a session must start at our first block.
            raise BlocksNotServed(
                f"blocks {start}:{end} cannot be served here: this server holds {held}; "
                f"an inference session must cover {held.start}:b with b <= {held.end}"
            )
        return BlockRange(start, end)

    def _decode_hidden(self, msg: common_pb2.Tensor, name: str) -> torch.Tensor:
        t = from_proto(msg, name)
        if t.dtype not in _FLOATS:
            raise InvalidRequest(f"{name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")
        hidden_size = self.backend.hidden_size if self.backend is not None else -1
        if t.dim() != 3 or t.shape[2] != hidden_size or t.shape[0] == 0 or t.shape[1] == 0:
            raise InvalidRequest(f"{name} must have shape [batch, seq, {hidden_size}], got {list(t.shape)}")
        return t

    def _decode_mask(self, request: Any, batch: int, length: int) -> torch.Tensor | None:
        if not request.HasField("attention_mask"):
            return None
        mask = from_proto(request.attention_mask, "attention_mask")
        if mask.dtype not in _MASK_DTYPES:
            raise InvalidRequest(f"attention_mask must be int64, int32 or bool, got {dtype_name(mask.dtype)}")
        if tuple(mask.shape) != (batch, length):
            raise InvalidRequest(f"attention_mask must have shape [{batch}, {length}], got {list(mask.shape)}")
        return mask

    def _check_batch_tokens(self, hidden: torch.Tensor) -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.max_batch_tokens:
            raise CacheExhausted(
                f"request of {hidden.shape[0]}x{hidden.shape[1]} = {tokens} tokens is over this server's "
                f"max_batch_size of {self.max_batch_tokens} tokens; split it"
            )

    async def _open_session(self, msg: shard_pb2.InferenceOpen) -> Session:
        blocks = self._check_target(msg.model_id, msg, any_sub_range=False)
        if msg.max_length == 0:
            raise InvalidRequest("open.max_length must be at least 1")
        if msg.max_length > self.inference_max_length:
            raise CacheExhausted(
                f"max_length {msg.max_length} is over this server's inference_max_length {self.inference_max_length}"
            )
        batch_size = msg.batch_size or 1
        return await self.cache.open(msg.session_id or "<unnamed>", blocks, msg.max_length, batch_size)

    def _decode_step(
        self, session: Session, step: shard_pb2.InferenceStepInput
    ) -> tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        position = step.position
        if position > session.length:
            raise InvalidRequest(
                f"session {session.session_id}: step position {position} is ahead of the {session.length} "
                f"tokens in the cache"
            )
        hidden = self._decode_hidden(step.hidden, "hidden")
        self._check_batch_tokens(hidden)
        batch, new_tokens = hidden.shape[0], hidden.shape[1]
        if batch != session.batch_size:
            raise InvalidRequest(
                f"session {session.session_id}: hidden has batch {batch}, the session was opened with "
                f"batch_size {session.batch_size}"
            )
        if position + new_tokens > session.max_length:
            raise InvalidRequest(
                f"session {session.session_id}: {new_tokens} tokens at position {position} would reach "
                f"{position + new_tokens}, over the session's max_length {session.max_length}"
            )
        mask = self._decode_mask(step, batch, position + new_tokens)
        hypo_ids = None
        if step.HasField("hypo_ids"):
            hypo_ids = from_proto(step.hypo_ids, "hypo_ids")
            if hypo_ids.dtype != torch.int64 or tuple(hypo_ids.shape) != (batch,):
                raise InvalidRequest(
                    f"hypo_ids must be int64 of shape [{batch}], got {dtype_name(hypo_ids.dtype)} "
                    f"{list(hypo_ids.shape)}"
                )
            if batch and not (0 <= int(hypo_ids.min()) and int(hypo_ids.max()) < batch):
                raise InvalidRequest(f"hypo_ids must be in [0, {batch}), got {hypo_ids.tolist()}")
        return position, hidden, mask, hypo_ids
