"""Cross-session batched decode for Llama-like spans (Llama, Mistral, Qwen2, Mixtral share the layer layout).

A decode step of n sessions stacks their new tokens into one `[rows, 1, hidden]` tensor for the projections,
norms and MLP (the heavy, weight-bound work), while attention stays per session over that session's own
preallocated cache. Per session this runs exactly the operations `LlamaDecoderLayer.forward` runs for one new
token without a padding mask (same modules, same attention function), so a session's output depends on its
batch-mates only through GEMM row blocking: equal to ~1e-6 in fp32, and greedy tokens are identical.
Families without this layout (BLOOM, Falcon) are run one session at a time by the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from swarm.models import BlockSpan
from swarm.models.llama import LlamaSpan

_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")


def supports_batched_decode(span: BlockSpan) -> bool:
    if not isinstance(span, LlamaSpan):
        return False
    for layer in span.layers:
        if not all(hasattr(layer, p) for p in _LAYER_PARTS):
            return False
        if not all(hasattr(layer.self_attn, p) for p in _ATTN_PARTS):
            return False
    return True


def batched_decode(
    span: LlamaSpan,
    hidden: torch.Tensor,  # [rows, 1, hidden]: each session's batch rows, stacked in `caches` order
    caches: Sequence[Any],  # one preallocated cache per session, already cropped/reordered for this step
    rows: Sequence[int],  # batch rows per session; sum(rows) == hidden.shape[0]
) -> torch.Tensor:  # [rows, 1, hidden]
    """One new token per row through every layer of `span`, appending each session's K/V to its own cache."""
    n = hidden.shape[0]
    # Each session's position is its cache length; rotary (cos, sin) is computed once for all rows.
    starts = [int(c.get_seq_length()) for c in caches]
    position_ids = torch.tensor(
        [p for p, r in zip(starts, rows, strict=True) for _ in range(r)], device=hidden.device
    ).unsqueeze(1)  # [rows, 1]
    cos, sin = span.rotary_emb(hidden, position_ids=position_ids)  # [rows, 1, head_dim] each
    config = span.config
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    bounds = []
    row = 0
    for r in rows:
        bounds.append((row, row + r))
        row += r
    h = hidden
    for layer_idx, layer in enumerate(span.layers):
        attn = layer.self_attn
        residual = h
        x = layer.input_layernorm(h)
        shape = (n, 1, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [rows, heads, 1, head_dim]
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [rows, kv_heads, 1, head_dim]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outs = []
        for cache, (a, b) in zip(caches, bounds, strict=True):
            keys, values = cache.layers[layer_idx].update(k[a:b], v[a:b])  # [r, kv_heads, length, head_dim]
            if window is not None and keys.shape[2] > window:
                # the causal sliding-window mask lets the newest token see the last `window` positions only
                keys, values = keys[:, :, -window:], values[:, :, -window:]
            out, _ = attention(attn, q[a:b], keys, values, None, dropout=0.0, scaling=attn.scaling)
            outs.append(out)  # [r, 1, heads, head_dim]
        attn_out = torch.cat(outs, dim=0).reshape(n, 1, -1).contiguous()  # [rows, 1, heads * head_dim]
        h = residual + attn.o_proj(attn_out)
        residual = h
        h = residual + layer.mlp(layer.post_attention_layernorm(h))
    return h
