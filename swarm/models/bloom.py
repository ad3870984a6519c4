"""BLOOM in plain torch: ALiBi instead of position embeddings, a fused QKV projection, LayerNorm after the word
embeddings (run on the client, as part of `embed`).

Numbers follow transformers' `BloomModel` (eager attention, the only one it has): scores are
`q·k / sqrt(head_dim) + slope_h * position_j`, where positions count real tokens only (`cumsum(mask) - 1`), and
softmax's shift invariance lets the bias depend on the key alone. That bias, with the causal/padding mask folded
in, is built once per hop per segment (`BloomSpan.prologue`) and handed to `attend` as a float mask; sdpa adds it
after scaling q·k, which is exactly BLOOM's `baddbmm(alibi, q, k, beta=1, alpha=1/sqrt(d))`.

Not reproduced: `slow_but_exact` with `pretraining_tp > 1` (it only changes how the output projection's sum is
rounded; no released checkpoint enables it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from swarm.blocks import BlockRange
from swarm.models.base import ClientHead, ModelFamily, Segment, Span, attend
from swarm.models.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class BloomConfig(ModelConfig):
    layer_norm_epsilon: float = 1e-5
    # use the LayerNorm outputs (not the block inputs) as the residuals, as the first BLOOM prototypes did
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True

    aliases: ClassVar[dict[str, str]] = {
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
        "n_embed": "hidden_size",
    }
    # transformers' BloomConfig defaults, for config.json files that leave fields out
    defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 250880,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }

    @classmethod
    def _derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super()._derive(values)
        if int(values["hidden_size"]) % int(values["num_attention_heads"]):
            raise ConfigError("bloom: hidden_size must be divisible by n_head")
        values["head_dim"] = int(values["hidden_size"]) // int(values["num_attention_heads"])
        values["num_key_value_heads"] = values["num_attention_heads"]  # plain multi-head attention
        return values


def alibi_slopes(num_heads: int) -> torch.Tensor:  # float32 [heads]
    """ALiBi's per-head slopes: a geometric sequence, interleaved for head counts that are not powers of two
    (the same values as transformers' `_get_alibi_slopes`, computed the same way)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def alibi_mask(bias: torch.Tensor, seg: Segment) -> torch.Tensor:  # [batch, heads, 1 | tokens, L]
    """Fold the segment's causal/padding mask into a per-key bias `[batch, heads, L]`: the float mask for sdpa.

    Disallowed slots get the dtype's minimum (as transformers' masks do) rather than -inf, so that the sum with
    the bias and the scores stays finite."""
    bias = bias.unsqueeze(2)  # [batch, heads, 1, L]: one row serves every query (the bias depends on the key)
    allowed = seg.allowed(bias.device)  # [batch, 1, tokens, L] or None
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's gelu is the tanh approximation (0.79788456 = sqrt(2/pi) to 8 digits, which agrees to ~1e-9)
    return F.gelu(x, approximate="tanh")


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, segments: Sequence[Segment], masks: Sequence[torch.Tensor], layer: int
    ) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        n = x.shape[0]
        # BLOOM interleaves per head: [q_h, k_h, v_h] for head 0, then head 1, ...
        qkv = self.query_key_value(x).view(n, self.num_heads, 3, self.head_dim)  # [N, heads, 3, head_dim]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, heads, head_dim] views
        return self.dense(attend(q, k, v, segments, masks, layer))


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(tanh_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """One BLOOM layer; parameter names are the checkpoint's under `transformer.h.{i}.`."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        self.post_layernorm_residual = config.apply_residual_connection_post_layernorm

    def forward(
        self, x: torch.Tensor, segments: Sequence[Segment], masks: Sequence[torch.Tensor], layer: int
    ) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        normed = self.input_layernorm(x)
        residual = normed if self.post_layernorm_residual else x
        x = residual + self.self_attention(normed, segments, masks, layer)
        normed = self.post_attention_layernorm(x)
        residual = normed if self.post_layernorm_residual else x
        return residual + self.mlp(normed)


class BloomSpan(Span):
    def __init__(self, family: ModelFamily, layers: Sequence[nn.Module], blocks: BlockRange) -> None:
        super().__init__(family, layers, blocks)
        self.slopes = alibi_slopes(family.config.num_attention_heads)  # float32 [heads]

    def prologue(self, x: torch.Tensor, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """Per segment, the ALiBi bias with the causal/padding mask folded in: [batch, heads, 1 | tokens, L]."""
        if self.slopes.device != x.device:  # moved once, on the first hop on another device
            self.slopes = self.slopes.to(x.device)
        slopes = self.slopes[:, None]  # [heads, 1]
        masks = []
        for seg in segments:
            positions = seg.key_positions(x.device)[:, None, :]  # [batch, 1, L]: real tokens counted
            bias = (slopes * positions).to(x.dtype)  # [batch, heads, L], computed in float32 as transformers does
            masks.append(alibi_mask(bias, seg))
        return masks


class BloomHead(ClientHead):
    def __init__(
        self,
        word_embeddings: nn.Embedding,
        word_embeddings_layernorm: nn.LayerNorm,
        ln_f: nn.LayerNorm,
        lm_head_weight: torch.Tensor,
    ) -> None:
        super().__init__()
        self.word_embeddings = word_embeddings
        self.word_embeddings_layernorm = word_embeddings_layernorm
        self.ln_f = ln_f
        self.lm_head = linear_from(lm_head_weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        # the embedding LayerNorm belongs to BLOOM's prologue; it is cheap, so the client runs it, not server 0
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, seq, vocab]
        return self.lm_head(self.ln_f(hidden))


def layer_norm_from(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(weight.shape[0], eps=eps, device="meta")  # meta: the given tensors are adopted as is
    norm.weight = nn.Parameter(weight, requires_grad=False)
    norm.bias = nn.Parameter(bias, requires_grad=False)
    return norm


def linear_from(weight: torch.Tensor) -> nn.Linear:
    # on meta: a vocabulary-sized random init would cost seconds and gigabytes only to be replaced
    lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lm_head.weight = nn.Parameter(weight, requires_grad=False)
    return lm_head


class BloomFamily(ModelFamily):
    name = "bloom"
    model_types = ("bloom",)
    config_class = BloomConfig
    base_model_prefix = "transformer."

    @property
    def bloom_config(self) -> BloomConfig:
        return cast(BloomConfig, self.config)

    def block_prefix(self, block: int) -> str:
        return f"transformer.h.{block}."

    def build_block(self) -> BloomBlock:
        return BloomBlock(self.bloom_config)

    def make_span(self, layers: Sequence[nn.Module], blocks: BlockRange) -> BloomSpan:
        return BloomSpan(self, layers, blocks)

    def head_keys(self) -> dict[str, str]:
        keys = {
            "word_embeddings.weight": "transformer.word_embeddings.weight",
            "word_embeddings_layernorm.weight": "transformer.word_embeddings_layernorm.weight",
            "word_embeddings_layernorm.bias": "transformer.word_embeddings_layernorm.bias",
            "ln_f.weight": "transformer.ln_f.weight",
            "ln_f.bias": "transformer.ln_f.bias",
        }
        if not self.config.tie_word_embeddings:  # BLOOM checkpoints normally tie the LM head to the embeddings
            keys["lm_head.weight"] = "lm_head.weight"
        return keys

    def make_head(self, tensors: dict[str, torch.Tensor]) -> BloomHead:
        eps = self.bloom_config.layer_norm_epsilon
        embed = nn.Embedding.from_pretrained(tensors["word_embeddings.weight"], freeze=True)
        embed_norm = layer_norm_from(
            tensors["word_embeddings_layernorm.weight"], tensors["word_embeddings_layernorm.bias"], eps
        )
        ln_f = layer_norm_from(tensors["ln_f.weight"], tensors["ln_f.bias"], eps)
        return BloomHead(embed, embed_norm, ln_f, tensors.get("lm_head.weight", embed.weight))
