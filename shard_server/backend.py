"""BlockBackend: the torch work of a shard server over its loaded span. Pure torch, no I/O, no asyncio: every
method runs on the server's one worker thread (scheduler.py).

One routine serves every inference step, `step(items)`: the steps of any number of sessions (each a KV handle,
an explicit position, its new hidden states, an optional padding mask and beam reorder) become the segments of
one `span.forward` call over their flattened rows; the output is split back per step. Prefill, decode, padded
batches, beams, one session or sixteen: all the same call. Forward and Backward run the same `span.forward`
with cache-less segments.

Tensors come in and go out on the CPU in the caller's float dtype; the backend converts to the server's
device/dtype at the boundary, so a client may send float32 to a bfloat16 server and get float32 back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm.blocks import BlockRange
from swarm.models import KVCache, Segment, Span


@dataclass(eq=False)
class KvHandle:
    """One session's KV cache over blocks [held.start, b): its size is fixed when the session opens (and its bytes
    reserved then), the tensors are allocated on the worker at the session's first step."""

    blocks: BlockRange
    batch: int
    max_length: int
    cache: KVCache | None = None

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


@dataclass(eq=False)
class StepItem:
    """One session's share of a step batch: `hidden` [batch, tokens, hidden] written at slots
    [input_pos, input_pos + tokens) of `kv` (whatever was there before is overwritten: rollback is free)."""

    kv: KvHandle
    input_pos: int
    hidden: torch.Tensor  # [batch, tokens, hidden], CPU, the client's dtype
    mask: torch.Tensor | None = None  # bool [batch, input_pos + tokens]: False = left padding
    # Beam search: batch row i continues old row reorder[i] (int64 [batch]). Applied to the first input_pos slots
    # before this step writes, then cleared, so a step retried after a failed batch does not reorder twice.
    reorder: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


class BlockBackend:
    def __init__(self, span: Span, device: torch.device, dtype: torch.dtype) -> None:
        self.blocks = span.blocks
        self.hidden_size = span.family.hidden_size
        self.device = device
        self.dtype = dtype
        # Sub-range spans share the loaded layers; at most n(n+1)/2 of them, each a few small objects.
        self._spans: dict[BlockRange, Span] = {span.blocks: span}

    @property
    def span(self) -> Span:
        return self._spans[self.blocks]

    def span_for(self, blocks: BlockRange) -> Span:
        span = self._spans.get(blocks)
        if span is None:
            span = self._spans[blocks] = self.span.sub(blocks)
        return span

    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token (batch 1) through ONE block, measured on a real cache (exact for every family)."""
        return max(1, self.span.new_kv(1, 1, self.dtype, self.device).nbytes // len(self.blocks))

    # ---- the step routine ---------------------------------------------------------------------------------

    def step(self, items: Sequence[StepItem]) -> list[torch.Tensor]:
        """Run the steps of several sessions over the same blocks as ONE span.forward; per item
        [batch, tokens, hidden] on the CPU in the dtype of its input."""
        blocks = items[0].kv.blocks
        if any(item.kv.blocks != blocks for item in items):
            raise ValueError("one step batch must cover one block range (the scheduler groups by blocks)")
        span = self.span_for(blocks)
        with torch.inference_mode():
            segments = [self._segment(span, item) for item in items]
            if len(items) == 1:
                x = self._to_compute(items[0].hidden).reshape(items[0].rows, -1)
            else:
                x = torch.cat([self._to_compute(item.hidden).reshape(item.rows, -1) for item in items])  # [N, hidden]
            out = span(x, segments)  # [N, hidden]
            parts = out.split([item.rows for item in items]) if len(items) > 1 else (out,)
            return [
                p.view(item.hidden.shape).to(dtype=item.hidden.dtype).cpu()
                for p, item in zip(parts, items, strict=True)
            ]

    def _segment(self, span: Span, item: StepItem) -> Segment:
        handle = item.kv
        if handle.cache is None:
            handle.cache = span.new_kv(handle.batch, handle.max_length, self.dtype, self.device)
        if item.reorder is not None:
            handle.cache.reorder(item.reorder, item.input_pos)
            item.reorder = None
        mask = None if item.mask is None else item.mask.to(device=self.device, dtype=torch.bool)
        return Segment(item.hidden.shape[0], item.hidden.shape[1], handle.cache, item.input_pos, mask)

    # ---- stateless requests (fine-tuning clients) -------------------------------------------------------------

    def forward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        mask: torch.Tensor | None = None,  # [batch, seq], nonzero = real token
    ) -> torch.Tensor:  # [batch, seq, hidden], CPU, dtype of `hidden`
        with torch.inference_mode():
            out = self._run(blocks, self._to_compute(hidden), mask)
            return out.to(dtype=hidden.dtype).cpu()

    def backward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden]: the span's inputs
        grad_output: torch.Tensor,  # [batch, seq, hidden]: dLoss/d(outputs)
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [batch, seq, hidden]: dLoss/d(inputs), CPU, dtype of `hidden`
        # Recompute the forward with a graph: the server keeps no activations between Forward and Backward.
        with torch.enable_grad():
            x = self._to_compute(hidden).detach().requires_grad_(True)
            out = self._run(blocks, x, mask)
            (grad,) = torch.autograd.grad(out, x, self._to_compute(grad_output))
        return grad.to(dtype=hidden.dtype).cpu()

    def _run(self, blocks: BlockRange, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        seg = Segment(batch, seq, None, 0, None if mask is None else mask.to(device=self.device, dtype=torch.bool))
        return self.span_for(blocks)(x.reshape(batch * seq, -1), [seg]).view(x.shape)

    def _to_compute(self, t: torch.Tensor) -> torch.Tensor:
        # No copy when the client already sends the server's dtype on the server's device.
        return t.to(device=self.device, dtype=self.dtype)
