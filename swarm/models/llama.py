"""Llama family (Llama 2/3, GQA, RoPE scaling as configured), built from `transformers` modules.

The span runs what `LlamaModel.forward` runs between embeddings and final norm: causal mask, rotary
embeddings computed once per hop, then each decoder layer with the session's cache.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from swarm.blocks import BlockRange
from swarm.models.base import BlockSpan, ClientHead, ModelFamily, new_session_cache


class LlamaSpan(BlockSpan):
    rotary_class: ClassVar[type[nn.Module]] = LlamaRotaryEmbedding  # Llama-like families swap in their own

    def __init__(
        self, config: PretrainedConfig, slice_config: PretrainedConfig, layers: list[nn.Module], blocks: BlockRange
    ) -> None:
        super().__init__(config, blocks)
        self.slice_config = slice_config
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = self.rotary_class(config=config)
        self._mask_fn = (
            create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask
        )

    def new_cache(self) -> DynamicCache:
        return new_session_cache(self.slice_config)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self._mask_fn(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin) once per hop
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden


class LlamaHead(ClientHead):
    def __init__(
        self, config: PretrainedConfig, embed_tokens: nn.Embedding, norm: nn.Module, lm_head_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.norm = norm
        # on meta: a vocabulary-sized random init would cost seconds and gigabytes only to be replaced
        self.lm_head = nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(lm_head_weight, requires_grad=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class LlamaFamily(ModelFamily):
    name = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2")
    norm_class: ClassVar[type[nn.Module]] = LlamaRMSNorm

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        # Bare configs carry no attention implementation; sdpa matches what from_pretrained picks on CPU.
        if getattr(config, "_attn_implementation", None) in (None, "eager") and not getattr(
            config, "_attn_implementation_autoset", False
        ):
            config._attn_implementation = "sdpa"

    def block_prefix(self, block: int) -> str:
        return f"model.layers.{block}."

    def build_block(self, local_index: int) -> nn.Module:
        return LlamaDecoderLayer(cast(LlamaConfig, self.config), layer_idx=local_index)

    def make_span(self, layers: list[nn.Module], blocks: BlockRange) -> LlamaSpan:
        return LlamaSpan(self.config, self.slice_config(blocks), layers, blocks)

    def head_keys(self) -> dict[str, str]:
        keys = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            keys["lm_head.weight"] = "lm_head.weight"
        return keys

    def make_head(self, tensors: dict[str, torch.Tensor]) -> LlamaHead:
        cfg = self.config
        embed = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=getattr(cfg, "pad_token_id", None), device="meta"
        )
        embed.weight = nn.Parameter(tensors["embed_tokens.weight"], requires_grad=False)
        norm = self.norm_class(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norm.weight = nn.Parameter(tensors["norm.weight"], requires_grad=False)
        lm_head = tensors.get("lm_head.weight", embed.weight)
        return LlamaHead(cfg, embed, norm, lm_head)
