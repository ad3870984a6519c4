"""The Llama family adapter: spans with their own caches reproduce the full model exactly."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import family_for


def build(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return LlamaForCausalLM.from_pretrained(tmp_path).eval()


def load_span(tmp_path, family, blocks):
    ckpt = Checkpoint(tmp_path)
    layers = [family.load_block(ckpt, block, local) for local, block in enumerate(range(blocks.start, blocks.end))]
    assert not any(t.is_meta for layer in layers for t in [*layer.parameters(), *layer.buffers()])
    assert set(ckpt.tensors_read) == {
        k for b in range(blocks.start, blocks.end) for k in ckpt.keys_with_prefix(family.block_prefix(b))
    }
    return family.make_span(layers, blocks)


@torch.inference_mode()
def test_split_spans_with_caches_equal_full_model(tmp_path):
    full = build(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    family = family_for(full.config.__class__.from_pretrained(tmp_path))
    spans = [load_span(tmp_path, family, BlockRange(0, 2)), load_span(tmp_path, family, BlockRange(2, 5))]
    head = family.load_head(Checkpoint(tmp_path))
    caches = [s.new_cache() for s in spans]
    ids = torch.randint(0, 97, (1, 9))
    steps = [ids[:, :6], ids[:, 6:7], ids[:, 7:9]]  # prefill, one token, a 2-token chunk
    ours = []
    for chunk in steps:
        h = head.embed(chunk)
        for span, cache in zip(spans, caches):
            h = span(h, cache)
        ours.append(head.logits(h))
    reference = full(ids).logits
    torch.testing.assert_close(torch.cat(ours, dim=1), reference, atol=1e-5, rtol=1e-5)
    assert spans[1].cache_length(caches[1]) == 9
    spans[1].crop_cache(caches[1], 7)
    assert spans[1].cache_length(caches[1]) == 7
