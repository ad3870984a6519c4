"""Mixtral family: Llama's attention (rotary, GQA, optional sliding window) with a sparse mixture-of-experts MLP.

Router and experts live inside each decoder layer, so a server holds all experts of its blocks and the client
sees a plain stack of blocks. Experts are stored fused per layer, as transformers holds them in memory:
`mlp.experts.gate_up_proj` [experts, 2 * intermediate, hidden] and `mlp.experts.down_proj`
[experts, hidden, intermediate]; checkpoints store them per expert (`block_sparse_moe.experts.{e}.w1/w2/w3`,
which transformers 5's `save_pretrained` still writes) or fused, and both load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from swarm.models.config import ConfigError, ModelConfig
from swarm.models.llama import ACTIVATIONS, LlamaConfig, LlamaFamily

# Per-expert checkpoint tensors, after renaming block_sparse_moe -> mlp: w1 = gate, w3 = up, w2 = down.
EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    num_local_experts: int
    num_experts_per_tok: int

    @classmethod
    def _derive(cls, values: dict) -> dict:
        values = super()._derive(values)
        experts, top_k = values.get("num_local_experts"), values.get("num_experts_per_tok")
        if experts is not None and top_k is not None and not 0 < int(top_k) <= int(experts):
            raise ConfigError(f"num_experts_per_tok={top_k} must be in 1..num_local_experts={experts}")
        return values


class MixtralRouter(nn.Module):
    """Router logits [N, experts]. A bare parameter, not an nn.Linear: quantizing routing is not worth it."""

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class MixtralExperts(nn.Module):
    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        experts, hidden, inter = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:  # [n, hidden] -> [n, hidden]
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[expert])


class MixtralMoE(nn.Module):
    """Top-k routing as transformers: softmax over all experts in float32, keep the top k, renormalize them."""

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = MixtralRouter(cfg)
        self.experts = MixtralExperts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [N, experts]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # Group the N * k (row, expert) pairs by expert: one matmul chain per expert that got any rows.
        flat = chosen.reshape(-1)  # [N * k]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.experts.gate_up_proj.shape[0]).tolist()
        rows = order // self.top_k  # the row of each pair, grouped by expert
        pair_weights = weights.reshape(-1)[order]  # float32
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            idx = rows[start : start + count]
            y = self.experts(x[idx], expert) * pair_weights[start : start + count, None]  # float32, as transformers
            out.index_add_(0, idx, y.to(out.dtype))
            start += count
        return out


class MixtralFamily(LlamaFamily):
    name = "mixtral"
    model_types: ClassVar[tuple[str, ...]] = ("mixtral",)
    config_class: ClassVar[type[ModelConfig]] = MixtralConfig
    config: MixtralConfig

    def build_mlp(self) -> nn.Module:
        return MixtralMoE(self.config)

    def convert_block_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names -> module names; per-expert w1/w2/w3 stacked into the fused tensors.

        gate_up_proj = w1 (gate) then w3 (up) along dim 1, the order the experts split them in; down_proj = w2.
        """
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, int], torch.Tensor] = {}
        for key, tensor in tensors.items():
            key = key.replace("block_sparse_moe.", "mlp.")  # the checkpoint's name of the MoE module
            match = EXPERT_KEY.fullmatch(key)
            if match:
                experts[(match[2], int(match[1]))] = tensor  # [intermediate, hidden] or [hidden, intermediate]
            else:
                out[key] = tensor
        if not experts:
            return out  # already fused
        n = self.config.num_local_experts
        missing = [f"{w}/{e}" for w in ("w1", "w2", "w3") for e in range(n) if (w, e) not in experts]
        if missing or len(experts) != 3 * n:
            raise KeyError(f"expected w1/w2/w3 of {n} experts; missing or unexpected: {missing or sorted(experts)}")

        def stacked(w: str) -> torch.Tensor:
            return torch.stack([experts[(w, e)] for e in range(n)])  # [experts, out, in]

        out["mlp.experts.gate_up_proj"] = torch.cat([stacked("w1"), stacked("w3")], dim=1)
        out["mlp.experts.down_proj"] = stacked("w2")
        return out
