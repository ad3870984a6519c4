"""The loader reads only its own blocks' tensors: proven on checkpoints that contain nothing else, and by
auditing Checkpoint.tensors_read on a sharded checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from shard_server.backend import BlockBackend
from shard_server.loader import LoadError, inspect_model, load_span
from swarm.blocks import BlockRange
from swarm.model_files import INDEX_FILE, Checkpoint, ModelNotFound

CPU = torch.device("cpu")


def only_blocks_2_and_3(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint whose safetensors file holds the tensors of blocks 2 and 3 and nothing else."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if k.startswith(("model.layers.2.", "model.layers.3."))}
    assert kept and len(kept) < len(tensors)
    save_file(kept, dst / "model.safetensors")
    return dst


def reference_output(model_dir: Path, hidden: torch.Tensor) -> torch.Tensor:
    """Layers 2 and 3 of the full transformers model applied to `hidden`."""
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    with torch.no_grad():
        pos_emb = model.model.rotary_emb(hidden, positions)
        for layer in model.model.layers[2:4]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=pos_emb)
    return hidden


def test_blocks_2_4_load_from_a_checkpoint_holding_only_them(tiny_llama: Path, tmp_path: Path) -> None:
    stripped = only_blocks_2_and_3(tiny_llama, tmp_path / "blocks-2-3")
    info = inspect_model(str(stripped), BlockRange(2, 4))
    span = load_span(info, BlockRange(2, 4), CPU, torch.float32)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in span.parameters())  # nothing left on meta

    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    out = BlockBackend(span, CPU, torch.float32).forward(BlockRange(2, 4), hidden)
    torch.testing.assert_close(out, reference_output(tiny_llama, hidden), atol=1e-5, rtol=0)

    # Asking the same stripped checkpoint for a block it lacks fails loudly instead of inventing weights.
    with pytest.raises(LoadError, match=r"model\.layers\.1\."):
        load_span(inspect_model(str(stripped), BlockRange(1, 3)), BlockRange(1, 3), CPU, torch.float32)


def test_sharded_checkpoint_reads_only_the_blocks_tensors(tiny_llama: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="100KB")
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2  # really sharded

    info = inspect_model(str(sharded), BlockRange(2, 4))
    checkpoint = Checkpoint(sharded)
    span = load_span(info, BlockRange(2, 4), CPU, torch.bfloat16, checkpoint=checkpoint)

    read = checkpoint.tensors_read
    assert read and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in read), read
    assert sorted(read) == sorted(k for k in weight_map if k.startswith(("model.layers.2.", "model.layers.3.")))
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}


def test_inspect_model_errors(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="has 4 blocks"):
        inspect_model(str(tiny_llama), BlockRange(2, 6))
    with pytest.raises(ModelNotFound):
        inspect_model(str(tmp_path / "no-such-model"), BlockRange(0, 1))
