"""Llama-like families (llama, mistral, qwen2, mixtral) equal transformers within 1e-5 in fp32 for every kind of
step (tests/family_checks.py), for every RoPE variant and attention layout they use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
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


ROPE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # older configs: `rope_scaling` with "type", and `rope_theta` beside it
    "linear-old-style": {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16,
                                 "original_max_position_embeddings": 16}},
    "yarn-mscale": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.7,
                                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 32}},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}, "rope_theta": 500000.0},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rotary_tables_equal_transformers(variant: str) -> None:
    """cos/sin of every position, including past max_position_embeddings (64) where dynamic NTK rescales."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from swarm.models import Segment, family_from_dict

    raw = {**BASE, "model_type": "llama", **ROPE_VARIANTS[variant]}
    family = family_from_dict(raw)
    for length in (40, 64, 100):
        ours = family.rotary.rows([Segment(1, length)], torch.device("cpu"), torch.float32)  # type: ignore[attr-defined]
        # a fresh transformers rotary module per length: its dynamic variant keeps state between calls
        reference = LlamaRotaryEmbedding(LlamaConfig(**raw))
        cos, sin = reference(torch.zeros(1), torch.arange(length)[None])
        torch.testing.assert_close(ours[0], cos[0], atol=1e-6, rtol=0)
        half = sin.shape[-1] // 2  # our sin table carries the sign of rotate_half in its first half
        torch.testing.assert_close(ours[1], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1), atol=1e-6, rtol=0)


def test_config_reading_matches_transformers() -> None:
    from swarm.models import family_from_dict

    qwen = {**BASE, "model_type": "qwen2", "num_hidden_layers": 5, "use_sliding_window": True, "sliding_window": 7,
            "max_window_layers": 3}  # fmt: skip
    cfg = family_from_dict(qwen).config
    expected = Qwen2Config(**{k: v for k, v in qwen.items() if k != "model_type"})
    assert [cfg.window(b) for b in range(5)] == [  # type: ignore[attr-defined]
        7 if t == "sliding_attention" else None for t in expected.layer_types or ()
    ]
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias  # type: ignore[attr-defined]
    mistral = family_from_dict({**BASE, "model_type": "mistral", "sliding_window": None, "head_dim": None}).config
    assert mistral.head_dim == 16 and mistral.window(0) is None  # type: ignore[attr-defined]
    mixtral = family_from_dict({**BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    assert mixtral.config.rope.theta == 1e6 and mixtral.config.rms_norm_eps == 1e-5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change",
    [
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},  # no factor
        {"hidden_act": "mystery"},
        {"num_key_value_heads": 3},
        {"intermediate_size": None},
    ],
)
def test_unservable_configs_raise_config_error(change: dict[str, Any]) -> None:
    from swarm.models import ConfigError, family_from_dict

    raw = {**BASE, "model_type": "llama", **change}
    if raw["intermediate_size"] is None:
        del raw["intermediate_size"]
    with pytest.raises(ConfigError):
        family_from_dict(raw)


def test_mixtral_blocks_hold_fused_experts_like_transformers(tmp_path: Path) -> None:
    """Per-expert checkpoint tensors (what save_pretrained writes) and fused ones load into the same block,
    equal to transformers' own layer; only that block's tensors are read."""
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from swarm.model_files import Checkpoint
    from swarm.models import load_family

    torch.manual_seed(0)
    MixtralForCausalLM(CONFIGS["mixtral"]).save_pretrained(tmp_path, safe_serialization=True)  # type: ignore[arg-type]
    ckpt = Checkpoint(tmp_path)
    assert any(".block_sparse_moe.experts.0.w1." in k for k in ckpt.keys())  # per-expert keys on disk
    full = MixtralForCausalLM.from_pretrained(tmp_path)
    family = load_family(tmp_path)
    block = family.load_block(ckpt, 2)
    assert all(k.startswith("model.layers.2.") for k in ckpt.tensors_read)
    expected = full.model.layers[2].state_dict()
    assert block.state_dict().keys() == expected.keys()
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "config.json").read_text())
    save_file({f"model.layers.0.{k}": v.contiguous() for k, v in expected.items()}, fused / "model.safetensors")
    again = family.load_block(Checkpoint(fused), 0)
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
