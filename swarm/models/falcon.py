"""Falcon family: old decoder (multi-query or multi-head attention, optional parallel attention/MLP), the new
decoder architecture (grouped KV heads, two LayerNorms in parallel) and the ALiBi variant instead of rotary.

The span runs what `FalconModel.forward` runs between the word embeddings and `ln_f`: an always-materialised
causal mask with the ALiBi bias folded in (ALiBi variant) or rotary (cos, sin) computed once per hop, then each
`FalconDecoderLayer` with the session cache. The architecture switches live inside the layers and the config.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache, FalconConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding, build_alibi_tensor

from swarm.blocks import BlockRange
from swarm.models.base import BlockSpan, ClientHead, ModelFamily, layer_norm, new_session_cache


class FalconSpan(BlockSpan):
    def __init__(
        self, config: PretrainedConfig, slice_config: PretrainedConfig, layers: list[nn.Module], blocks: BlockRange
    ) -> None:
        super().__init__(config, blocks)
        cfg = cast(FalconConfig, config)
        self.slice_config = slice_config
        self.layers = nn.ModuleList(layers)
        self.use_alibi = bool(cfg.alibi)
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        # ALiBi models never read (cos, sin); build the rotary module only when it is used.
        self.rotary_emb = None if self.use_alibi else FalconRotaryEmbedding(config=cfg)

    def new_cache(self) -> DynamicCache:
        return new_session_cache(self.slice_config)

    def forward(
        self,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq]
        position_ids: torch.Tensor | None = None,  # [batch, seq]
    ) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=hidden.device).unsqueeze(0)
        # FalconModel always materialises the mask (even for sdpa without padding) so that ALiBi can be added to
        # it; doing the same keeps the sdpa kernel path, and therefore the numbers, identical to the full model.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            allow_is_causal_skip=False,
        )  # [batch, 1, seq, past + seq]
        alibi = None
        position_embeddings = None
        if self.use_alibi:
            tokens = attention_mask
            if tokens is None:
                tokens = torch.ones(batch, past + seq, dtype=torch.long, device=hidden.device)
            alibi = build_alibi_tensor(tokens, self.num_heads, dtype=hidden.dtype)  # [batch * heads, 1, past + seq]
            if mask is not None and mask.ndim == 4:
                mask = self._fold_alibi(mask, alibi, hidden.dtype)
        else:
            assert self.rotary_emb is not None
            position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin) once per hop
        for layer in self.layers:
            # FalconDecoderLayer still takes `layer_past=` (not `cache=`) and returns (hidden, attention weights)
            hidden = layer(
                hidden,
                alibi=alibi,
                attention_mask=mask,
                position_ids=position_ids,
                layer_past=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )[0]
        return hidden

    def _fold_alibi(self, mask: torch.Tensor, alibi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """FalconAttention's sdpa path applies ALiBi only through the mask: the bias where attending is allowed,
        the dtype's minimum elsewhere. sdpa adds the mask after scaling q.k by 1/sqrt(head_dim), while ALiBi
        belongs before it, hence the pre-scaled bias. Same arithmetic as FalconModel.forward.
        """
        min_value = torch.finfo(dtype).min
        if mask.dtype == torch.bool:  # sdpa masks are boolean (True = attend)
            mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), min_value)
        bias = alibi.reshape(mask.shape[0], -1, *alibi.shape[1:])  # [batch, heads, 1, past + seq]
        return torch.masked_fill(bias / math.sqrt(self.head_dim), mask < -1, min_value)  # [batch, heads, seq, kv]


class FalconHead(ClientHead):
    def __init__(self, embed: nn.Embedding, final_norm: nn.LayerNorm, lm_head_weight: torch.Tensor) -> None:
        super().__init__()
        self.word_embeddings = embed
        self.ln_f = final_norm
        # on meta: a vocabulary-sized random init would cost seconds and gigabytes only to be replaced
        self.lm_head = nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(lm_head_weight, requires_grad=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


class FalconFamily(ModelFamily):
    name = "falcon"
    model_types = ("falcon",)
    base_model_prefix = "transformer."

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        # from_pretrained always picks sdpa for Falcon (FalconPreTrainedModel._check_and_enable_sdpa); bare
        # configs carry None, which the layers would treat as eager (and eager + ALiBi computes differently).
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"

    def block_prefix(self, block: int) -> str:
        return f"transformer.h.{block}."

    def build_block(self, local_index: int) -> nn.Module:
        return FalconDecoderLayer(cast(FalconConfig, self.config), layer_idx=local_index)

    def make_span(self, layers: list[nn.Module], blocks: BlockRange) -> FalconSpan:
        return FalconSpan(self.config, self.slice_config(blocks), layers, blocks)

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
        eps = float(getattr(self.config, "layer_norm_epsilon", 1e-5))
        embed = nn.Embedding.from_pretrained(tensors["word_embeddings.weight"], freeze=True)
        final_norm = layer_norm(tensors["ln_f.weight"], tensors["ln_f.bias"], eps)
        return FalconHead(embed, final_norm, tensors.get("lm_head.weight", embed.weight))
