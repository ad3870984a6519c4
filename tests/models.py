"""Tiny random models for tests: small enough to build in a second, real enough to exercise the block path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


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
