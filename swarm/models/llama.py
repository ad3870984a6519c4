"""Llama family in plain torch: Llama 2/3 (GQA, RoPE scaling), Mistral (sliding window) and Qwen2 (q/k/v biases).

One decoder layer serves every kind of step: its projections, norms and MLP run once over the step's N flattened
rows, attention runs per segment over that segment's own KV cache (`base.attend`). Rotary cos/sin and the
attention masks are computed once per hop in `LlamaSpan.prologue`. Module and parameter names are the
checkpoint's (`model.layers.{i}.self_attn.q_proj.weight`, ...), so blocks load with `load_state_dict`, and every
projection is an `nn.Linear` (quantization replaces them, adapters wrap them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from swarm.blocks import BlockRange
from swarm.models.base import ClientHead, ModelFamily, Segment, Span, attend
from swarm.models.config import ConfigError, ModelConfig
from swarm.models.rope import RopeSpec, Rotary, read_rope, rotate

# transformers' defaults where a config.json leaves a field out (per model_type)
DEFAULT_THETA = {"mixtral": 1e6}
DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768}  # mistral, mixtral: 4096 * 32
DEFAULT_RMS_EPS = {"mixtral": 1e-5}  # the others: 1e-6


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "relu": F.relu,
}


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """config.json of llama / mistral / qwen2 (and mixtral, which adds its experts) checkpoints."""

    intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    qkv_bias: bool = False  # llama: attention_bias; qwen2: always
    o_bias: bool = False  # llama: attention_bias
    mlp_bias: bool = False  # llama only
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    rope: RopeSpec = field(default=None)  # type: ignore[assignment]  # filled by _derive from extra keys

    @classmethod
    def _derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = super()._derive(values)
        model_type = values.get("model_type", "")
        extra = values.get("extra", {})
        values.setdefault("rms_norm_eps", DEFAULT_RMS_EPS.get(model_type, 1e-6))
        values.setdefault("max_position_embeddings", DEFAULT_MAX_POSITIONS.get(model_type, 4096 * 32))
        # biases exactly where transformers' modeling code puts them, whatever else the config carries
        attention_bias = bool(extra.get("attention_bias", False)) if model_type == "llama" else False
        values["qkv_bias"] = attention_bias or model_type == "qwen2"
        values["o_bias"] = attention_bias
        values["mlp_bias"] = bool(values.get("mlp_bias", False)) if model_type == "llama" else False
        cls._derive_windows(values, extra, model_type)
        if {"head_dim", "num_attention_heads", "hidden_size"} <= values.keys():
            heads, kv_heads = int(values["num_attention_heads"]), int(values["num_key_value_heads"])
            if heads % kv_heads:
                raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
            if values.get("hidden_act", "silu") not in ACTIVATIONS:
                raise ConfigError(f"hidden_act {values['hidden_act']!r} is not supported: {', '.join(ACTIVATIONS)}")
            theta = DEFAULT_THETA.get(model_type, 10000.0)
            values["rope"] = read_rope(extra, int(values["head_dim"]), int(values["max_position_embeddings"]), theta)
        return values

    @classmethod
    def _derive_windows(cls, values: dict[str, Any], extra: dict[str, Any], model_type: str) -> None:
        """Per-layer sliding windows as transformers applies them: mistral and mixtral on every layer when
        sliding_window is set; qwen2 only with use_sliding_window, on the layers `layer_types` (or, in older
        configs, layers from max_window_layers on) marks as sliding; llama never."""
        n = int(values.get("num_hidden_layers", 0))
        window = values.get("sliding_window")
        types: list[str] | tuple[str, ...] | None
        if model_type == "qwen2":
            window = window if extra.get("use_sliding_window", False) else None
            types = values.get("layer_types")
            if not types:
                first = int(extra.get("max_window_layers", 28))
                types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
        elif model_type in ("mistral", "mixtral"):
            types = ["sliding_attention" if window is not None else "full_attention"] * n
        else:
            window, types = None, ["full_attention"] * n
        if len(types) != n:
            raise ConfigError(f"layer_types has {len(types)} entries for {n} layers")
        values["sliding_window"] = None if window is None else int(window)
        values["layer_types"] = tuple(types)

    def window(self, block: int) -> int | None:
        """The sliding window of global block `block` (None = full attention)."""
        return self.sliding_window if self.layer_types[block] == "sliding_attention" else None


class RMSNorm(nn.Module):
    """Computed in float32 whatever the input dtype, then scaled in the input dtype (as transformers)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same arithmetic, one kernel
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], ctx: LlamaContext, layer: int) -> torch.Tensor:
        n = x.shape[0]  # x: [N, hidden], normed
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        q, k = rotate(q, ctx.cos, ctx.sin), rotate(k, ctx.cos, ctx.sin)
        out = attend(q, k, v, segments, ctx.masks[layer], layer, self.scale)  # [N, heads * head_dim]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One decoder layer; `mlp` is the family's (dense here, experts in Mixtral)."""

    def __init__(self, cfg: LlamaConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], ctx: LlamaContext, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), segments, ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LlamaContext:
    """What every layer of a hop shares."""

    cos: torch.Tensor  # [N, 1, head_dim] in the compute dtype
    sin: torch.Tensor  # signed (see rope.rotate)
    masks: list[list[torch.Tensor | None]]  # per local layer, per segment: bool [batch, 1, t, L] or None


class LlamaSpan(Span):
    family: LlamaFamily

    def __init__(self, family: LlamaFamily, layers: Sequence[nn.Module], blocks: BlockRange) -> None:
        super().__init__(family, layers, blocks)
        cfg = family.config
        self.windows = [cfg.window(b) for b in range(blocks.start, blocks.end)]  # per local layer
        self.distinct_windows = sorted(set(self.windows), key=lambda w: -1 if w is None else w)

    def prologue(self, x: torch.Tensor, segments: Sequence[Segment]) -> LlamaContext:
        cos, sin = self.family.rotary.rows(segments, x.device, x.dtype)  # [N, head_dim]
        by_window = {w: [seg.allowed(x.device, w) for seg in segments] for w in self.distinct_windows}
        return LlamaContext(cos.unsqueeze(1), sin.unsqueeze(1), [by_window[w] for w in self.windows])


class LlamaHead(ClientHead):
    """Token embeddings, final norm, LM head (sharing the embedding matrix when the weights are tied)."""

    def __init__(self, cfg: LlamaConfig, embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        # on meta first: a vocabulary-sized random init would cost seconds only to be replaced
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm.weight = nn.Parameter(norm, requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.embed_tokens.weight if lm_head is embed else nn.Parameter(lm_head, False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, seq, hidden]
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden] -> [batch, seq, vocab]
        return self.lm_head(self.norm(hidden))


class LlamaFamily(ModelFamily):
    name = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
    config_class: ClassVar[type[ModelConfig]] = LlamaConfig
    config: LlamaConfig

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config, LlamaConfig):
            raise ConfigError(f"{type(self).__name__} needs a LlamaConfig, got {type(config).__name__}")
        super().__init__(config)
        self.rotary = Rotary(config.rope)  # shared by all spans of this model: one set of cos/sin tables

    def block_prefix(self, block: int) -> str:
        return f"model.layers.{block}."

    def build_mlp(self) -> nn.Module:
        return LlamaMLP(self.config)

    def build_block(self) -> nn.Module:
        return LlamaBlock(self.config, self.build_mlp())

    def make_span(self, layers: Sequence[nn.Module], blocks: BlockRange) -> LlamaSpan:
        return LlamaSpan(self, layers, blocks)

    def head_keys(self) -> dict[str, str]:
        keys = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            keys["lm_head.weight"] = "lm_head.weight"
        return keys

    def make_head(self, tensors: dict[str, torch.Tensor]) -> LlamaHead:
        embed = tensors["embed_tokens.weight"]
        return LlamaHead(self.config, embed, tensors["norm.weight"], tensors.get("lm_head.weight", embed))
