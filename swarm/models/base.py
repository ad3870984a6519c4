"""What every model family provides, in plain torch (gpt-fast's `model.py` is the model):

- `KVCache`: one session's keys/values over a span, preallocated for `max_length` tokens and written at explicit
  positions (`update(layer, input_pos, k, v)`). Nothing is ever cropped: a step at `input_pos` overwrites from
  there and attends to slots [0, input_pos + tokens), so rolling back is just stepping at an earlier position.
- `Segment`: one session's share of a step (or one whole Forward/Backward request, without a cache). A step batch
  is a list of segments whose tokens are flattened into one `[N, hidden]` tensor: projections, norms and MLPs
  run once over all N rows (the weight-bound work), attention runs per segment over that segment's own cache.
  Prefill, decode, left-padded steps, batched steps of many sessions, Forward and Backward are all this one path.
  A segment may carry fine-tuning (deep prompts, LoRA; see lora.py): it batches with untuned ones all the same.
- `Span`: blocks [start, end) of one model on one server: the family's layers plus its per-hop prologue.
- `ClientHead`: embeddings in, logits out (what a client keeps locally).
- `ModelFamily`: one architecture: its config class, checkpoint names, block/span/head builders.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models.config import ModelConfig
from swarm.models.lora import LoraSet, SpanTuning


class CacheOverflow(ValueError):
    """A step would write past the session's reserved max_length (servers check before; this is the guard)."""


class KVCache:
    """Keys and values of one session over the layers of a span: two `[layers, batch, kv_heads, max_length,
    head_dim]` buffers allocated once. The reserved `max_length` is exactly the memory a session can use."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (layers, batch, kv_heads, max_length, head_dim)
        # torch.empty: only slots below the written position are ever read, so zero-filling would be wasted time
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_length = max_length

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, input_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[batch, kv_heads, t, head_dim]` at slots [input_pos, input_pos + t); return slots [0, end)."""
        end = input_pos + k.shape[2]
        if end > self.max_length:
            raise CacheOverflow(f"KV cache holds {self.max_length} tokens; cannot write up to {end}")
        self.k[layer, :, :, input_pos:end] = k
        self.v[layer, :, :, input_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # [batch, kv_heads, end, head_dim] views

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Beam search: batch row i becomes old row rows[i], for the first `length` slots."""
        idx = rows.to(self.k.device)
        # index_select copies, so overlapping source/target rows are safe
        self.k[:, :, :, :length] = self.k[:, :, :, :length].index_select(1, idx)
        self.v[:, :, :, :length] = self.v[:, :, :, :length].index_select(1, idx)


@dataclass(eq=False)
class Segment:
    """One session's part of a step batch: `batch × tokens` new rows of the flattened `[N, hidden]` input
    (batch-major: row r of the segment is batch r // tokens, token r % tokens).

    With `kv`, the new tokens' keys/values are written at slots [input_pos, input_pos + tokens) and attention
    sees slots [0, input_pos + tokens); without it (Forward/Backward) it sees the segment's own tokens only.
    `mask` marks real tokens (False = left padding) over all those slots; positions (rotary, ALiBi) then count
    real tokens only, as transformers' `generate` does (`cumsum(mask) - 1`).

    Fine-tuning, in the compute dtype and device: `prompts` (deep prompts, per local layer of the span
    `[batch | 1, pre_seq_len, hidden]`, added before that layer to the rows at slots < pre_seq_len) and `lora`
    (added to the segment's rows of the linear layers it names).
    """

    batch: int
    tokens: int
    kv: KVCache | None = None
    input_pos: int = 0
    mask: torch.Tensor | None = None  # bool [batch, input_pos + tokens]
    prompts: Sequence[torch.Tensor] | None = None
    lora: LoraSet | None = None

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def tuned(self) -> bool:
        return self.prompts is not None or self.lora is not None

    @property
    def kv_length(self) -> int:
        return self.input_pos + self.tokens

    def key_positions(self, device: torch.device) -> torch.Tensor:  # int64 [batch, input_pos + tokens]
        if self.mask is None:
            return torch.arange(self.kv_length, device=device).expand(self.batch, -1)
        return (self.mask.to(device).long().cumsum(-1) - 1).clamp(min=0)

    def positions(self, device: torch.device) -> torch.Tensor:  # int64 [batch, tokens]: of the new tokens
        if self.mask is None:
            return torch.arange(self.input_pos, self.kv_length, device=device).expand(self.batch, -1)
        return self.key_positions(device)[:, self.input_pos :]

    def allowed(self, device: torch.device, window: int | None = None) -> torch.Tensor | None:
        """bool [batch, 1, tokens, input_pos + tokens]: which slots each new token may attend to; None = all.

        Causal, minus padding, minus slots that left a sliding window. A padding token may always attend to
        itself: a row with nothing to attend to would give NaN, and NaN values at padded slots would leak into
        real rows through `0 * NaN` in the attention product.
        """
        length = self.kv_length
        if self.tokens == 1 and self.mask is None and (window is None or length <= window):
            return None  # one new token, no padding: everything before it is visible
        query = torch.arange(self.input_pos, length, device=device).unsqueeze(1)  # [tokens, 1]
        key = torch.arange(length, device=device).unsqueeze(0)  # [1, length]
        ok = key <= query
        if window is not None:
            ok = ok & (key > query - window)
        ok = ok.expand(self.batch, 1, -1, -1)  # [batch, 1, tokens, length]
        if self.mask is not None:
            real = self.mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            ok = (ok & real) | (key == query)
        return ok


def segment_for(
    hidden: torch.Tensor, kv: KVCache | None = None, input_pos: int = 0, mask: torch.Tensor | None = None
) -> Segment:
    """The one segment of a `[batch, tokens, hidden]` input."""
    return Segment(hidden.shape[0], hidden.shape[1], kv, input_pos, None if mask is None else mask.bool())


def attend(
    q: torch.Tensor,  # [N, heads, head_dim], positions applied
    k: torch.Tensor,  # [N, kv_heads, head_dim]
    v: torch.Tensor,  # [N, kv_heads, head_dim]
    segments: Sequence[Segment],
    masks: Sequence[torch.Tensor | None],  # per segment: bool allowed, or a float bias, [batch, 1|heads, t, L]
    layer: int,  # index into each segment's KVCache
    scale: float | None = None,
) -> torch.Tensor:  # [N, heads * head_dim]
    """Scaled dot-product attention of every segment over its own keys (its cache, or its own tokens)."""
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    out = []
    a = 0
    for seg, mask in zip(segments, masks, strict=True):
        b = a + seg.rows
        qs = q[a:b].view(seg.batch, seg.tokens, heads, head_dim).transpose(1, 2)  # [batch, heads, t, hd]
        ks = k[a:b].view(seg.batch, seg.tokens, kv_heads, -1).transpose(1, 2)  # [batch, kv_heads, t, hd]
        vs = v[a:b].view(seg.batch, seg.tokens, kv_heads, -1).transpose(1, 2)
        if seg.kv is not None:
            ks, vs = seg.kv.update(layer, seg.input_pos, ks, vs)  # [batch, kv_heads, L, hd]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)
        out.append(o.transpose(1, 2).reshape(seg.rows, heads * vs.shape[-1]))
        a = b
    return out[0] if len(out) == 1 else torch.cat(out)


def run_span(
    span: Span,
    hidden: torch.Tensor,  # [batch, tokens, hidden]
    kv: KVCache | None = None,
    input_pos: int = 0,
    mask: torch.Tensor | None = None,  # [batch, input_pos + tokens]
) -> torch.Tensor:  # [batch, tokens, hidden]
    """One input through a span (tests, Forward/Backward): the one-segment case of `Span.forward`."""
    seg = segment_for(hidden, kv, input_pos, mask)
    return span(hidden.reshape(seg.rows, -1), [seg]).view_as(hidden)


class Span(nn.Module):
    """Blocks [start, end) of one model on one server. Pure torch: no I/O, no locks.

    `forward(x, segments)` is the only compute entry point: `x` is `[N, hidden]`, the segments' rows in order.
    Families implement `prologue` (what is computed once per hop and shared by all layers: rotary tables,
    attention masks or ALiBi biases) and their layers' `forward(x, segments, ctx, layer_index)`.
    A hop with a tuned segment runs through `tuning` (lora.SpanTuning); the others never touch it.
    """

    def __init__(self, family: ModelFamily, layers: Sequence[nn.Module], blocks: BlockRange) -> None:
        super().__init__()
        self.family = family
        self.layers = nn.ModuleList(layers)
        self.blocks = blocks
        self._tuning: SpanTuning | None = None  # built at the first tuned hop

    def forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        ctx = self.prologue(x, segments)
        if not any(seg.tuned for seg in segments):  # the one check a plain hop pays for fine-tuning
            for i, layer in enumerate(self.layers):
                x = layer(x, segments, ctx, i)
            return x
        tuning = self.tuning
        tuning.begin(x, segments)
        try:
            for i in range(len(self.layers)):
                x = tuning.layer(i, x, segments, ctx)
        finally:
            tuning.end()
        return x

    @property
    def tuning(self) -> SpanTuning:
        """The tuned path over this span's layers (Backward drives it layer by layer)."""
        if self._tuning is None:
            self._tuning = SpanTuning(list(self.layers), self.blocks.start)
        return self._tuning

    @abc.abstractmethod
    def prologue(self, x: torch.Tensor, segments: Sequence[Segment]) -> Any:
        """Per-hop state every layer reads (masks, rotary cos/sin of the N rows, ...)."""

    def new_kv(self, batch: int, max_length: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """An empty cache for one session over all of this span's layers, in the compute dtype."""
        family = self.family
        return KVCache(len(self.layers), batch, family.kv_heads, max_length, family.config.head_dim, dtype, device)

    def sub(self, blocks: BlockRange) -> Span:
        """A span over some of these already-loaded layers (shared, not copied)."""
        layers = list(self.layers[blocks.start - self.blocks.start : blocks.end - self.blocks.start])
        return type(self)(self.family, layers, blocks)


class ClientHead(nn.Module, abc.ABC):
    """The parts a client keeps locally: token embeddings in, logits out."""

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        ...

    @abc.abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, seq, vocab]
        ...


def frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class ModelFamily(abc.ABC):
    """One architecture. Adding a family = one module with a config, a layer, a span, a head and this."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type[ModelConfig]]
    # Some checkpoints exist both with and without the base model's prefix (BLOOM's "transformer.h.0..." vs
    # "h.0..." when saved from `BloomModel`); load_block/load_head accept both spellings.
    base_model_prefix: ClassVar[str] = ""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def kv_heads(self) -> int:
        """Key/value heads stored per token per block (1 for multi-query attention)."""
        return self.config.num_key_value_heads

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes of keys + values per token per block."""
        return 2 * self.kv_heads * self.config.head_dim * element_bytes

    @abc.abstractmethod
    def block_prefix(self, block: int) -> str:
        """Checkpoint key prefix of global block `block`, e.g. "model.layers.3."."""

    @abc.abstractmethod
    def build_block(self) -> nn.Module:
        """An empty block (call under `torch.device("meta")` to allocate nothing)."""

    @abc.abstractmethod
    def make_span(self, layers: Sequence[nn.Module], blocks: BlockRange) -> Span:
        """Wrap loaded blocks into a span."""

    @abc.abstractmethod
    def head_keys(self) -> dict[str, str]:
        """Local part name → checkpoint key, e.g. {"embed_tokens.weight": "model.embed_tokens.weight"}."""

    @abc.abstractmethod
    def make_head(self, tensors: dict[str, torch.Tensor]) -> ClientHead:
        """Build the client's local parts from tensors named as in `head_keys`."""

    def convert_block_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map one block's checkpoint tensors (prefix stripped) to the block module's state dict names."""
        return tensors

    def load_block(self, checkpoint: Checkpoint, block: int) -> nn.Module:
        """Global block `block`, reading only its own tensors; frozen, in eval mode."""
        with torch.device("meta"):  # no memory for random weights: the checkpoint tensors are adopted as is
            module = self.build_block()
        prefix = self.checkpoint_name(checkpoint, self.block_prefix(block), prefix=True)
        tensors = checkpoint.read_prefix(prefix)
        if not tensors:
            raise KeyError(f"the checkpoint at {checkpoint.model_path} has no tensors under {prefix!r}")
        module.load_state_dict(self.convert_block_weights(tensors), strict=True, assign=True)
        on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if on_meta:
            raise RuntimeError(f"block {block}: tensors left on the meta device after loading: {on_meta}")
        return frozen(module)

    def load_head(self, checkpoint: Checkpoint, dtype: torch.dtype | None = None) -> ClientHead:
        """The client's local parts (embeddings, final norm, LM head), read from the checkpoint."""
        names = {name: self.checkpoint_name(checkpoint, key) for name, key in self.head_keys().items()}
        tensors = checkpoint.read(names.values())
        local = {name: tensors[key] for name, key in names.items()}
        if dtype is not None:
            local = {name: t.to(dtype) for name, t in local.items()}
        return frozen(self.make_head(local))  # type: ignore[return-value]

    def checkpoint_name(self, checkpoint: Checkpoint, name: str, prefix: bool = False) -> str:
        """`name` (a key, or a key prefix) as this checkpoint spells it: as given, or without `base_model_prefix`."""

        def exists(candidate: str) -> bool:
            return bool(checkpoint.keys_with_prefix(candidate)) if prefix else checkpoint.has(candidate)

        short = name.removeprefix(self.base_model_prefix)
        return short if short != name and not exists(name) and exists(short) else name
