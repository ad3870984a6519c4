"""BlockBackend: the torch work of a shard server (forward, backward, one inference step) over its loaded
span. Pure torch, no I/O, no asyncio: every method runs on the server's single worker thread.

Tensors come in and go out on the CPU in the caller's float dtype; the backend converts to the server's
device/dtype at the boundary so clients may send float32 to a bfloat16 server and get float32 back.
When an attention mask is given, positions are derived from it as transformers' `generate` does for left
padding (`cumsum(mask) - 1`), so padded rows see the same positions as unpadded ones.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from shard_server.loader import ModelInfo, sub_span
from swarm.blocks import BlockRange
from swarm.models import BlockSpan


class BlockBackend:
    def __init__(self, info: ModelInfo, span: BlockSpan, device: torch.device, dtype: torch.dtype) -> None:
        self.info = info
        self.blocks = span.blocks
        self.hidden_size = info.family.hidden_size
        self.device = device
        self.dtype = dtype
        # Sub-range spans share the loaded layers; at most n(n+1)/2 of them, each a few small buffers.
        self._spans: dict[BlockRange, BlockSpan] = {span.blocks: span}

    def span_for(self, blocks: BlockRange) -> BlockSpan:
        span = self._spans.get(blocks)
        if span is None:
            span = sub_span(self.info, self._spans[self.blocks], blocks)
            self._spans[blocks] = span
        return span

    def new_cache(self, blocks: BlockRange) -> Any:
        """An empty KV cache for a session over `blocks` (a prefix of the held range: local layers 0..n-1)."""
        return self.span_for(blocks).new_cache()

    def forward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
    ) -> torch.Tensor:  # [batch, seq, hidden], CPU, dtype of `hidden`
        span = self.span_for(blocks)
        with torch.inference_mode():
            mask, positions = self._mask_and_positions(attention_mask, hidden.shape[1])
            out = span(self._to_compute(hidden), None, mask, positions)
            return out.to(dtype=hidden.dtype).cpu()

    def backward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden] inputs of the span
        grad_output: torch.Tensor,  # [batch, seq, hidden] dLoss/d(outputs)
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [batch, seq, hidden] dLoss/d(inputs), CPU, dtype of `hidden`
        span = self.span_for(blocks)
        # Recompute the forward with a graph: the server keeps no activations between Forward and Backward.
        with torch.enable_grad():
            x = self._to_compute(hidden).detach().requires_grad_(True)
            mask, positions = self._mask_and_positions(attention_mask, hidden.shape[1])
            out = span(x, None, mask, positions)
            (grad,) = torch.autograd.grad(out, x, self._to_compute(grad_output))
        return grad.to(dtype=hidden.dtype).cpu()

    def inference_step(
        self,
        blocks: BlockRange,
        cache: Any,
        position: int,
        hidden: torch.Tensor,  # [batch, new_tokens, hidden]
        attention_mask: torch.Tensor | None = None,  # [batch, position + new_tokens]
        hypo_ids: torch.Tensor | None = None,  # int64 [batch]
    ) -> torch.Tensor:  # [batch, new_tokens, hidden], CPU, dtype of `hidden`
        """Append this step's keys/values to `cache` at `position` (rolling back anything after it first)."""
        span = self.span_for(blocks)
        with torch.inference_mode():
            if position < span.cache_length(cache):
                span.crop_cache(cache, position)
            if hypo_ids is not None:
                span.reorder_cache(cache, hypo_ids.to(self.device))
            mask, positions = self._mask_and_positions(attention_mask, hidden.shape[1])
            out = span(self._to_compute(hidden), cache, mask, positions)
            return out.to(dtype=hidden.dtype).cpu()

    def measure_throughput(self, steps: int = 4) -> float:
        """Tokens/s of single-token inference steps through the whole span, after one warm-up prefill+step."""
        cache = self.new_cache(self.blocks)
        token = torch.randn(1, 1, self.hidden_size)
        self.inference_step(self.blocks, cache, 0, token)  # warm-up: first calls allocate and pick kernels
        self.inference_step(self.blocks, cache, 1, token)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            self.inference_step(self.blocks, cache, 2 + i, token)
            times.append(time.perf_counter() - t0)
        return 1.0 / max(statistics.median(times), 1e-6)

    def _to_compute(self, t: torch.Tensor) -> torch.Tensor:
        # No copy when the client already sends the server's dtype on the server's device.
        return t.to(device=self.device, dtype=self.dtype)

    def _mask_and_positions(
        self, attention_mask: torch.Tensor | None, new_tokens: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if attention_mask is None:
            return None, None  # the span counts positions from its cache length
        mask = attention_mask.to(device=self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]  # [batch, new_tokens]
        return mask, positions
