"""BLOOM family: ALiBi position bias instead of position ids, fused QKV, LayerNorm after the word embeddings.

The span runs what `BloomModel.forward` runs between the embedding LayerNorm and the final LayerNorm: it
rebuilds the ALiBi bias and the causal mask on every hop, then calls each `BloomBlock` with the session cache.
In transformers 5.x BLOOM uses the common cache layout ([batch, heads, tokens, head_dim] per layer), so the
base class's crop/reorder apply unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import BloomConfig, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from swarm.blocks import BlockRange
from swarm.models.base import BlockSpan, ClientHead, ModelFamily, layer_norm, new_session_cache


class BloomSpan(BlockSpan):
    def __init__(
        self, config: PretrainedConfig, slice_config: PretrainedConfig, layers: list[nn.Module], blocks: BlockRange
    ) -> None:
        super().__init__(config, blocks)
        self.slice_config = slice_config
        self.layers = nn.ModuleList(layers)
        self.num_heads = int(cast(BloomConfig, config).n_head)

    def new_cache(self) -> DynamicCache:
        return new_session_cache(self.slice_config)

    def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, hidden], already through word_embeddings_layernorm (client side)
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq]
        position_ids: torch.Tensor | None = None,  # unused: ALiBi takes positions from the attention mask
    ) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        past = cache.get_seq_length() if cache is not None else 0
        # ALiBi counts positions over non-padding tokens only, so it needs the 2-D mask over past + new tokens.
        # Without padding an all-ones mask yields the same 0..n-1 ramp BloomModel builds in that case.
        tokens = attention_mask
        if tokens is None:
            tokens = torch.ones(batch, past + seq, dtype=torch.long, device=hidden.device)
        alibi = build_alibi_tensor(tokens, self.num_heads, dtype=hidden.dtype)  # [batch * heads, 1, past + seq]
        # BloomAttention is eager-only: the family forces `_attn_implementation="eager"`, so this is a float
        # mask [batch, 1, seq, past + seq] holding both the causal and the padding part.
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache)
        for layer in self.layers:
            # BloomBlock still takes `layer_past=` (not `cache=`) and returns (hidden, attention weights)
            hidden = layer(hidden, alibi=alibi, attention_mask=mask, layer_past=cache, use_cache=cache is not None)[0]
        return hidden


class BloomHead(ClientHead):
    def __init__(
        self, embed: nn.Embedding, embed_norm: nn.LayerNorm, final_norm: nn.LayerNorm, lm_head_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.word_embeddings = embed
        self.word_embeddings_layernorm = embed_norm
        self.ln_f = final_norm
        # on meta: a vocabulary-sized random init would cost seconds and gigabytes only to be replaced
        self.lm_head = nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(lm_head_weight, requires_grad=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The embedding LayerNorm is part of BLOOM's prologue and cheap, so it runs here and not on server 0.
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


class BloomFamily(ModelFamily):
    name = "bloom"
    model_types = ("bloom",)
    base_model_prefix = "transformer."

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        # BloomAttention only implements eager attention, and from_pretrained picks eager for BLOOM. A mask
        # built for "sdpa" would be boolean/None and silently drop the causal part (logits off by ~5).
        config._attn_implementation = "eager"

    def block_prefix(self, block: int) -> str:
        return f"transformer.h.{block}."

    def build_block(self, local_index: int) -> nn.Module:
        return BloomBlock(cast(BloomConfig, self.config), layer_idx=local_index)

    def make_span(self, layers: list[nn.Module], blocks: BlockRange) -> BloomSpan:
        return BloomSpan(self.config, self.slice_config(blocks), layers, blocks)

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
        eps = float(cast(BloomConfig, self.config).layer_norm_epsilon)
        embed = nn.Embedding.from_pretrained(tensors["word_embeddings.weight"], freeze=True)
        embed_norm = layer_norm(
            tensors["word_embeddings_layernorm.weight"], tensors["word_embeddings_layernorm.bias"], eps
        )
        final_norm = layer_norm(tensors["ln_f.weight"], tensors["ln_f.bias"], eps)
        return BloomHead(embed, embed_norm, final_norm, tensors.get("lm_head.weight", embed.weight))
