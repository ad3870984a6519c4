"""Llama-like families (llama, mistral, qwen2, mixtral) equal transformers within 1e-5 in fp32 for every kind of
step (tests/family_checks.py), for every RoPE variant and attention layout they use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig, MistralConfig, MixtralConfig, PretrainedConfig, Qwen2Config

from tests.family_checks import check_family

VOCAB = 97
BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip

CONFIGS: dict[str, PretrainedConfig] = {
    "llama-gqa": LlamaConfig(**BASE),
    # multi-head (kv heads = heads), tied embeddings, biases everywhere, an explicit head_dim != hidden / heads
    "llama-mha-tied-bias": LlamaConfig(**{**BASE, "num_key_value_heads": 4, "head_dim": 24}, tie_word_embeddings=True,
                                       attention_bias=True, mlp_bias=True),
    "llama3-rope": LlamaConfig(**BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8}),
    "yarn-rope": LlamaConfig(**BASE, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
    "linear-rope": LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    # dynamic NTK: max_position_embeddings (64) above the test sequences, where it equals default RoPE
    "dynamic-rope": LlamaConfig(**BASE, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    # window 4 < the 11-token test sequences: decode steps see only the last 4 slots
    "mistral-window": MistralConfig(**BASE, sliding_window=4),
    # q/k/v biases; the last two layers use a sliding window of 5
    "qwen2-bias-window": Qwen2Config(**BASE, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    # 4 experts, top-2, sliding window 4
    "mixtral": MixtralConfig(**{**BASE, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=4),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_family_equals_transformers(name: str, tmp_path: Path) -> None:
    check_family(CONFIGS[name], tmp_path)
