"""Every model family: two spans loaded block by block from the checkpoint, each with its own cache, give the
same logits as the full transformers model loaded with `from_pretrained` and its default settings.

Tiny random models, fp32 unless stated; one model per variant, built once per module.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    BloomConfig,
    BloomForCausalLM,
    BloomModel,
    FalconConfig,
    FalconForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import BlockSpan, ClientHead, ModelFamily, family_for
from swarm.models.llama import LlamaFamily

VOCAB = 97
EXACT = 1e-5  # fp32: split spans vs the full model

# name -> (model class, config class, config arguments besides the vocabulary)
VARIANTS: dict[str, tuple[type[PreTrainedModel], type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "bloom": (BloomForCausalLM, BloomConfig, dict(hidden_size=32, n_layer=3, n_head=4)),
    # old decoder architecture: multi-query attention, parallel attention/MLP, rotary
    "falcon": (FalconForCausalLM, FalconConfig, dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)),
    # old decoder architecture with ALiBi: multi-head attention, attention then MLP, biases
    "falcon-alibi": (FalconForCausalLM, FalconConfig, dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                           alibi=True, multi_query=False, parallel_attn=False,
                                                           bias=True)),
    # new decoder architecture: grouped KV heads, two LayerNorms, parallel attention/MLP
    "falcon-new": (FalconForCausalLM, FalconConfig, dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                         new_decoder_architecture=True, num_kv_heads=2)),
    # 4 experts, top-2; sliding window 4 < the 11-token sequence, so the window (and cropping past it) is exercised
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                        num_attention_heads=4, num_key_value_heads=2,
                                                        num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
}  # fmt: skip


def build(name: str) -> PreTrainedModel:
    model_class, config_class, arguments = VARIANTS[name]
    return model_class(config_class(vocab_size=VOCAB, **arguments))


SPLIT = 1  # spans [0, 1) and [1, 3)
PREFILL, STEPS, CHUNK = 6, 3, 2  # prefill, single-token steps, then one multi-token chunk
LENGTH = PREFILL + STEPS + CHUNK
PAD = 3  # left padding of row 0 in the batch-2 runs


@dataclass
class Loaded:
    family: ModelFamily
    full: PreTrainedModel
    path: Path

    def spans(self, dtype: torch.dtype = torch.float32) -> list[BlockSpan]:
        ckpt = Checkpoint(self.path)
        spans = []
        for blocks in (BlockRange(0, SPLIT), BlockRange(SPLIT, self.family.num_blocks)):
            layers = [
                self.family.load_block(ckpt, b, i).to(dtype) for i, b in enumerate(range(blocks.start, blocks.end))
            ]
            spans.append(self.family.make_span(layers, blocks))
        return spans

    def head(self) -> ClientHead:
        return self.family.load_head(Checkpoint(self.path))

    def reference(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The full model on the whole sequence at once (no cache): [batch, seq, vocab]."""
        kwargs: dict = {}
        if mask is not None:
            kwargs["attention_mask"] = mask
            if "position_ids" in inspect.signature(self.full.forward).parameters:
                kwargs["position_ids"] = positions(mask)
        return self.full(ids, use_cache=False, **kwargs).logits


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from intra-op threads, which spin and slow down a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    build(request.param).save_pretrained(path, safe_serialization=True)
    # default settings: the attention and experts kernels users get
    full = VARIANTS[request.param][0].from_pretrained(path).eval()
    return Loaded(family_for(AutoConfig.from_pretrained(path)), full, path)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(batch))
    if batch == 1:
        return ids, None
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[0, :PAD] = 0
    return ids, mask


def chunks() -> list[slice]:
    cuts = [0, PREFILL, *range(PREFILL + 1, PREFILL + STEPS + 1), LENGTH]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def step(spans, caches, head, ids, mask, part: slice, dtype=torch.float32) -> torch.Tensor:
    """Tokens `part` through every span with its cache, as client and servers would: [batch, len, vocab]."""
    step_mask = pos = None
    if mask is not None:
        step_mask = mask[:, : part.stop]  # [batch, past + seq]
        pos = positions(step_mask)[:, part]  # [batch, seq]
    hidden = head.embed(ids[:, part]).to(dtype)
    for span, cache in zip(spans, caches):
        hidden = span(hidden, cache, attention_mask=step_mask, position_ids=pos)
    return head.logits(hidden.float())


def real_tokens(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits at non-padding positions only (a padding query's output is meaningless)."""
    return logits if mask is None else logits[mask.bool()]


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_spans_with_caches_equal_full_model(model: Loaded, batch: int) -> None:
    ids, mask = inputs(batch)
    spans, head = model.spans(), model.head()
    caches = [s.new_cache() for s in spans]
    ours = torch.cat([step(spans, caches, head, ids, mask, part) for part in chunks()], dim=1)
    expected = model.reference(ids, mask)
    diff = (real_tokens(ours, mask) - real_tokens(expected, mask)).abs().max().item()
    assert diff <= EXACT, f"max |split - full| = {diff:.2e}"
    assert [s.cache_length(c) for s, c in zip(spans, caches)] == [LENGTH, LENGTH]

    # Roll back the last chunk and replay it, then roll back and replay the last token, twice: all exact.
    for back in (CHUNK, 1, 1):
        for span, cache in zip(spans, caches):
            span.crop_cache(cache, LENGTH - back)
            assert span.cache_length(cache) == LENGTH - back
        again = step(spans, caches, head, ids, mask, slice(LENGTH - back, LENGTH))
        torch.testing.assert_close(again, ours[:, LENGTH - back :], atol=EXACT, rtol=0)


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 2])
def test_stateless_forward_equals_full_hidden_states(model: Loaded, batch: int) -> None:
    """cache=None (one batch, e.g. fine-tuning): the spans' output is the full model's input to its final norm."""
    ids, mask = inputs(batch)
    captured: list[torch.Tensor] = []
    base = model.full.base_model
    final_norm = getattr(base, "norm", None) or base.ln_f
    hook = final_norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model.reference(ids, mask)
    finally:
        hook.remove()
    spans, head = model.spans(), model.head()
    hidden = head.embed(ids)
    for span in spans:
        hidden = span(hidden, None, attention_mask=mask, position_ids=None if mask is None else positions(mask))
    diff = (real_tokens(hidden, mask) - real_tokens(captured[0], mask)).abs().max().item()
    assert diff <= EXACT, f"max |span hidden - full hidden| = {diff:.2e}"


@torch.inference_mode()
def test_reorder_cache_swaps_rows(model: Loaded) -> None:
    ids, mask = inputs(2)
    spans, head = model.spans(), model.head()
    caches = [s.new_cache() for s in spans]
    for part in chunks()[:-1]:
        step(spans, caches, head, ids, mask, part)
    before = [[layer.keys.clone() for layer in cache.layers] for cache in caches]
    for span, cache in zip(spans, caches):
        span.reorder_cache(cache, torch.tensor([1, 0]))
    for old, cache in zip(before, caches):
        for keys, layer in zip(old, cache.layers):
            assert torch.equal(layer.keys, keys[[1, 0]])
    # The swapped cache continues the swapped batch exactly.
    assert mask is not None
    swapped_ids, swapped_mask = ids[[1, 0]], mask[[1, 0]]
    last = step(spans, caches, head, swapped_ids, swapped_mask, chunks()[-1])
    expected = model.reference(swapped_ids, swapped_mask)[:, -CHUNK:]
    torch.testing.assert_close(last, expected, atol=EXACT, rtol=0)


@torch.inference_mode()
def test_negative_control_lost_cache_is_detected(model: Loaded) -> None:
    """Server 2 losing its cache mid-way must show up, or the exactness tests above would prove nothing."""
    ids, mask = inputs(1)
    spans, head = model.spans(), model.head()
    caches = [s.new_cache() for s in spans]
    ours = []
    for i, part in enumerate(chunks()):
        if i == 2:
            caches[1] = spans[1].new_cache()
        ours.append(step(spans, caches, head, ids, mask, part))
    diff = (torch.cat(ours, dim=1) - model.reference(ids, mask)).abs().max().item()
    assert diff > 100 * EXACT


# Measured on these tiny random models (logits std 0.11-0.13), spans in low precision vs the fp32 full model:
# bf16 max |diff| 0.0018-0.0028 (~2% of the logits' std), fp16 0.0002-0.0004, same top-1 token everywhere.
# The bounds leave ~3.5x headroom.
LOW_PRECISION = {torch.bfloat16: 0.01, torch.float16: 0.0015}


@torch.inference_mode()
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision_spans_stay_close_to_fp32(model: Loaded, dtype: torch.dtype) -> None:
    ids, mask = inputs(2)
    spans, head = model.spans(dtype), model.head()  # the client's head stays fp32; hidden states travel in dtype
    caches = [s.new_cache() for s in spans]
    ours = torch.cat([step(spans, caches, head, ids, mask, part, dtype) for part in chunks()], dim=1)
    ours, expected = real_tokens(ours, mask), real_tokens(model.reference(ids, mask), mask)
    diff = (ours - expected).abs().max().item()
    agree = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"{dtype}: max |diff| {diff:.4f}, top-1 agreement {agree:.1%}, logits std {expected.std():.3f}")
    assert diff <= LOW_PRECISION[dtype]
    assert agree >= 0.95


def test_mixtral_experts_are_fused_like_from_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    build("mixtral").save_pretrained(tmp_path, safe_serialization=True)
    ckpt = Checkpoint(tmp_path)
    assert any(".block_sparse_moe.experts.0.w1." in k for k in ckpt.keys())  # per-expert keys on disk
    full = MixtralForCausalLM.from_pretrained(tmp_path)
    family = family_for(full.config)
    block = family.load_block(ckpt, 2, 0)
    expected = full.model.layers[2].state_dict()
    assert block.state_dict().keys() == expected.keys()
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert ckpt.tensors_read and all(k.startswith("model.layers.2.") for k in ckpt.tensors_read)


@torch.inference_mode()
def test_bloom_checkpoint_without_transformer_prefix(tmp_path: Path) -> None:
    """Hub BLOOM checkpoints (e.g. bloom-560m) were saved from BloomModel: "h.0..." without "transformer."."""
    torch.manual_seed(0)
    base = BloomModel(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    base.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = Checkpoint(tmp_path)
    assert not any(k.startswith("transformer.") for k in ckpt.keys())
    family = family_for(AutoConfig.from_pretrained(tmp_path))
    span = family.make_span([family.load_block(ckpt, b, b) for b in range(2)], BlockRange(0, 2))
    head = family.load_head(ckpt)
    ids = torch.randint(0, VOCAB, (1, 5))
    expected = base(ids).last_hidden_state  # after ln_f
    torch.testing.assert_close(head.ln_f(span(head.embed(ids))), expected, atol=EXACT, rtol=0)


class RotaryInBlockFamily(LlamaFamily):
    """A block with a non-persistent buffer (rotary inv_freq), which checkpoints do not contain."""

    def build_block(self, local_index: int) -> nn.Module:
        layer = LlamaDecoderLayer(self.config, layer_idx=local_index)  # type: ignore[arg-type]
        layer.rotary = LlamaRotaryEmbedding(config=self.config)  # type: ignore[arg-type]
        return layer


def test_load_block_recreates_non_persistent_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    build("llama").save_pretrained(tmp_path, safe_serialization=True)
    family = RotaryInBlockFamily(AutoConfig.from_pretrained(tmp_path))
    block = family.load_block(Checkpoint(tmp_path), 1, 0)
    tensors = [*block.parameters(), *block.buffers()]
    assert not any(t.is_meta for t in tensors)
    expected = LlamaRotaryEmbedding(config=family.config).inv_freq  # type: ignore[arg-type]
    assert torch.equal(block.rotary.inv_freq, expected)
    assert not block.training
