"""BlockBackend: the torch work of a shard server (forward, backward, inference steps alone or batched across
sessions) over its loaded span. Pure torch, no I/O, no asyncio: every method runs on the server's worker thread.

Tensors come in and go out on the CPU in the caller's float dtype; the backend converts to the server's
device/dtype at the boundary so clients may send float32 to a bfloat16 server and get float32 back.
When an attention mask is given, positions are derived from it as transformers' `generate` does for left
padding (`cumsum(mask) - 1`), so padded rows see the same positions as unpadded ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from shard_server.decode import batched_decode, supports_batched_decode
from shard_server.kv_cache import PreallocatedLayer, cache_nbytes, new_preallocated_cache
from shard_server.loader import ModelInfo, sub_span
from swarm.blocks import BlockRange
from swarm.models import BlockSpan
from swarm.models.llama import LlamaSpan

if TYPE_CHECKING:
    from shard_server.cache import Session


class BlockBackend:
    def __init__(self, info: ModelInfo, span: BlockSpan, device: torch.device, dtype: torch.dtype) -> None:
        self.info = info
        self.blocks = span.blocks
        self.hidden_size = info.family.hidden_size
        self.device = device
        self.dtype = dtype
        # Sub-range spans share the loaded layers; at most n(n+1)/2 of them, each a few small buffers.
        self._spans: dict[BlockRange, BlockSpan] = {span.blocks: span}
        self._batchable = supports_batched_decode(span)

    def span_for(self, blocks: BlockRange) -> BlockSpan:
        span = self._spans.get(blocks)
        if span is None:
            span = sub_span(self.info, self._spans[self.blocks], blocks)
            self._spans[blocks] = span
        return span

    def new_cache(self, blocks: BlockRange, max_length: int | None = None) -> Any:
        """A session's KV cache over `blocks` (a prefix of the held range: local layers 0..n-1): preallocated for
        `max_length` tokens at the first write (what servers use), or the family's growing cache without one."""
        span = self.span_for(blocks)
        if max_length is None:
            return span.new_cache()
        return new_preallocated_cache(span.slice_config, len(blocks), max_length)  # type: ignore[attr-defined]

    def can_batch(self, blocks: BlockRange) -> bool:
        return self._batchable

    def measure_kv_bytes_per_token(self) -> int:
        """KV bytes of one token (batch 1) through ONE block, measured with a real cache (exact for any family)."""
        cache = self.new_cache(self.blocks, 1)
        self.inference_step(self.blocks, cache, 0, torch.zeros(1, 1, self.hidden_size))
        return max(1, cache_nbytes(cache) // len(self.blocks))

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
            self._prepare(span, cache, position, hypo_ids)
            mask, positions = self._mask_and_positions(attention_mask, hidden.shape[1])
            out = span(self._to_compute(hidden), cache, mask, positions)
            return out.to(dtype=hidden.dtype).cpu()

    def session_step(
        self,
        session: Session,
        position: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step of one session; its KV cache is created here, so all torch state lives on the worker."""
        if session.cache is None:
            session.cache = self.new_cache(session.blocks, session.max_length)
        if hidden.shape[1] == 1 and attention_mask is None and self._batchable:
            # The same code as a batched decode, so a step gives the same numbers alone or batched.
            return self.decode_batch(session.blocks, [(session, position, hidden, hypo_ids)])[0]
        return self.inference_step(session.blocks, session.cache, position, hidden, attention_mask, hypo_ids)

    def decode_batch(
        self,
        blocks: BlockRange,
        steps: Sequence[tuple[Session, int, torch.Tensor, torch.Tensor | None]],  # (session, position, [b,1,H], hypo)
    ) -> list[torch.Tensor]:  # per step [b, 1, hidden], CPU, dtype of its input
        """Single-token steps of several sessions over the same blocks as one batched forward (decode.py)."""
        span = self.span_for(blocks)
        assert isinstance(span, LlamaSpan)
        with torch.inference_mode():
            caches = []
            for session, position, _, hypo_ids in steps:
                if session.cache is None:
                    session.cache = self.new_cache(session.blocks, session.max_length)
                self._prepare(span, session.cache, position, hypo_ids)
                caches.append(session.cache)
            hidden = torch.cat([self._to_compute(h) for _, _, h, _ in steps], dim=0)  # [rows, 1, hidden]
            rows = [h.shape[0] for _, _, h, _ in steps]
            out = batched_decode(span, hidden, caches, rows).cpu()
            parts = out.split(rows, dim=0)
            return [p.to(dtype=h.dtype) for p, (_, _, h, _) in zip(parts, steps, strict=True)]

    def measure_throughput(self, steps: int = 4) -> float:
        """Tokens/s of single-token inference steps through the whole span (kept for callers; see throughput.py)."""
        from shard_server.throughput import measure_inference_tps

        return measure_inference_tps(self, steps)

    def _prepare(self, span: BlockSpan, cache: Any, position: int, hypo_ids: torch.Tensor | None) -> None:
        """Roll the cache back to `position` and apply a beam reorder, before this step writes to it."""
        layers = getattr(cache, "layers", ())
        if layers and all(isinstance(layer, PreallocatedLayer) for layer in layers):
            # Per layer, so a step that failed half-way through the layers is rolled back exactly too.
            for layer in layers:
                if layer.length > position:
                    layer.crop(position - layer.length)
        elif position < span.cache_length(cache):
            span.crop_cache(cache, position)
        if hypo_ids is not None:
            span.reorder_cache(cache, hypo_ids.to(self.device))

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
