"""What every model family provides: how to build a span of blocks for servers, and the local parts
(embeddings, final norm, LM head) for clients. Server, client and protocol only see these interfaces.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint


def new_session_cache(slice_config: PretrainedConfig) -> DynamicCache:
    """A DynamicCache with one layer per local block (sliding-window layers where the config asks for them).

    Sliding-window layers normally drop tokens that left the window, which makes rolling back (`crop_cache`)
    impossible once the window is full. With past recording on they keep the whole session instead; attention
    still sees only the window, so outputs are unchanged. Memory then grows like a full-attention cache.
    """
    cache = DynamicCache(config=slice_config)
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.activate_past_recording()
    return cache


def layer_norm(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> nn.LayerNorm:
    """A frozen LayerNorm around loaded tensors (for client heads)."""
    norm = nn.LayerNorm(weight.shape[0], eps=eps, device="meta")  # meta: adopt the tensors, allocate nothing
    norm.weight = nn.Parameter(weight, requires_grad=False)
    norm.bias = nn.Parameter(bias, requires_grad=False)
    return norm


class BlockSpan(nn.Module, abc.ABC):
    """Blocks [start, end) of one model on one server. Pure torch: no I/O, no locks."""

    def __init__(self, config: PretrainedConfig, blocks: BlockRange) -> None:
        super().__init__()
        self.config = config
        self.blocks = blocks

    @abc.abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache for one session on this span (indexed by local layer 0..n-1)."""

    @abc.abstractmethod
    def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq], 1 = token, 0 = padding
        position_ids: torch.Tensor | None = None,  # [batch, seq]
    ) -> torch.Tensor:  # [batch, seq, hidden]
        """Run the span; with a cache, append this step's keys/values to it."""

    @staticmethod
    def cache_length(cache: Any) -> int:
        return int(cache.get_seq_length())

    @staticmethod
    def crop_cache(cache: Any, length: int) -> None:
        """Roll the cache back to its first `length` tokens."""
        current = int(cache.get_seq_length())
        if length >= current:
            return
        for layer in cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.record_past:
                # transformers' own crop would also trim to the window, losing what a later rollback needs;
                # a recording layer holds every token of the session, so cutting its tail is exact.
                if layer.keys is not None and layer.values is not None:
                    layer.keys = layer.keys[:, :, :length]  # [batch, kv_heads, length, head_dim]
                    layer.values = layer.values[:, :, :length]
                    layer.cumulative_length = length
            else:
                layer.crop(length - current)  # transformers 5.x takes a negative count

    @staticmethod
    def reorder_cache(cache: Any, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search): row i becomes old row rows[i]."""
        cache.reorder_cache(rows)


class ClientHead(nn.Module, abc.ABC):
    """The parts a client keeps locally: token embeddings in, logits out."""

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        ...

    @abc.abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, seq, vocab]
        ...


class ModelFamily(abc.ABC):
    """One architecture. Adding a family = one module with a subclass + a registry entry."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # Some checkpoints exist both with and without the base model's prefix (BLOOM's "transformer.h.0..." vs
    # "h.0..." when saved from `BloomModel`); load_block/load_head accept both spellings.
    base_model_prefix: ClassVar[str] = ""

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @abc.abstractmethod
    def block_prefix(self, block: int) -> str:
        """Checkpoint key prefix of global block `block`, e.g. "model.layers.3."."""

    @abc.abstractmethod
    def build_block(self, local_index: int) -> nn.Module:
        """An empty block (call under `torch.device("meta")`) whose cache index is `local_index`."""

    @abc.abstractmethod
    def make_span(self, layers: list[nn.Module], blocks: BlockRange) -> BlockSpan:
        """Wrap loaded blocks into a span that runs them with the family's prologue (mask, positions)."""

    @abc.abstractmethod
    def head_keys(self) -> dict[str, str]:
        """Local part name → checkpoint key, e.g. {"embed_tokens.weight": "model.embed_tokens.weight"}."""

    @abc.abstractmethod
    def make_head(self, tensors: dict[str, torch.Tensor]) -> ClientHead:
        """Build the client's local parts from tensors named as in `head_keys`."""

    def convert_block_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map one block's checkpoint tensors (prefix stripped) to the block module's state dict names."""
        return tensors

    def load_block(self, checkpoint: Checkpoint, block: int, local_index: int) -> nn.Module:
        """Global block `block` as local block `local_index`, reading only its own tensors; in eval mode."""
        with torch.device("meta"):  # no memory for random weights: the checkpoint tensors are adopted as is
            module = self.build_block(local_index)
        prefix = self._checkpoint_name(checkpoint, self.block_prefix(block), prefix=True)
        tensors = checkpoint.read_prefix(prefix)
        if not tensors:
            raise KeyError(f"the checkpoint at {checkpoint.model_path} has no tensors under {prefix!r}")
        module.load_state_dict(self.convert_block_weights(tensors), strict=True, assign=True)
        self._restore_buffers(module, local_index)
        on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if on_meta:
            raise RuntimeError(f"block {block}: tensors left on the meta device after loading: {on_meta}")
        return module.eval()

    def load_head(self, checkpoint: Checkpoint) -> ClientHead:
        """The client's local parts (embeddings, final norm, LM head), read from the checkpoint."""
        names = {name: self._checkpoint_name(checkpoint, key) for name, key in self.head_keys().items()}
        tensors = checkpoint.read(names.values())
        return self.make_head({name: tensors[key] for name, key in names.items()}).eval()

    def _checkpoint_name(self, checkpoint: Checkpoint, name: str, prefix: bool = False) -> str:
        """`name` (a key, or a key prefix) as this checkpoint spells it: as given, or without `base_model_prefix`."""

        def exists(candidate: str) -> bool:
            return bool(checkpoint.keys_with_prefix(candidate)) if prefix else checkpoint.has(candidate)

        short = name.removeprefix(self.base_model_prefix)
        return short if short != name and not exists(name) and exists(short) else name

    def _restore_buffers(self, module: nn.Module, local_index: int) -> None:
        """Non-persistent buffers (not in checkpoints) stay on meta after loading: take them from a real build.

        None of the current families' blocks has such buffers, so this costs nothing for them. When one does,
        the block is built once more on the CPU; slower, but it always yields the values the module computes.
        """
        missing = [name for name, buffer in module.named_buffers() if buffer.is_meta]
        if not missing:
            return
        with torch.device("cpu"):
            fresh = dict(self.build_block(local_index).named_buffers())
        for name in missing:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, fresh[name], persistent=False)

    def slice_config(self, blocks: BlockRange) -> PretrainedConfig:
        """A config describing only `blocks`, so per-layer settings line up with local indices."""
        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = len(blocks)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            cfg.layer_types = list(layer_types[blocks.start : blocks.end])
        return cfg
