"""The client loads only embeddings, final norm and LM head, they compute what transformers computes, and the
client's import path never loads transformers (the HF drop-in classes load it when first used)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaForCausalLM

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
    assert load_local_model(tiny_llama, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_stop_and_pad_tokens_follow_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    """generation_config.json first (as transformers' generate reads it), then config.json."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=2, pad_token_id=None)
    (folder / "config.json").write_text(json.dumps(config))
    local = load_local_model(folder)
    assert (local.eos_token_ids, local.pad_token_id) == ([2], None)
    GenerationConfig(eos_token_id=[5, 7], pad_token_id=3).save_pretrained(folder)
    ref = GenerationConfig.from_pretrained(folder)
    local = load_local_model(folder)
    assert (local.eos_token_ids, local.pad_token_id) == (ref.eos_token_id, ref.pad_token_id)


def test_client_import_path_loads_no_transformers(tiny_llama: Path) -> None:
    code = (
        "import sys\n"
        "from client_sdk import SwarmClient, AsyncSwarmClient, ClientConfig, Tokenizer\n"
        "from client_sdk.head import load_local_model\n"
        f"load_local_model({str(tiny_llama)!r})\n"
        "heavy = {'transformers', 'huggingface_hub', 'jinja2', 'pydantic'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # pydantic (DHT records) loads when a client is built, jinja2 on chat templates
