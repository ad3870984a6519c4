"""BlockBackend: the torch work of a shard server over its loaded span. Pure torch, no I/O, no asyncio: every
method runs on the server's one worker thread (scheduler.py).

One routine serves every inference step, `step(items)`: the steps of any number of sessions (each a KV handle,
an explicit position, its new hidden states, an optional padding mask and beam reorder) become the segments of
one `span.forward` call over their flattened rows; the output is split back per step. Prefill, decode, padded
batches, beams, one session or sixteen: all the same call. Forward and Backward run the same `span.forward`
with cache-less segments.

Tensors come in and go out on the CPU in the caller's float dtype; the backend converts to the server's
device/dtype at the boundary, so a client may send float32 to a bfloat16 server and get float32 back.

Fine-tuning rides on the same calls (swarm/models/lora.py): a step item or a Forward/Backward may carry deep
prompts and LoRA. Backward recomputes the forward (nothing is kept between calls) and returns the gradients w.r.t.
the input, the prompts and the client's LoRA weights (backward.py), in one graph when its estimated activations
fit the server's budget, else block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shard_server.backward import span_gradients
from shard_server.tuning import RequestTuning
from swarm.blocks import BlockRange
from swarm.errors import ServerDraining
from swarm.models import KVCache, Segment, Span
from swarm.models.lora import LoraKey, LoraSet, LoraWeights, linear_modules

# (batch, seq, blocks, whole graph?) -> estimated activation bytes of one Backward (memory.py provides it)
ActivationEstimate = Callable[[int, int, int, bool], int]


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
        cache = self.cache  # one read: /metrics calls this from its own thread
        return cache.nbytes if cache is not None else 0


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
    lora: LoraSet | None = None  # the session's LoRA (adapter and/or client's), on the compute device
    prompts: torch.Tensor | None = None  # deep prompts [span_blocks, batch | 1, pre_seq_len, hidden], as sent

    @property
    def rows(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


@dataclass(eq=False)
class Gradients:
    """What a Backward returns, on the CPU in the dtypes the client sent."""

    grad_input: torch.Tensor  # [batch, seq, hidden]
    grad_prompts: torch.Tensor | None = None  # same shape as the sent prompts
    grad_lora: list[tuple[LoraKey, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (key, dA, dB)


class BlockBackend:
    def __init__(self, span: Span, device: torch.device, dtype: torch.dtype) -> None:
        self.blocks = span.blocks
        self.hidden_size = span.family.hidden_size
        self.device = device
        self.dtype = dtype
        # Sub-range spans share the loaded layers; at most n(n+1)/2 of them, each a few small objects.
        self._spans: dict[BlockRange, Span] = {span.blocks: span}
        # Backward keeps one autograd graph over the span only while its estimate fits this budget; above it,
        # one block at a time. Set by the server from its memory plan (default: always one block at a time).
        self.activation_budget_bytes = 0
        self.released = False  # set when the weights are emptied (lifecycle._unload): every later call is refused
        self.estimate_activations: ActivationEstimate | None = None

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """{module path: (in, out)} of the linear layers LoRA may target in this model's blocks."""
        return linear_modules(self.span.layers[0])

    @property
    def span(self) -> Span:
        return self._spans[self.blocks]

    def span_for(self, blocks: BlockRange) -> Span:
        if self.released:  # a request queued before a pause or move ran after the weights were emptied
            raise ServerDraining("this server unloaded its blocks (paused or moving); continue on another server")
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
        prompts = None if item.prompts is None else self._to_compute(item.prompts).unbind(0)
        batch, tokens = item.hidden.shape[0], item.hidden.shape[1]
        return Segment(batch, tokens, handle.cache, item.input_pos, mask, prompts, item.lora)

    def session_lora(self, tuning: RequestTuning) -> LoraSet | None:
        """A session's LoRA on the compute device: its adapter plus the client's own weights (sent once)."""
        client = LoraSet.of(tuning.lora).to(self.device, self.dtype) if tuning.lora else None
        return LoraSet.combine(tuning.adapter, client)

    # ---- stateless requests (fine-tuning clients) -------------------------------------------------------------

    def forward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        mask: torch.Tensor | None = None,  # [batch, seq], nonzero = real token
        tuning: RequestTuning | None = None,
    ) -> torch.Tensor:  # [batch, seq, hidden], CPU, dtype of `hidden`
        with torch.inference_mode():
            x = self._to_compute(hidden)
            seg = self._request_segment(x.shape[0], x.shape[1], mask, tuning, None, None)
            out = self.span_for(blocks)(x.reshape(seg.rows, -1), [seg])
            return out.view(hidden.shape).to(dtype=hidden.dtype).cpu()

    def backward(
        self,
        blocks: BlockRange,
        hidden: torch.Tensor,  # [batch, seq, hidden]: the span's inputs
        grad_output: torch.Tensor,  # [batch, seq, hidden]: dLoss/d(outputs)
        mask: torch.Tensor | None = None,
        tuning: RequestTuning | None = None,
    ) -> Gradients:
        """Gradients w.r.t. the inputs, the prompts and the client's LoRA; the server's weights stay frozen."""
        span = self.span_for(blocks)
        batch, seq, _ = hidden.shape
        x = self._plain(hidden).reshape(batch * seq, -1)  # [N, hidden]
        g = self._to_compute(grad_output).reshape(batch * seq, -1)
        # Leaves: the tensors the client's gradients are taken w.r.t. (in the compute dtype)
        prompts = None
        if tuning is not None and tuning.prompts is not None:
            prompts = [self._leaf(p) for p in tuning.prompts.unbind(0)]
        client = [
            (key, LoraWeights(self._leaf(w.a), self._leaf(w.b), w.scaling))
            for key, w in (tuning.lora if tuning is not None else [])
        ]
        seg = self._request_segment(batch, seq, mask, tuning, prompts, client)
        grads = span_gradients(span, x, g, seg, prompts, client, self._whole_graph(batch, seq, len(blocks)))
        result = Gradients(grads[0].view(hidden.shape).to(dtype=hidden.dtype).cpu())
        rest = grads[1:]
        if prompts is not None and tuning is not None and tuning.prompts is not None:
            result.grad_prompts = torch.stack(rest[: len(prompts)]).to(dtype=tuning.prompts.dtype).cpu()
            rest = rest[len(prompts) :]
        for (key, sent), da, db in zip(tuning.lora if tuning else [], rest[0::2], rest[1::2], strict=True):
            result.grad_lora.append((key, da.to(dtype=sent.a.dtype).cpu(), db.to(dtype=sent.b.dtype).cpu()))
        return result

    def _whole_graph(self, batch: int, seq: int, blocks: int) -> bool:
        if self.estimate_activations is None:
            return False
        return self.estimate_activations(batch, seq, blocks, True) <= self.activation_budget_bytes

    def _request_segment(
        self,
        batch: int,
        seq: int,
        mask: torch.Tensor | None,
        tuning: RequestTuning | None,
        prompts: list[torch.Tensor] | None,  # Backward's leaves, else converted here
        client: list[tuple[LoraKey, LoraWeights]] | None,  # Backward's leaves, else converted here
    ) -> Segment:
        """The one cache-less segment of a Forward/Backward request, with its tuning on the compute device."""
        seg_mask = None if mask is None else mask.to(device=self.device, dtype=torch.bool)
        if tuning is None:
            return Segment(batch, seq, None, 0, seg_mask)
        if prompts is None and tuning.prompts is not None:
            prompts = list(self._to_compute(tuning.prompts).unbind(0))
        if client is None:
            client = [
                (key, LoraWeights(self._to_compute(w.a), self._to_compute(w.b), w.scaling)) for key, w in tuning.lora
            ]
        lora = LoraSet.combine(tuning.adapter, LoraSet.of(client) if client else None)
        return Segment(batch, seq, None, 0, seg_mask, prompts, lora)

    def _leaf(self, t: torch.Tensor) -> torch.Tensor:
        return self._plain(t).requires_grad_(True)

    def _plain(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in the compute dtype, detached, and not an inference tensor (an in-process caller's Forward output
        is one, and could not join a graph)."""
        t = self._to_compute(t)
        return t.clone() if t.is_inference() else t.detach()

    def _to_compute(self, t: torch.Tensor) -> torch.Tensor:
        # No copy when the client already sends the server's dtype on the server's device.
        return t.to(device=self.device, dtype=self.dtype)
