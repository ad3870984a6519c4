"""Falcon in plain torch, every variant transformers' `FalconModel` serves:

- the new decoder architecture (Falcon-40B/180B): grouped KV heads, `ln_attn` + `ln_mlp` in parallel (or one
  `input_layernorm` when `num_ln_in_parallel_attn == 1`);
- the old decoder (Falcon-7B, RW): multi-query (one KV head) or full multi-head attention, attention and MLP in
  parallel or sequential (`post_attention_layernorm`);
- rotary positions (default or linear RoPE) or ALiBi, with or without biases.

Numbers follow what `from_pretrained` runs (the sdpa path): with ALiBi the bias is folded into the mask as
`alibi / sqrt(head_dim)`, so scores are `(q·k + alibi) / sqrt(head_dim)` — unlike BLOOM, whose bias is not
scaled — and Falcon rounds `slope * position` to bfloat16, which we repeat. Linear layers compute
`x @ W.T + b` in two steps, as `FalconLinear` does (the port keeps the training's rounding in bf16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from swarm.blocks import BlockRange
from swarm.models.base import ClientHead, ModelFamily, Segment, Span, attend
from swarm.models.bloom import alibi_mask, alibi_slopes, layer_norm_from, linear_from
from swarm.models.config import ConfigError, ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), transformers' GELUActivation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class FalconConfig(ModelConfig):
    layer_norm_epsilon: float = 1e-5
    new_decoder_architecture: bool = False
    multi_query: bool = True  # old decoder only: one KV head shared by all query heads
    parallel_attn: bool = True  # attention and MLP read the same normed input; outputs summed
    bias: bool = False
    alibi: bool = False  # ALiBi instead of rotary positions
    num_kv_heads: int | None = None  # KV head groups of the new architecture (config.json's count)
    num_ln_in_parallel_attn: int | None = None  # new architecture: 2 = ln_attn + ln_mlp, 1 = one input_layernorm
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    max_position_embeddings: int = 2048
    # RoPE as config.json says it: transformers 5's `rope_parameters`, or 4.x's `rope_theta` + `rope_scaling`
    rope_parameters: dict[str, Any] | None = field(default=None, compare=False)
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    tie_word_embeddings: bool = True

    aliases: ClassVar[dict[str, str]] = {
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_embed": "hidden_size",
        "n_head_kv": "num_kv_heads",
    }
    # transformers' FalconConfig defaults (Falcon-7B), for config.json files that leave fields out
    defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 65024,
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "bos_token_id": 11,
        "eos_token_id": 11,
    }

    @classmethod
    def _derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super()._derive(values)
        hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
        if hidden % heads:
            raise ConfigError("falcon: hidden_size must be divisible by num_attention_heads")
        values["head_dim"] = hidden // heads  # Falcon has no separate head_dim
        if values.get("num_kv_heads") is None:
            values["num_kv_heads"] = heads
        if values.get("ffn_hidden_size") is None:
            values["ffn_hidden_size"] = 4 * hidden
        new_arch = bool(values.get("new_decoder_architecture"))
        if new_arch:
            if heads % int(values["num_kv_heads"]):
                raise ConfigError("falcon: num_attention_heads must be a multiple of num_kv_heads")
            if values.get("num_ln_in_parallel_attn") is None:
                values["num_ln_in_parallel_attn"] = 2
            if not values.get("parallel_attn", True):
                raise ConfigError("falcon: the new decoder architecture needs parallel_attn (transformers too)")
        # what a token stores per block: the KV groups (new), one shared head (multi-query), or every head
        stored = values["num_kv_heads"] if new_arch else 1 if values.get("multi_query", True) else heads
        values["num_key_value_heads"] = int(stored)
        if values.get("activation", "gelu") not in ACTIVATIONS:
            raise ConfigError(f"falcon: activation {values['activation']!r} is not supported")
        rope = values.get("rope_parameters") or values.get("rope_scaling") or {}
        values["rope_theta"] = float(rope.get("rope_theta", values.get("rope_theta", 10000.0)))
        values["rope_type"] = str(rope.get("rope_type", rope.get("type", "default")))
        values["rope_factor"] = float(rope.get("factor", 1.0))
        if not values.get("alibi") and values["rope_type"] not in ROPE_TYPES:
            raise ConfigError(f"falcon: RoPE type {values['rope_type']!r} is not supported; supported: {ROPE_TYPES}")
        return values


class FalconLinear(nn.Linear):
    """Matmul, then bias, as two roundings: Falcon was trained that way and transformers keeps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class FalconContext:
    """What every layer of a hop reads: per-segment masks (bool, or float with ALiBi) and rotary tables."""

    masks: list[torch.Tensor | None]
    cos: torch.Tensor | None = None  # [N, 1, head_dim]
    sin: torch.Tensor | None = None


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads  # stored per token: groups, 1 (multi-query) or all heads
        self.head_dim = config.head_dim
        self.new_arch = config.new_decoder_architecture
        self.multi_query = config.multi_query and not self.new_arch
        qkv_out = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = FalconLinear(config.hidden_size, qkv_out, bias=config.bias)
        self.dense = FalconLinear(config.hidden_size, config.hidden_size, bias=config.bias)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's layout in each variant (as `FalconAttention._split_heads` reads it):
        q [N, heads, head_dim], k and v [N, kv_heads, head_dim]."""
        n, hd = qkv.shape[0], self.head_dim
        if self.new_arch:  # per KV group: its query heads, then its key, then its value
            group = self.num_heads // self.kv_heads
            qkv = qkv.view(n, self.kv_heads, group + 2, hd)
            # query head h belongs to group h // group, which is how sdpa's enable_gqa pairs them
            return qkv[:, :, :group].reshape(n, self.num_heads, hd), qkv[:, :, group], qkv[:, :, group + 1]
        if self.multi_query:  # all query heads, then the one key, then the one value
            qkv = qkv.view(n, self.num_heads + 2, hd)
            return qkv[:, :-2], qkv[:, -2:-1], qkv[:, -1:]
        qkv = qkv.view(n, self.num_heads, 3, hd)  # per head: q, k, v (as BLOOM)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def forward(
        self, x: torch.Tensor, segments: Sequence[Segment], ctx: FalconContext, layer: int
    ) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        q, k, v = self.split_heads(self.query_key_value(x))
        if ctx.cos is not None and ctx.sin is not None:
            q = q * ctx.cos + rotate_half(q) * ctx.sin
            k = k * ctx.cos + rotate_half(k) * ctx.sin
        return self.dense(attend(q, k, v, segments, ctx.masks, layer))


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        ffn = config.ffn_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = FalconLinear(config.hidden_size, ffn, bias=config.bias)
        self.dense_4h_to_h = FalconLinear(ffn, config.hidden_size, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconBlock(nn.Module):
    """One Falcon layer; parameter names are the checkpoint's under `transformer.h.{i}.`."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(hidden, eps=eps)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attention = FalconAttention(config)
        self.mlp = FalconMLP(config)

    def forward(
        self, x: torch.Tensor, segments: Sequence[Segment], ctx: FalconContext, layer: int
    ) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, segments, ctx, layer)
        if self.parallel:
            return x + (self.mlp(mlp_in) + attn)  # transformers' order of the two sums
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconSpan(Span):
    def __init__(self, family: ModelFamily, layers: Sequence[nn.Module], blocks: BlockRange) -> None:
        super().__init__(family, layers, blocks)
        config = cast(FalconConfig, family.config)
        self.head_dim = config.head_dim
        self.alibi = config.alibi
        # Falcon rounds the slopes, and `slope * position`, to bfloat16 (build_alibi_tensor); so do we
        self.slopes = alibi_slopes(config.num_attention_heads).bfloat16()  # [heads]
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [dim / 2]
        self.inv_freq = inv_freq / config.rope_factor if config.rope_type == "linear" else inv_freq

    def prologue(self, x: torch.Tensor, segments: Sequence[Segment]) -> FalconContext:
        device = x.device
        if self.slopes.device != device:  # moved once, on the first hop on another device
            self.slopes, self.inv_freq = self.slopes.to(device), self.inv_freq.to(device)
        if self.alibi:
            slopes = self.slopes[:, None]  # bf16 [heads, 1]
            masks: list[torch.Tensor | None] = []
            for seg in segments:
                bias = slopes * seg.key_positions(device)[:, None, :]  # bf16 [batch, heads, L]
                masks.append(alibi_mask(bias.to(x.dtype) / math.sqrt(self.head_dim), seg))
            return FalconContext(masks)
        positions = torch.cat([seg.positions(device).reshape(-1) for seg in segments])  # [N]
        freqs = positions[:, None].float() * self.inv_freq  # [N, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, head_dim]: broadcast over heads
        masks = [seg.allowed(device) for seg in segments]  # bool [batch, 1, tokens, L] or None
        return FalconContext(masks, emb.cos().to(x.dtype), emb.sin().to(x.dtype))


class FalconHead(ClientHead):
    def __init__(self, word_embeddings: nn.Embedding, ln_f: nn.LayerNorm, lm_head_weight: torch.Tensor) -> None:
        super().__init__()
        self.word_embeddings = word_embeddings
        self.ln_f = ln_f
        self.lm_head = linear_from(lm_head_weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        return self.word_embeddings(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, seq, vocab]
        return self.lm_head(self.ln_f(hidden))


class FalconFamily(ModelFamily):
    name = "falcon"
    model_types = ("falcon",)
    config_class = FalconConfig
    base_model_prefix = "transformer."

    @property
    def falcon_config(self) -> FalconConfig:
        return cast(FalconConfig, self.config)

    def block_prefix(self, block: int) -> str:
        return f"transformer.h.{block}."

    def build_block(self) -> FalconBlock:
        return FalconBlock(self.falcon_config)

    def make_span(self, layers: Sequence[nn.Module], blocks: BlockRange) -> FalconSpan:
        return FalconSpan(self, layers, blocks)

    def head_keys(self) -> dict[str, str]:
        keys = {
            "word_embeddings.weight": "transformer.word_embeddings.weight",
            "ln_f.weight": "transformer.ln_f.weight",
            "ln_f.bias": "transformer.ln_f.bias",
        }
        if not self.config.tie_word_embeddings:  # Falcon checkpoints normally tie the LM head to the embeddings
            keys["lm_head.weight"] = "lm_head.weight"
        return keys

    def make_head(self, tensors: dict[str, torch.Tensor]) -> FalconHead:
        embed = nn.Embedding.from_pretrained(tensors["word_embeddings.weight"], freeze=True)
        ln_f = layer_norm_from(tensors["ln_f.weight"], tensors["ln_f.bias"], self.falcon_config.layer_norm_epsilon)
        return FalconHead(embed, ln_f, tensors.get("lm_head.weight", embed.weight))
