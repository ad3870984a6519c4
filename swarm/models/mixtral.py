"""Mixtral family: Mistral-style attention (rotary, GQA, optional sliding window) with a sparse
mixture-of-experts MLP. Router and experts live inside each decoder layer, so a server holds all experts of
its blocks and the client sees a plain stack of blocks; only weight loading differs from Llama.
"""

from __future__ import annotations

import re
from typing import cast

import torch
from torch import nn
from transformers import MixtralConfig, PretrainedConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from swarm.blocks import BlockRange
from swarm.models.llama import LlamaFamily, LlamaSpan

# Per-expert checkpoint tensors, after renaming block_sparse_moe -> mlp: w1 = gate, w3 = up, w2 = down.
EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")


class MixtralSpan(LlamaSpan):
    """Same prologue as Llama (causal or sliding-window mask, rotary once per hop); the layers route tokens."""

    rotary_class = MixtralRotaryEmbedding


class MixtralFamily(LlamaFamily):
    name = "mixtral"
    model_types = ("mixtral",)
    norm_class = MixtralRMSNorm

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        # from_pretrained picks the batched "grouped_mm" experts kernel; bare configs carry None, which means
        # the per-expert python loop. Both are correct, but they round differently (1e-7 in fp32, 4e-3 in
        # bf16), so servers use the kernel the full model uses.
        if getattr(config, "_experts_implementation", None) is None:
            config._experts_implementation = "grouped_mm"

    def build_block(self, local_index: int) -> nn.Module:
        return MixtralDecoderLayer(cast(MixtralConfig, self.config), layer_idx=local_index)

    def make_span(self, layers: list[nn.Module], blocks: BlockRange) -> MixtralSpan:
        return MixtralSpan(self.config, self.slice_config(blocks), layers, blocks)

    def convert_block_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints store each expert's w1/w2/w3 separately; the module holds them fused per layer.

        gate_up_proj [experts, 2 * intermediate, hidden] = w1 (gate) then w3 (up) along dim 1, the order
        MixtralExperts splits them in; down_proj [experts, hidden, intermediate] = w2. Checkpoints that already
        hold fused tensors pass through.
        """
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, int], torch.Tensor] = {}
        for key, tensor in tensors.items():
            key = key.replace("block_sparse_moe.", "mlp.")  # the checkpoint's old name of the MoE module
            match = EXPERT_KEY.fullmatch(key)
            if match:
                experts[(match[2], int(match[1]))] = tensor  # [intermediate, hidden] or [hidden, intermediate]
            else:
                out[key] = tensor
        if not experts:
            return out
        n = int(cast(MixtralConfig, self.config).num_local_experts)
        missing = [f"{w}/{e}" for w in ("w1", "w2", "w3") for e in range(n) if (w, e) not in experts]
        if missing or len(experts) != 3 * n:
            raise KeyError(f"expected w1/w2/w3 of {n} experts; missing or unexpected: {missing or sorted(experts)}")

        def stacked(w: str) -> torch.Tensor:
            return torch.stack([experts[(w, e)] for e in range(n)])  # [experts, out, in]

        out["mlp.experts.gate_up_proj"] = torch.cat([stacked("w1"), stacked("w3")], dim=1)
        out["mlp.experts.down_proj"] = stacked("w2")
        return out
