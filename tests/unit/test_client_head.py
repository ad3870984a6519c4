"""The client loads only embeddings, final norm and LM head, and they compute what transformers computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from client_sdk.head import load_local_model
from swarm.model_files import Checkpoint, config_fingerprint


def test_reads_only_the_head_tensors(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = Checkpoint.read

    def spy(self: Checkpoint, keys, device: str = "cpu"):  # type: ignore[no-untyped-def]
        keys = list(keys)
        read.extend(keys)
        return original(self, keys, device)

    monkeypatch.setattr(Checkpoint, "read", spy)
    local = load_local_model(tiny_llama)
    assert set(read) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert local.num_blocks == 4 and local.model_id == tiny_llama.name
    assert local.model_hash == config_fingerprint(tiny_llama)
    assert local.tokenizer is None and local.dtype == torch.float32


def test_head_matches_transformers(tiny_llama: Path) -> None:
    local = load_local_model(tiny_llama)
    ref = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    hidden = torch.randn(1, 4, 64)
    with torch.inference_mode():
        assert torch.equal(local.head.embed(ids), ref.model.embed_tokens(ids))
        assert torch.allclose(local.head.logits(hidden), ref.lm_head(ref.model.norm(hidden)), atol=1e-6)
