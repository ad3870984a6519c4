"""LoRA inside our plain-torch spans equals peft on the transformers model (fp32, 1e-5) for every family, read
from a PEFT adapter folder as a server reads it; segments with different LoRA (or none) batch in one hop; LoRA on
int8 blocks adds exactly its delta; a plain hop never touches the tuned path.

The helpers here (`Model`, `peft_model`, `client_lora`, `reference_logits`) also serve test_lora_backward.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from shard_server.adapters import AdapterSpec, BlockKeys, load_adapter
from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import ClientHead, ModelFamily, Segment, Span, load_family
from swarm.models.lora import LoraKey, LoraSet, LoraWeights, linear_modules
from tests.family_checks import generate_positions, one_thread, randomize
from tests.models import FAMILIES, tiny_config

LENGTH = 9
ATOL = 1e-5


@dataclass
class Model:
    """A random model of one family saved to disk, transformers' copy of it and our span + head over it."""

    path: Path
    ref: PreTrainedModel
    family: ModelFamily
    span: Span
    head: ClientHead

    @classmethod
    def build(cls, family_name: str, path: Path, seed: int = 0) -> Model:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family_name), dtype=torch.float32)
        randomize(model, generator)
        model.save_pretrained(path / "base", safe_serialization=True)
        ref = AutoModelForCausalLM.from_pretrained(path / "base", dtype=torch.float32).eval()
        family = load_family(path / "base")
        ckpt = Checkpoint(path / "base")
        n = family.num_blocks
        span = family.make_span([family.load_block(ckpt, b) for b in range(n)], BlockRange(0, n))
        return cls(path, ref, family, span, family.load_head(ckpt))

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        return linear_modules(self.span.layers[0])

    def ids(self, batch: int, seed: int = 1) -> torch.Tensor:
        return torch.randint(0, 128, (batch, LENGTH), generator=torch.Generator().manual_seed(seed))


def peft_model(model: Model, rank: int = 4, alpha: float = 8.0, seed: int = 0, **config: Any) -> PeftModel:
    """peft LoRA on every linear module of the blocks, with random non-zero A and B (init_lora_weights=False)."""
    torch.manual_seed(seed)
    targets = sorted({name.rsplit(".", 1)[-1] for name in model.modules})
    base = AutoModelForCausalLM.from_pretrained(model.path / "base", dtype=torch.float32)
    config.setdefault("target_modules", targets)
    lora = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, **config)
    return get_peft_model(base, lora).eval()


def client_lora(model: Model, pm: PeftModel, scaling: float) -> list[tuple[LoraKey, LoraWeights]]:
    """The peft model's LoRA parameters themselves (not copies), keyed as a client sends them."""
    keys = BlockKeys(model.family.block_prefix(0))
    found: dict[LoraKey, dict[str, torch.Tensor]] = {}
    for name, param in pm.named_parameters():
        parsed = keys.parse(name)
        if parsed is not None:
            block, module, which, _ = parsed
            found.setdefault((block, module), {})[which] = param
    return [(key, LoraWeights(ab["A"], ab["B"], scaling)) for key, ab in sorted(found.items())]


def reference_layers(model: nn.Module, n: int) -> nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n)


@contextlib.contextmanager
def deep_prompts(
    model: nn.Module, n: int, prompts: torch.Tensor | None, inputs: dict[int, torch.Tensor]
) -> Iterator[None]:
    """Petals' deep prompts on a transformers model: before layer i, hidden[:, :pre] += prompts[i]; also capture
    each layer's input (after nothing was added) into `inputs`, for gradients w.r.t. it."""

    def hook(i: int) -> Any:
        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            if not h.requires_grad:  # frozen embeddings (peft): a leaf, so gradients w.r.t. it can be taken
                h = h.detach().requires_grad_(True)
            inputs[i] = h
            if prompts is not None:
                pre_len = prompts.shape[2]
                h = torch.cat([h[:, :pre_len] + prompts[i], h[:, pre_len:]], dim=1)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        return pre

    layers = reference_layers(model, n)
    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_logits(
    model: Model,
    ref: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits of a transformers (or peft) model with deep prompts, and each layer's input."""
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs = {"attention_mask": mask.long()}
        if model.family.name in ("llama", "mixtral"):
            kwargs["position_ids"] = generate_positions(mask)
    inputs: dict[int, torch.Tensor] = {}
    with deep_prompts(ref, model.family.num_blocks, prompts, inputs):
        logits = ref(ids, use_cache=False, **kwargs).logits
    return logits, inputs


def our_logits(model: Model, ids: torch.Tensor, segment: Segment) -> torch.Tensor:
    hidden = model.head.embed(ids)
    out = model.span(hidden.reshape(segment.rows, -1), [segment]).view_as(hidden)
    return model.head.logits(out)


# ---- forward: a PEFT adapter folder in our span equals peft ----------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_in_span_equals_peft(family: str, tmp_path: Path) -> None:
    with one_thread():
        model = Model.build(family, tmp_path)
        pm = peft_model(model, rank=4, alpha=8.0)
        pm.save_pretrained(tmp_path / "adapter")
        lora = load_adapter(
            AdapterSpec("a", tmp_path / "adapter"), model.family.block_prefix(0), model.span.blocks, model.modules
        )
        assert len(lora.modules) == model.family.num_blocks * len(model.modules)  # every linear of every block
        ids = model.ids(2)
        with torch.no_grad():
            expected = pm(ids, use_cache=False).logits
            plain = our_logits(model, ids, Segment(2, LENGTH))
            ours = our_logits(model, ids, Segment(2, LENGTH, lora=lora))
        assert (plain - expected).abs().max() > 0.1, "the adapter must change the output for the test to mean much"
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_segments_with_different_lora_batch_together(family: str, tmp_path: Path) -> None:
    """One hop: a segment with adapter 1, one without LoRA, one with adapter 2 + its prompts; each equals its
    own run alone (the base matmuls run once over all rows)."""
    with one_thread():
        model = Model.build(family, tmp_path)
        sets = [LoraSet.of(client_lora(model, peft_model(model, seed=s), 2.0)) for s in (1, 2)]
        prompts = torch.randn(model.family.num_blocks, 1, 3, model.family.hidden_size)
        segments = [
            Segment(2, LENGTH, lora=sets[0]),
            Segment(1, LENGTH),
            Segment(1, LENGTH, lora=sets[1], prompts=list(prompts.unbind(0))),
        ]
        ids = [model.ids(seg.batch, seed=i) for i, seg in enumerate(segments)]
        with torch.no_grad():
            alone = [our_logits(model, i, seg) for i, seg in zip(ids, segments, strict=True)]
            hidden = torch.cat([model.head.embed(i).reshape(-1, model.family.hidden_size) for i in ids])
            out = model.span(hidden, segments).split([seg.rows for seg in segments])
        for seg, o, expected in zip(segments, out, alone, strict=True):
            together = model.head.logits(o.view(seg.batch, LENGTH, -1))
            torch.testing.assert_close(together, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(alone[1], our_logits(model, ids[1], Segment(1, LENGTH, lora=sets[0])))


def test_plain_hop_never_builds_the_tuned_path(tmp_path: Path) -> None:
    model = Model.build("llama", tmp_path)
    with torch.no_grad():
        our_logits(model, model.ids(1), Segment(1, LENGTH))
    assert model.span._tuning is None
    lora = LoraSet.of(client_lora(model, peft_model(model), 1.0))
    with torch.no_grad():
        our_logits(model, model.ids(1), Segment(1, LENGTH, lora=lora))
    tuning = model.span._tuning
    assert tuning is not None and tuning.router.parts == []  # the hop's LoRA is not kept after the hop
    twin = tuning.twins[0]
    assert all(p is q for p, q in zip(twin.parameters(), model.span.layers[0].parameters(), strict=True))


def test_lora_on_int8_blocks_adds_exactly_its_delta(tmp_path: Path) -> None:
    """LoRA on a bitsandbytes int8 layer: output = the int8 layer's output + scaling * B(A(x)) for the layer's
    own input x (captured), i.e. LoRA sits on top of whatever the quantized base computes."""
    pytest.importorskip("bitsandbytes")
    from shard_server.quant import quantize_block

    with one_thread():
        model = Model.build("llama", tmp_path)
        layer = quantize_block(model.span.layers[0], "int8", torch.float32, torch.device("cpu"))
        span = model.family.make_span([layer], BlockRange(0, 1))
        module = "mlp.down_proj"
        a, b = torch.randn(4, 128), torch.randn(64, 4) * 0.1
        lora = LoraSet.of([((0, module), LoraWeights(a, b, 0.5))])
        hidden = model.head.embed(model.ids(2)).reshape(2 * LENGTH, -1)
        seen: list[torch.Tensor] = []
        hook = layer.get_submodule(module).register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            with torch.no_grad():
                plain = span(hidden, [Segment(2, LENGTH)])
                tuned = span(hidden, [Segment(2, LENGTH, lora=lora)])
        finally:
            hook.remove()
        assert type(layer.get_submodule(module)).__name__.endswith("8bitLt")
        torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)  # the same input reaches down_proj
        torch.testing.assert_close(tuned - plain, (seen[1] @ a.T) @ b.T * 0.5, atol=1e-5, rtol=1e-5)
