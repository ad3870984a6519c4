"""Tiny random models for tests: small enough to build in a second, real enough to exercise the block path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    PretrainedConfig,
)


def tiny_llama_config(num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so the cache shapes differ from the query heads
        max_position_embeddings=256,
    )


def make_tiny_llama(path: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """Save a random Llama with `num_layers` blocks as safetensors in `path`; returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_layers))
    model.save_pretrained(path, safe_serialization=True)
    return path


FAMILIES = ("llama", "bloom", "falcon", "mixtral")


def tiny_config(family: str, num_layers: int = 4, vocab_size: int = 128, hidden_size: int = 64) -> PretrainedConfig:
    """A small config of each served family (Falcon: the new decoder architecture with grouped KV heads)."""
    heads = 4
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                           max_position_embeddings=256)  # fmt: skip
    if family == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=num_layers, n_head=heads)
    if family == "falcon":
        return FalconConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=heads, new_decoder_architecture=True, num_kv_heads=2,
                            max_position_embeddings=256)  # fmt: skip
    if family == "mixtral":
        return MixtralConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)  # fmt: skip
    raise ValueError(f"unknown family {family!r}")


def make_tiny_model(family: str, path: Path, num_layers: int = 4, seed: int = 0, **config: Any) -> Path:
    """Save a random model of `family` (see tiny_config) as safetensors in `path`; returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, **config))
    model.save_pretrained(path, safe_serialization=True)
    return path
