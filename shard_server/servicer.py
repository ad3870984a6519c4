"""ShardServicer: the `pollen.v1.Shard` RPCs. It owns the inference sessions (open, steps, close), decodes and
validates protos (validation.py), hands domain tensors to the worker (scheduler.py) and encodes the replies.
Every error leaves through `swarm.errors.map_errors`: PollenError → its gRPC status, message and class name;
anything else → INTERNAL with the traceback logged.

What a peer can make this server hold is bounded: open streams per IP (`max_streams_per_ip`: sessions and
Forward/Backward streams), a session's queued steps in bytes (inbox.py), Forward/Backward inputs in count and
bytes (scheduler.py), and every message by gRPC's receive limit (refused from its length prefix, unread).
A session's output is pushed only to a next server the swarm's records vouch for (next_hops.py), and a push
is accepted only with the token the client gave the session (inbox.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from shard_server.backend import BlockBackend
from shard_server.cache import SessionCache
from shard_server.inbox import StepInbox
from shard_server.next_hops import NextHops
from shard_server.push import Pusher
from shard_server.scheduler import PendingStep, Scheduler
from shard_server.session import Session
from shard_server.tuning import RequestTuning, TuningLimits, decode_tuning
from shard_server.validation import (
    check_backward_tokens,
    check_batch_tokens,
    check_open,
    check_target,
    decode_hidden,
    decode_mask,
    decode_step,
)
from swarm.access import peer_ip
from swarm.blocks import BlockRange
from swarm.errors import InvalidRequest, Overloaded, PollenError, ServerDraining, SessionNotFound, map_errors
from swarm.net import PLAINTEXT, Security
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord
from swarm.tensors import to_proto

log = logging.getLogger(__name__)


class Observer(Protocol):
    """What the servicer reports (metrics.ServerMetrics implements it)."""

    def request(self, rpc: str, seconds: float, tokens: int, kind: str) -> None: ...

    def rpc_status(self, rpc: str, code: str) -> None: ...


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        model_id: str,
        blocks: BlockRange,
        cache: SessionCache,
        scheduler: Scheduler,
        record: Callable[[], ServerRecord | None],  # the live announcement, for Info
        inference_max_length: int,
        max_batch_tokens: int,
        max_message_bytes: int,
        observer: Observer | None = None,
        max_backward_tokens: int | None = None,
        *,
        security: Security = PLAINTEXT,  # for this server's own pushes
        next_hops: NextHops | None = None,  # None: no swarm to verify next servers against, so no pushes
        max_inbox_bytes: int = 16 << 20,
        max_streams_per_ip: int = 64,
    ) -> None:
        self.model_id = model_id
        self.blocks = blocks
        self.cache = cache
        self.scheduler = scheduler  # the torch worker: inference steps first, Forward/Backward after them
        self.observer = observer
        self.record = record
        self.inference_max_length = inference_max_length
        self.max_batch_tokens = max_batch_tokens
        self.max_backward_tokens = max_backward_tokens or max_batch_tokens  # the server sets it from its memory plan
        self.limits = TuningLimits({}, 0)  # what client tuning may name; set with the backend
        self.pusher = Pusher(max_message_bytes, security)
        self.next_hops = next_hops or NextHops(None, model_id, "")
        self.max_inbox_bytes = max_inbox_bytes
        self.max_streams_per_ip = max_streams_per_ip
        self.backend: BlockBackend | None = None  # set by the server once the blocks are loaded
        self.unavailable_reason = ""  # why new sessions are refused while paused or moving (lifecycle.py)
        # By the client's session_id: where pushes for it go. A list, because session ids are the client's
        # choice: whoever opens a session under an id in use gets its own inbox, never the other's pushes.
        self._inboxes: dict[str, list[StepInbox]] = {}
        self._streams_per_ip: dict[str, int] = {}

    def on_rpc_status(self, rpc: str, code: str) -> None:  # called by map_errors after every RPC
        if self.observer is not None:
            self.observer.rpc_status(rpc, code)

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
            adapters=record.adapters,
        )

    @map_errors
    async def Forward(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self._ready_backend()  # refused at once while loading, paused or moving
        ip = self._enter_stream(context)
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                backend = self._ready_backend()  # per request: a pause or a move replaces the blocks
                blocks = check_target(self.model_id, self.blocks, request, any_sub_range=True)
                hidden = decode_hidden(request.hidden, "hidden", backend.hidden_size)
                check_batch_tokens(hidden, self.max_batch_tokens)
                mask = decode_mask(request, hidden.shape[0], hidden.shape[1])
                tuning = self._tuning(request, blocks, hidden)
                request_id = request.request_id
                del request  # decoded: while it waits, the request holds its tensors only, not the proto too
                t0 = time.perf_counter()
                out = await self.scheduler.run_training(
                    backend.forward, blocks, hidden, mask, tuning, nbytes=hidden.nbytes
                )
                self._observe("Forward", t0, hidden, "forward")
                await context.write(shard_pb2.ForwardResponse(request_id=request_id, hidden=to_proto(out)))
        finally:
            self._leave_stream(ip)

    @map_errors
    async def Backward(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self._ready_backend()  # refused at once while loading, paused or moving
        ip = self._enter_stream(context)
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                backend = self._ready_backend()  # per request: a pause or a move replaces the blocks
                request_id, blocks, hidden, grad_output, mask, tuning = self._decode_backward(request, backend)
                del request  # decoded: while it waits, the request holds its tensors only, not the proto too
                t0 = time.perf_counter()
                grads = await self.scheduler.run_training(
                    backend.backward, blocks, hidden, grad_output, mask, tuning, nbytes=2 * hidden.nbytes
                )
                self._observe("Backward", t0, hidden, "backward")
                response = shard_pb2.BackwardResponse(request_id=request_id, grad_input=to_proto(grads.grad_input))
                if grads.grad_prompts is not None:
                    response.grad_prompts.CopyFrom(to_proto(grads.grad_prompts))
                for (block, module), da, db in grads.grad_lora:
                    response.grad_lora.append(
                        shard_pb2.LoraTensors(block=block, module=module, a=to_proto(da), b=to_proto(db))
                    )
                await context.write(response)
        finally:
            self._leave_stream(ip)

    def _decode_backward(self, request: Any, backend: BlockBackend) -> tuple[Any, ...]:
        blocks = check_target(self.model_id, self.blocks, request, any_sub_range=True)
        hidden = decode_hidden(request.hidden, "hidden", backend.hidden_size)
        check_backward_tokens(hidden, min(self.max_batch_tokens, self.max_backward_tokens))
        grad_output = decode_hidden(request.grad_output, "grad_output", backend.hidden_size)
        if grad_output.shape != hidden.shape:
            raise InvalidRequest(
                f"grad_output shape {list(grad_output.shape)} differs from hidden shape {list(hidden.shape)}"
            )
        mask = decode_mask(request, hidden.shape[0], hidden.shape[1])
        return request.request_id, blocks, hidden, grad_output, mask, self._tuning(request, blocks, hidden)

    @map_errors
    async def InferenceStep(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """One stream = one session: `open` first, then steps (from the client or pushed) until the client
        closes its side; the session's cache bytes are reserved at open and released when the stream ends."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "open":
            raise SessionNotFound("no open session: the first message of an InferenceStep stream must be `open`")
        backend = self._ready_backend()
        ip = self._enter_stream(context)
        try:
            await self._run_session(first.open, backend, context)
        finally:
            self._leave_stream(ip)

    async def _run_session(
        self, msg: shard_pb2.InferenceOpen, backend: BlockBackend, context: grpc.aio.ServicerContext
    ) -> None:
        session = await self._open_session(msg, backend)
        session.task = asyncio.current_task()  # so an idle or moving server can end the stream
        inbox = StepInbox(context, session.session_id, msg.push_token, self.max_inbox_bytes)
        self._inboxes.setdefault(msg.session_id, []).append(inbox)
        self.next_hops.prefetch(session.blocks.end)  # so that a first push need not wait for the lookup
        pending: PendingStep | None = None  # the last step handed to the worker
        pushing: asyncio.Task[None] | None = None  # the last step's push to the next server, if any
        step_id = ""
        try:
            opened = shard_pb2.InferenceOpened(session_id=session.session_id, max_length=session.max_length)
            await context.write(shard_pb2.InferenceResponse(opened=opened))
            # The per-token hot path: validate only what can change per step, no logging above DEBUG.
            while (step := await inbox.next()) is not None:
                session.in_step = True  # not idle, so never evicted until answered (cache.py)
                step_id = step.step_id
                item = decode_step(session, step, backend.hidden_size, self.max_batch_tokens)
                t0 = time.perf_counter()
                # Alone on this server, a small step runs right here (nothing could batch with it; see scheduler.py)
                out = self.scheduler.run_now(backend, item) if self.cache.active_sessions == 1 else None
                if out is None:
                    pending = self.scheduler.submit(backend, item)
                    out = await pending.result()
                session.length = step.position + item.hidden.shape[1]
                session.last_active = time.monotonic()
                session.in_step = False
                self._observe("InferenceStep", t0, item.hidden, "inference")
                hidden_msg = to_proto(out)
                if pushing is not None:
                    await pushing  # keeps its push_failed notice ahead of this reply
                    pushing = None
                if step.next_servers:
                    push = self._push_after(inbox, context, session.blocks.end, step, hidden_msg)
                    pushing = asyncio.create_task(push)
                reply = shard_pb2.InferenceStepOutput(step_id=step_id, hidden=hidden_msg, position=session.length)
                async with inbox.write_lock:
                    await context.write(shard_pb2.InferenceResponse(step=reply))
        except asyncio.CancelledError:
            if session.closed_reason:  # ended by this server (idle, evicted, blocks moving), not by the client
                raise session.closed_as(session.closed_reason) from None
            raise
        except Exception as e:
            if not isinstance(e, PollenError | grpc.aio.AbortError):
                e.add_note(f"in session {session.session_id} step {step_id!r}")
            raise
        finally:
            inbox.close()
            same_id = self._inboxes.get(msg.session_id, [])
            if inbox in same_id:
                same_id.remove(inbox)
            if not same_id:
                self._inboxes.pop(msg.session_id, None)
            if pushing is not None and not pushing.done():
                pushing.cancel()
            # A step the worker is running still writes this session's cache: wait for it (one step at most)
            # before the bytes go back to the budget, so the budget bounds real memory at every moment.
            if pending is not None:
                await pending.settled()
            self.cache.release(session)  # also on client cancel: the handler task is cancelled here

    @map_errors
    async def Push(self, request: shard_pb2.PushRequest, context: grpc.aio.ServicerContext) -> shard_pb2.PushResponse:
        """The previous server of a chain hands over a step: it queues in the session's inbox. Only a push with
        the session's token gets there; an unknown session and a wrong token get the same answer, so Push
        cannot be used to find out which session ids are open."""
        inbox = next((i for i in self._inboxes.get(request.session_id, ()) if i.accepts(request.push_token)), None)
        if inbox is None:
            raise SessionNotFound(f"no open session {request.session_id!r} on this server takes this push")
        if not request.HasField("step"):
            raise InvalidRequest("push without a step")
        inbox.put(request.step)  # Overloaded when the session's inbox is full
        return shard_pb2.PushResponse()

    # ---- helpers ------------------------------------------------------------------------------------------

    def _ready_backend(self) -> BlockBackend:
        if self.cache.draining:
            raise ServerDraining(self.unavailable_reason or "server is shutting down; use another server")
        if self.backend is None:
            raise ServerDraining("server is still loading its blocks; retry shortly or use another server")
        return self.backend

    async def _open_session(self, msg: shard_pb2.InferenceOpen, backend: BlockBackend) -> Session:
        blocks = check_target(self.model_id, self.blocks, msg, any_sub_range=False)
        check_open(msg, self.inference_max_length)
        tuning = decode_tuning(msg.tuning, blocks, self.limits, None, None) if msg.HasField("tuning") else None
        # The client's LoRA stays on the server for the whole session: its bytes count as cache (see cache.py).
        extra = tuning.client_elements * backend.dtype.itemsize if tuning is not None else 0
        session = await self.cache.open(
            msg.session_id or "<unnamed>", blocks, msg.max_length, msg.batch_size or 1, extra_bytes=extra
        )
        if tuning is not None:
            try:
                session.lora = await self.scheduler.run(backend.session_lora, tuning)
            except BaseException:
                self.cache.release(session)
                raise
        return session

    def _tuning(self, request: Any, blocks: BlockRange, hidden: Any) -> RequestTuning | None:
        if not request.HasField("tuning"):
            return None
        return decode_tuning(request.tuning, blocks, self.limits, hidden.shape[0], hidden.shape[1])

    async def _push_after(
        self,
        inbox: StepInbox,
        context: grpc.aio.ServicerContext,
        session_end: int,
        step: shard_pb2.InferenceStepInput,
        output: common_pb2.Tensor,
    ) -> None:
        """Push the step on to a verified next server; if that is refused or fails, tell the client on its
        stream so it sends the step itself."""
        problem = await self.next_hops.problem(session_end, step.next_servers[0].address)
        error = f"PERMISSION_DENIED: {problem}" if problem else await self.pusher.push(step, output)
        if error is not None:
            notice = shard_pb2.PushFailed(step_id=step.step_id, error=error)
            async with inbox.write_lock:
                await context.write(shard_pb2.InferenceResponse(push_failed=notice))

    def _enter_stream(self, context: grpc.aio.ServicerContext) -> str:
        """Count an open stream of the caller's IP; Overloaded over `max_streams_per_ip`. Returns the IP."""
        ip = peer_ip(context.peer() or "")
        n = self._streams_per_ip.get(ip, 0)
        if n >= self.max_streams_per_ip:
            raise Overloaded(
                f"{ip} has {n} sessions and Forward/Backward streams open on this server (limit "
                f"{self.max_streams_per_ip} per address); close some or use another server"
            )
        self._streams_per_ip[ip] = n + 1
        return ip

    def _leave_stream(self, ip: str) -> None:
        n = self._streams_per_ip.get(ip, 1) - 1
        if n > 0:
            self._streams_per_ip[ip] = n
        else:
            self._streams_per_ip.pop(ip, None)

    def _observe(self, rpc: str, t0: float, hidden: Any, kind: str) -> None:
        if self.observer is not None:
            self.observer.request(rpc, time.perf_counter() - t0, hidden.shape[0] * hidden.shape[1], kind)
