"""Preallocated per-session KV caches (gpt-fast's `KVCache.update(input_pos, k, v)` idea inside transformers'
Cache interface), and how many bytes a cached token costs.

A session's keys/values live in one buffer per layer, `[batch, kv_heads, max_length, head_dim]`, allocated at the
first step and never grown: the `max_length` a client reserves at `open` is exactly the memory it can use, so the
server's byte budget is a hard bound. Each layer exposes `keys`/`values` as views of the filled prefix, so the
families' spans (and transformers' mask builders) see what a DynamicCache would show them, and outputs match.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class CacheOverflow(RuntimeError):
    """A step would write past the session's reserved max_length (the servicer checks before; this is a guard)."""


class PreallocatedLayer(DynamicLayer):
    """One layer's KV for one session: a fixed buffer filled left to right; `length` tokens are valid.

    Sliding-window configs also keep every token here; the window is applied by the attention mask (and by
    the batched decode path), which keeps rollback exact, as `new_session_cache`'s past recording does.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.length = 0
        self.k_buf: torch.Tensor | None = None  # [batch, kv_heads, max_length, head_dim]
        self.v_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, k_dim = key_states.shape
        v_dim = value_states.shape[-1]
        self.device = key_states.device
        # torch.empty: only the first `length` positions are ever read, so zero-filling would be wasted time
        self.k_buf = torch.empty(batch, heads, self.max_length, k_dim, dtype=key_states.dtype, device=self.device)
        self.v_buf = torch.empty(batch, heads, self.max_length, v_dim, dtype=value_states.dtype, device=self.device)
        self.is_initialized = True
        self._refresh()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[batch, kv_heads, t, head_dim]` at positions [length, length + t); return the filled views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.k_buf is not None and self.v_buf is not None
        new = key_states.shape[-2]
        end = self.length + new
        if end > self.max_length:
            raise CacheOverflow(f"KV cache holds {self.max_length} tokens; cannot write up to {end}")
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        self._refresh()
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_length

    def crop(self, tokens_to_remove: int) -> None:
        # transformers 5.x convention: a negative count of tokens to drop from the end
        if tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.k_buf is None or self.v_buf is None or self.length == 0:
            return
        idx = beam_idx.to(self.k_buf.device)
        # index_select makes a copy, so overlapping source/target rows are safe; only the valid prefix moves
        self.k_buf[:, :, : self.length] = self.k_buf[:, :, : self.length].index_select(0, idx)
        self.v_buf[:, :, : self.length] = self.v_buf[:, :, : self.length].index_select(0, idx)
        self._refresh()

    def reset(self) -> None:
        self.length = 0
        self._refresh()

    def nbytes(self) -> int:
        """Bytes actually allocated by this layer (0 before the first step)."""
        if self.k_buf is None or self.v_buf is None:
            return 0
        return self.k_buf.nbytes + self.v_buf.nbytes

    def _refresh(self) -> None:
        if self.k_buf is not None and self.v_buf is not None:
            self.keys = self.k_buf[:, :, : self.length]  # [batch, kv_heads, length, head_dim], a view
            self.values = self.v_buf[:, :, : self.length]


def new_preallocated_cache(slice_config: PretrainedConfig, num_layers: int, max_length: int) -> DynamicCache:
    """A DynamicCache (so families and mask builders treat it as usual) whose layers are preallocated."""
    cache = DynamicCache(config=slice_config)
    cache.layers = [PreallocatedLayer(max_length) for _ in range(num_layers)]
    return cache


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a session's KV buffers (layers of other kinds count 0)."""
    return sum(layer.nbytes() for layer in getattr(cache, "layers", ()) if isinstance(layer, PreallocatedLayer))


def kv_bytes_per_token_estimate(config: PretrainedConfig, element_bytes: int) -> int:
    """Bytes of keys + values per token per block, from the config alone (before any weight is loaded).

    Covers the families we serve: GQA (`num_key_value_heads`), Falcon's multi-query / `num_kv_heads`, and MHA.
    The server replaces this estimate with a measurement once its blocks are loaded (`measure_kv_bytes`).
    """
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if kv_heads is None:
        kv_heads = (
            1
            if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False)
            else heads
        )
    return 2 * int(kv_heads) * head_dim * element_bytes
