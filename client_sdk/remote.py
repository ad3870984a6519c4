"""Stateless calls through a chain of remote blocks: Forward (hidden states, no session) and Backward
(gradients w.r.t. a span's inputs and its tuning; the server recomputes its forward, nothing is kept between
calls).

A batch is cut into parts of whole rows, each at most `max_tokens_per_call` tokens (and at most what the servers
announce they take); the parts run concurrently, each over its own `max_throughput` route, so a large batch
spreads over the replicas of every block and the servers of a chain work on different parts at once.
`forward` returns a `ForwardTrace` (which server ran which hop of which part, with the hop's input); `backward`
walks it in reverse (a server that answers a Backward is over its token limit gets the rows in two halves).
A hop whose server fails is re-run elsewhere: Forward re-routes from the failed block;
Backward re-runs the exact hop on another server holding all of it or, if none does, re-runs the forward over
pieces of the hop and goes back through them, so the gradients stay exact. Like inference sessions, a hop keeps
going while any route exists, within `failover_budget_s` from its first failure (client_sdk.failover): the
failed server is banned and the DHT re-read, so dead servers whose records are still live cost one fast
failure each, never the call.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from client_sdk.failover import FailoverBudget, refresh_view, reroute
from client_sdk.routing import Span
from client_sdk.span_stream import bad_reply
from client_sdk.transport import ChannelPool
from client_sdk.tuning import FLOATS, Tuning, TuningGrads, decode_grads
from swarm.errors import CacheExhausted, InvalidRequest, MissingBlocks, PollenError
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import from_proto, to_proto

if TYPE_CHECKING:
    from client_sdk.config import ClientConfig
    from client_sdk.directory import SwarmView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hop:
    span: Span  # the server that ran blocks [span.start, span.end) of this part's forward
    hidden: torch.Tensor  # the hop's input [rows, seq, hidden]


@dataclass(frozen=True)
class Part:
    rows: slice  # rows of the batch
    hops: list[Hop]
    mask: torch.Tensor | None  # [rows, seq]
    tuning: Tuning | None  # the call's tuning for these rows


@dataclass(frozen=True)
class ForwardTrace:
    """What Backward needs from a Forward call: every part's hops and inputs."""

    start: int
    end: int
    shape: torch.Size  # of the output [batch, seq, hidden]
    parts: list[Part]
    tuning: Tuning | None


class RemoteCalls:
    def __init__(self, pool: ChannelPool, view: SwarmView, model_id: str, config: ClientConfig) -> None:
        self.pool = pool
        self.view = view
        self.model_id = model_id
        self.config = config
        self.last_trace: ForwardTrace | None = None  # of the latest forward (which servers ran it: logs, tests)

    async def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
        start: int = 0,
        end: int | None = None,
        tuning: Tuning | None = None,  # over exactly [start, end)
    ) -> tuple[torch.Tensor, ForwardTrace]:  # output [batch, seq, hidden], and the trace for backward
        end = self.view.num_blocks if end is None else end
        self._check_call(hidden, attention_mask, start, end, tuning)
        batch, seq = hidden.shape[:2]
        count = -(-batch // self._rows_per_part(seq, start, end))  # as few parts as the limit allows, balanced
        bounds = [round(i * batch / count) for i in range(count + 1)]
        parts = list(zip(bounds, bounds[1:], strict=False))

        async def run(a: int, b: int) -> tuple[torch.Tensor, Part]:
            mask = None if attention_mask is None else attention_mask[a:b]
            part_tuning = None if tuning is None else tuning.rows(a, b)
            out, hops = await self._forward_hops(hidden[a:b], mask, start, end, part_tuning)
            return out, Part(slice(a, b), hops, mask, part_tuning)

        results = await asyncio.gather(*(run(a, b) for a, b in parts))
        out = results[0][0] if len(results) == 1 else torch.cat([r[0] for r in results])
        trace = self.last_trace = ForwardTrace(start, end, out.shape, [r[1] for r in results], tuning)
        return out, trace

    async def backward(
        self, grad_output: torch.Tensor, trace: ForwardTrace
    ) -> tuple[torch.Tensor, TuningGrads | None]:  # dLoss/d(input of the first hop), dLoss/d(tuning)
        if grad_output.shape != trace.shape:
            raise InvalidRequest(f"grad_output has shape {list(grad_output.shape)}, the output {list(trace.shape)}")
        if grad_output.dtype not in FLOATS:
            raise InvalidRequest(f"grad_output must be a float tensor, got {grad_output.dtype}")
        tuning = trace.tuning
        grads = TuningGrads.zeros(tuning) if tuning is not None else None

        async def run(part: Part) -> torch.Tensor:
            grad = grad_output[part.rows]
            for hop in reversed(part.hops):
                grad, hop_grads = await self._backward_hop(hop, grad, part.mask, part.tuning)
                if grads is not None and tuning is not None:
                    grads.add_span(tuning, hop.span.start, hop.span.end, hop_grads, part.rows)
            return grad

        results = await asyncio.gather(*(run(part) for part in trace.parts))
        return (results[0] if len(results) == 1 else torch.cat(results)), grads

    # ---- checks and splitting ----------------------------------------------------------------------------

    def _check_call(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, end: int, tuning: Tuning | None
    ) -> None:
        """Wrong input fails here, before anything is sent."""
        if not 0 <= start < end <= self.view.num_blocks:
            raise InvalidRequest(f"block range {start}:{end} is outside the model's {self.view.num_blocks} blocks")
        if hidden.dim() != 3 or 0 in hidden.shape or hidden.dtype not in FLOATS:
            raise InvalidRequest(
                f"hidden states must be a float [batch, seq, hidden] tensor, got {hidden.dtype} {list(hidden.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise InvalidRequest(f"attention_mask must have shape {list(hidden.shape[:2])}, got {list(mask.shape)}")
        if tuning is not None:
            if (tuning.start, tuning.end) != (start, end):
                raise InvalidRequest(f"tuning covers blocks {tuning.start}:{tuning.end}, the call {start}:{end}")
            tuning.check_input(hidden)

    def _rows_per_part(self, seq: int, start: int, end: int) -> int:
        """Rows per part: at most `max_tokens_per_call` tokens, and what the servers of [start, end) take."""
        limit = self.config.max_tokens_per_call
        for r in self.view.records.servers():
            announced = getattr(r, "max_batch_tokens", 0)  # a server's --max-batch-size, when announced
            if r.start < end and start < r.end and announced:
                limit = min(limit, int(announced))
        if seq > limit:
            raise InvalidRequest(
                f"a sequence of {seq} tokens is over the {limit} tokens a Forward/Backward call may carry; "
                "use shorter sequences"
            )
        return max(1, limit // seq)

    # ---- forward -------------------------------------------------------------------------------------------

    async def _forward_hops(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        start: int,
        end: int,
        tuning: Tuning | None,
        budget: FailoverBudget | None = None,  # a failing Backward hop's, when it re-runs its forward in pieces
    ) -> tuple[torch.Tensor, list[Hop]]:
        """One part through [start, end), hop by hop over throughput-weighted routes."""
        hops: list[Hop] = []
        block = start
        cfg = self.config
        while block < end:
            hop_budget = budget or FailoverBudget(cfg.failover_budget_s)
            if hop_budget.failures:  # a split Backward hop: wait for its blocks within the budget
                route = await reroute(self.view, block, end, hop_budget, mode="max_throughput", backoff_s=cfg.backoff_s)
            else:
                route = await self._first_route(block, end)
            while True:
                span = route[0]
                try:
                    out, _ = await self._call(span, hidden, None, mask, tuning)
                    break
                except PollenError as e:
                    await self._failed(span, "forward", e, hop_budget)
                route = await reroute(self.view, block, end, hop_budget, mode="max_throughput", backoff_s=cfg.backoff_s)
            hops.append(Hop(span, hidden))
            hidden, block = out, span.end
        return hidden, hops

    async def _first_route(self, start: int, end: int) -> list[Span]:
        """A route before anything failed: on the view (re-read if old), waiting `missing_blocks_wait_s` for
        missing blocks; if every holder of some blocks failed recently (banned by an earlier call), those are
        tried again rather than failing the call (a restarted server is back; a dead one fails fast)."""
        cfg = self.config
        try:
            return await self.view.wait_route(
                start, end, mode="max_throughput", wait_s=cfg.missing_blocks_wait_s, max_age_s=cfg.max_view_age_s
            )
        except MissingBlocks as e:
            if not e.retryable:
                raise
            try:
                return self.view.route(start, end, mode="max_throughput", ignore_bans=True)
            except MissingBlocks:
                raise e from None

    # ---- backward ------------------------------------------------------------------------------------------

    async def _backward_hop(
        self,
        hop: Hop,
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        tuning: Tuning | None,
        budget: FailoverBudget | None = None,  # shared by the pieces of a split hop
    ) -> tuple[torch.Tensor, TuningGrads]:
        """Backward over exactly the hop's blocks: on the server that ran its forward, else on another one
        holding all of them, else over pieces (their forward is re-run first)."""
        start, end = hop.span.start, hop.span.end
        cfg = self.config
        budget = budget or FailoverBudget(cfg.failover_budget_s)
        span: Span | None = hop.span
        while True:
            if span is None or span.peer_id in self.view.banned():
                if budget.failures or self.view.age_s() > cfg.max_view_age_s:
                    await refresh_view(self.view)  # who died, who restarted, who joined since the forward
                span = self._whole_span(start, end)
            if span is None:
                return await self._split_backward(start, end, hop.hidden, grad, mask, tuning, budget)
            try:
                out, grads = await self._call(span, hop.hidden, grad, mask, tuning)
                return out, grads
            except CacheExhausted as e:  # over the server's Backward limit (activation memory): halve the rows
                if hop.hidden.shape[0] < 2:
                    raise
                log.info("backward of %d rows on %s: %s; splitting the rows in two", hop.hidden.shape[0], span, e)
                return await self._backward_halves(Hop(span, hop.hidden), grad, mask, tuning)
            except PollenError as e:
                await self._failed(span, "backward", e, budget)
                span = None

    async def _backward_halves(
        self, hop: Hop, grad: torch.Tensor, mask: torch.Tensor | None, tuning: Tuning | None
    ) -> tuple[torch.Tensor, TuningGrads]:
        """Backward of a hop as two calls over halves of its rows (one after the other: the server is short of
        memory), with the tuning gradients combined."""
        rows = hop.hidden.shape[0]
        halves = [(0, rows // 2), (rows // 2, rows)]
        results = []
        for a, b in halves:
            sub_mask = None if mask is None else mask[a:b]
            sub_tuning = None if tuning is None else tuning.rows(a, b)
            results.append(await self._backward_hop(Hop(hop.span, hop.hidden[a:b]), grad[a:b], sub_mask, sub_tuning))
        grads = TuningGrads()
        prompts = [g.prompts for _, g in results if g.prompts is not None]
        if prompts:  # per-row prompts: the halves' rows; shared prompts: both halves' sum
            shared = tuning is not None and tuning.prompts is not None and tuning.prompts.shape[1] == 1
            grads.prompts = prompts[0] + prompts[1] if shared else torch.cat(prompts, dim=1)
        for _, g in results:
            for i, (ga, gb) in g.lora.items():
                old = grads.lora.get(i)
                grads.lora[i] = (ga, gb) if old is None else (old[0] + ga, old[1] + gb)
        return torch.cat([r[0] for r in results]), grads

    def _whole_span(self, start: int, end: int) -> Span | None:
        """The fastest live, unbanned server that holds all of [start, end), or None."""
        banned = self.view.banned()
        records = self.view.records.servers()
        whole = [r for r in records if r.start <= start and end <= r.end and r.peer_id not in banned]
        if not whole:
            return None
        r = max(whole, key=lambda r: r.throughput_tps / (1 + r.queued_requests))
        return Span(r.peer_id, r.address, start, end, r)

    async def _split_backward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor | None,
        tuning: Tuning | None,
        budget: FailoverBudget,
    ) -> tuple[torch.Tensor, TuningGrads]:
        """Backward over [start, end) when no live server holds all of it: forward the pieces, then back."""
        _, pieces = await self._forward_hops(hidden, mask, start, end, tuning, budget)
        prompts: list[torch.Tensor] = []
        lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for piece in reversed(pieces):
            grad, piece_grads = await self._backward_hop(piece, grad, mask, tuning, budget)
            if piece_grads.prompts is not None:
                prompts.insert(0, piece_grads.prompts)  # pieces go backwards; prompts are in block order
            lora.update(piece_grads.lora)
        return grad, TuningGrads(torch.cat(prompts) if prompts else None, lora)

    # ---- one call ------------------------------------------------------------------------------------------

    async def _failed(self, span: Span, kind: str, error: PollenError, budget: FailoverBudget) -> None:
        """After a failed call: raise if it cannot be retried or the hop's failover budget is spent, else ban
        the server (a dead one with a live record is not picked again) and back off."""
        left = budget.fail(error)
        self.view.ban(span.peer_id)
        log.warning("%s on %s failed (%s); failover %d, %.0f s left", kind, span, error, budget.failures, left)
        await budget.backoff(self.config.backoff_s)

    async def _call(
        self,
        span: Span,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        grad: torch.Tensor | None,  # None: Forward; else Backward with this dLoss/d(output)
        mask: torch.Tensor | None,
        tuning: Tuning | None,
    ) -> tuple[torch.Tensor, TuningGrads]:  # output (Forward) or grad_input (Backward), tuning grads (Backward)
        kind = "forward" if grad is None else "backward"
        blocks = common_pb2.BlockRange(start=span.start, end=span.end)
        request: shard_pb2.ForwardRequest | shard_pb2.BackwardRequest
        if grad is None:
            request = shard_pb2.ForwardRequest(model_id=self.model_id, blocks=blocks, hidden=to_proto(hidden))
        else:
            grad_output = to_proto(grad.to(hidden.dtype))
            request = shard_pb2.BackwardRequest(
                model_id=self.model_id, blocks=blocks, hidden=to_proto(hidden), grad_output=grad_output
            )
        if mask is not None:
            request.attention_mask.CopyFrom(to_proto(mask))
        if tuning is not None and not tuning.empty:
            request.tuning.CopyFrom(tuning.for_span(span.start, span.end, hidden.dtype))
        reply: Any = await self.pool.call_once(span.address, request, self.config.forward_timeout_s)
        try:
            out = from_proto(reply.hidden if grad is None else reply.grad_input, f"{kind} reply")
        except PollenError as e:
            raise bad_reply(span, f"sent a corrupt tensor: {e}") from e
        if out.shape != hidden.shape:
            raise bad_reply(span, f"returned shape {list(out.shape)} for input {list(hidden.shape)}")
        grads = TuningGrads()
        if grad is not None and tuning is not None:
            grads = decode_grads(reply, tuning, span.start, span.end, str(span))
        self.view.mark_ok(span.peer_id)
        return out, grads
