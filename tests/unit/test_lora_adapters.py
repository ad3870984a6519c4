"""`--adapters`: reading PEFT adapter folders without peft. PEFT's naming variants and per-module rank/alpha
patterns give the model peft gives; only the held blocks' tensors are read; everything the server cannot apply
exactly is refused with a one-line reason; `NAME=PATH` parsing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from shard_server.adapters import AdapterError, AdapterSpec, load_adapter, parse_specs
from swarm.blocks import BlockRange
from swarm.models import Segment
from swarm.models.lora import LoraSet
from tests.family_checks import one_thread
from tests.unit.test_lora import LENGTH, Model, our_logits, peft_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model.build("llama", tmp_path_factory.mktemp("llama"))


def save(model: Model, path: Path, **config: Any) -> Path:
    peft_model(model, **config).save_pretrained(path)
    return path


def read(model: Model, path: Path, blocks: BlockRange | None = None) -> LoraSet:
    names = [name for name, _ in model.span.layers[0].named_modules() if name]
    prefix = model.family.block_prefix(0)
    return load_adapter(AdapterSpec("a", path), prefix, blocks or model.span.blocks, model.modules, names)


def same(a: LoraSet, b: LoraSet) -> bool:
    if a.modules.keys() != b.modules.keys():
        return False
    pairs = [(x, y) for key in a.modules for x, y in zip(a.modules[key], b.modules[key], strict=True)]
    return all(torch.equal(x.a, y.a) and torch.equal(x.b, y.b) and x.scaling == y.scaling for x, y in pairs)


def rename_keys(src: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k.replace(old, new): v for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst


def test_naming_variants_read_alike(llama: Model, tmp_path: Path) -> None:
    path = save(llama, tmp_path / "plain")
    expected = read(llama, path)
    # the adapter's name kept in the keys; a model wrapped without its LM head (no leading "model.")
    for name, old, new in [("named", ".weight", ".default.weight"), ("bare", "model.model.", "model.")]:
        assert same(read(llama, rename_keys(path, tmp_path / name, old, new)), expected), name


def test_rank_and_alpha_patterns_equal_peft(llama: Model, tmp_path: Path) -> None:
    patterns = dict(rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"down_proj": 32})
    pm = peft_model(llama, rank=4, alpha=8.0, **patterns)
    pm.save_pretrained(tmp_path / "patterns")
    lora = read(llama, tmp_path / "patterns")
    assert lora.modules[(0, "self_attn.q_proj")][0].rank == 2
    assert lora.modules[(1, "mlp.down_proj")][0].rank == 6
    assert lora.modules[(1, "mlp.down_proj")][0].scaling == 32 / 6
    assert lora.modules[(0, "mlp.up_proj")][0].scaling == 8 / 4
    ids = llama.ids(2)
    with one_thread(), torch.no_grad():
        torch.testing.assert_close(
            our_logits(llama, ids, Segment(2, LENGTH, lora=lora)), pm(ids).logits, atol=ATOL, rtol=0
        )


def test_reads_only_the_held_blocks(llama: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(llama, tmp_path / "ad")
    read_keys: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file = real_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.file.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.file.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.file.keys())

        def get_tensor(self, key: str) -> torch.Tensor:
            read_keys.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    lora = read(llama, path, BlockRange(1, 3))
    assert {block for block, _ in lora.modules} == {1, 2}
    assert read_keys and all(".layers.1." in k or ".layers.2." in k for k in read_keys)
    assert len(read_keys) == 2 * 2 * len(llama.modules)  # A and B of every module of 2 blocks


def edit_config(path: Path, **changes: Any) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "dora": (dict(use_dora=True), "DoRA"),
    "trained biases": (dict(bias="all"), "bias='all'"),
    "lora bias": (dict(lora_bias=True), "LoRA biases"),
    "fan_in_fan_out": (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    "target parameters": (dict(target_parameters=["mlp.experts.gate_up_proj"]), "LoRA on parameters"),
    "not lora": (dict(peft_type="IA3"), "only LoRA adapters are supported, this one is IA3"),
    "modules_to_save in a block": (dict(modules_to_save=["input_layernorm"]), "modules_to_save 'input_layernorm'"),
    "rank disagrees": (dict(r=5), "rank 4, adapter_config.json says 5"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_applied_exactly_is_refused(llama: Model, tmp_path: Path, case: str) -> None:
    changes, words = REFUSED[case]
    path = edit_config(save(llama, tmp_path / "ad"), **changes)
    with pytest.raises(AdapterError, match=words.replace("(", r"\(").replace("[", r"\[")):
        read(llama, path)


def test_lora_outside_the_blocks_and_foreign_shapes_are_refused(llama: Model, tmp_path: Path) -> None:
    with_head = save(llama, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="outside the transformer blocks.*lm_head"):
        read(llama, with_head)
    bloom = Model.build("bloom", tmp_path / "bloom")
    with pytest.raises(AdapterError, match="outside the transformer blocks .or for another model"):
        read(llama, save(bloom, tmp_path / "bloom-adapter"))
    narrow = rename_keys(save(llama, tmp_path / "q", target_modules=["q_proj"]), tmp_path / "k", "q_proj", "k_proj")
    with pytest.raises(AdapterError, match=r"do not fit a \[32, 64\] layer"):
        read(llama, narrow)


def test_missing_files_are_refused(llama: Model, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read(llama, tmp_path)
    path = save(llama, tmp_path / "ad")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only adapter_model.bin"):
        read(llama, path)


def test_adapter_specs() -> None:
    assert AdapterSpec.parse("/x/my-adapter/") == AdapterSpec("my-adapter", Path("/x/my-adapter/"))
    assert AdapterSpec.parse("chat=/x/y") == AdapterSpec("chat", Path("/x/y"))
    assert [s.name for s in parse_specs(["/a/one", "two=/a/one", " "])] == ["one", "two"]
    with pytest.raises(AdapterError, match="repeated: one"):
        parse_specs(["/a/one", "/b/one"])
    with pytest.raises(AdapterError, match="letters, digits"):
        AdapterSpec.parse("bad name=/x")
