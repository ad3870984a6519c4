"""Stateless calls through a chain of remote blocks: Forward (hidden states, no session) and Backward
(gradients w.r.t. a span's inputs; the server recomputes its forward). Routes use the `max_throughput`
mode, so batches spread over the servers; a failed span is re-routed and re-run, up to `max_retries`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

import grpc
import torch

from client_sdk.routing import Span
from client_sdk.span_stream import bad_reply
from client_sdk.transport import ChannelPool, rpc_error
from swarm.errors import PollenError, StepTimeout
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import from_proto, to_proto

if TYPE_CHECKING:
    from client_sdk.config import ClientConfig
    from client_sdk.directory import SwarmView

log = logging.getLogger(__name__)

SpanInputs = list[tuple[int, int, torch.Tensor]]  # (start, end, input [batch, seq, hidden]) per hop


class RemoteCalls:
    def __init__(self, pool: ChannelPool, view: SwarmView, model_id: str, config: ClientConfig) -> None:
        self.pool = pool
        self.view = view
        self.model_id = model_id
        self.config = config

    async def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
        start: int = 0,
        end: int | None = None,
    ) -> tuple[torch.Tensor, SpanInputs]:  # output [batch, seq, hidden], inputs of every hop (for backward)
        end = self.view.num_blocks if end is None else end
        inputs: SpanInputs = []
        block = start
        while block < end:
            out, stop = await self._with_retries(block, end, "forward", hidden, None, attention_mask)
            inputs.append((block, stop, hidden))
            hidden, block = out, stop
        return hidden, inputs

    async def backward(
        self,
        grad_output: torch.Tensor,  # [batch, seq, hidden] dLoss/d(output of the last hop)
        inputs: SpanInputs,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # dLoss/d(input of the first hop)
        grad = grad_output
        for start, end, hidden in reversed(inputs):
            grad = await self._exact(start, end, "backward", hidden, grad, attention_mask)
        return grad

    async def _exact(
        self,
        start: int,
        end: int,
        kind: str,
        hidden: torch.Tensor,
        grad: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One call over exactly [start, end) (backward needs the hop the inputs belong to)."""
        out, stop = await self._with_retries(start, end, kind, hidden, grad, mask, exact=True)
        assert stop == end
        return out

    async def _with_retries(
        self,
        start: int,
        end: int,
        kind: str,
        hidden: torch.Tensor,
        grad: torch.Tensor | None,
        mask: torch.Tensor | None,
        exact: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """Run the first hop of a throughput-weighted route for [start, end); returns (result, hop end)."""
        cfg = self.config
        attempt = 0
        while True:
            route = await self.view.wait_route(
                start, end, mode="max_throughput", wait_s=cfg.missing_blocks_wait_s, max_age_s=cfg.max_view_age_s
            )
            span = route[0]
            if exact and span.end != end:  # prefer one server holding the whole hop
                whole = [r for r in self.view.records.servers() if r.start <= start and end <= r.end]
                whole = [r for r in whole if r.peer_id not in self.view.banned()]
                if whole:
                    r = max(whole, key=lambda r: r.throughput_tps)
                    span = Span(r.peer_id, r.address, start, end, r)
                else:
                    return await self._split_backward(start, end, hidden, grad, mask), end
            try:
                return await self._call(span, kind, hidden, grad, mask), span.end
            except PollenError as e:
                if not e.retryable or attempt >= cfg.max_retries:
                    raise
                attempt += 1
                self.view.ban(span.peer_id)
                log.warning("%s on %s failed (%s); retry %d/%d", kind, span, e, attempt, cfg.max_retries)
                await asyncio.sleep(cfg.backoff_s(attempt))

    async def _split_backward(
        self, start: int, end: int, hidden: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Backward over [start, end) when no single live server holds it: forward the pieces, then back."""
        assert grad is not None
        _, pieces = await self.forward(hidden, mask, start, end)
        for a, b, x_in in reversed(pieces):
            grad = await self._exact(a, b, "backward", x_in, grad, mask)
        return grad

    async def _call(
        self, span: Span, kind: str, hidden: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        blocks = common_pb2.BlockRange(start=span.start, end=span.end)
        mask_msg = to_proto(mask) if mask is not None else None
        rid = uuid.uuid4().hex
        stub = self.pool.shard(span.address)
        request: Any
        if kind == "forward":
            request = shard_pb2.ForwardRequest(model_id=self.model_id, blocks=blocks, hidden=to_proto(hidden))
            call = stub.Forward()
        else:
            assert grad is not None
            request = shard_pb2.BackwardRequest(
                model_id=self.model_id, blocks=blocks, hidden=to_proto(hidden), grad_output=to_proto(grad)
            )
            call = stub.Backward()
        request.request_id = rid
        if mask_msg is not None:
            request.attention_mask.CopyFrom(mask_msg)
        try:
            async with asyncio.timeout(self.config.forward_timeout_s):
                await call.write(request)
                reply = await call.read()
                await call.done_writing()
        except TimeoutError:
            call.cancel()
            raise StepTimeout(f"{span.address} did not answer {kind} in {self.config.forward_timeout_s} s") from None
        except grpc.aio.AioRpcError as e:
            raise rpc_error(e, span.address) from e
        if reply is grpc.aio.EOF:
            raise bad_reply(span, f"ended the {kind} stream without a reply")
        try:
            out = from_proto(reply.hidden if kind == "forward" else reply.grad_input, f"{kind} reply")
        except PollenError as e:
            raise bad_reply(span, f"sent a corrupt tensor: {e}") from e
        if out.shape != hidden.shape:
            raise bad_reply(span, f"returned shape {list(out.shape)} for input {list(hidden.shape)}")
        self.view.mark_ok(span.peer_id)
        return out
