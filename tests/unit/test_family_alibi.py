"""BLOOM and Falcon (every decoder variant, rotary and ALiBi) against transformers, plus what `check_family`'s
short sequences cannot show: ALiBi at positions where Falcon's bfloat16 rounding of `slope * position` bites,
non-power-of-two head counts, KV sizing per variant, config.json parsing, and no `transformers` at run time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, PretrainedConfig

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import ConfigError, family_from_dict, load_family, run_span
from swarm.models.falcon import FalconConfig as OurFalconConfig
from tests.family_checks import check_family, one_thread, randomize

SMALL: dict[str, Any] = dict(vocab_size=128, hidden_size=64)
FALCON: dict[str, Any] = dict(**SMALL, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
NEW_ARCH: dict[str, Any] = dict(new_decoder_architecture=True, num_kv_heads=2)

# name -> (config, KV heads stored per token)
VARIANTS: dict[str, tuple[PretrainedConfig, int]] = {
    "bloom": (BloomConfig(**SMALL, n_layer=4, n_head=4), 4),
    "bloom-post-ln-residual": (BloomConfig(**SMALL, n_layer=4, n_head=4,
                                           apply_residual_connection_post_layernorm=True), 4),
    # 6 heads: ALiBi slopes interleave a second geometric sequence when the head count is not a power of two
    "bloom-6-heads": (BloomConfig(vocab_size=128, hidden_size=48, n_layer=3, n_head=6), 6),
    "falcon-new-gqa": (FalconConfig(**FALCON, **NEW_ARCH), 2),
    "falcon-new-one-ln": (FalconConfig(**FALCON, **NEW_ARCH, num_ln_in_parallel_attn=1), 2),
    "falcon-new-linear-rope": (FalconConfig(**FALCON, **NEW_ARCH, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}), 2),
    "falcon-multi-query-parallel": (FalconConfig(**FALCON, multi_query=True, parallel_attn=True), 1),
    "falcon-mha-sequential": (FalconConfig(**FALCON, multi_query=False, parallel_attn=False), 4),
    "falcon-alibi-bias": (FalconConfig(**FALCON, alibi=True, multi_query=False, parallel_attn=False, bias=True), 4),
    "falcon-alibi-multi-query": (FalconConfig(**FALCON, alibi=True, multi_query=True, parallel_attn=True), 1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_transformers(name: str, tmp_path: Path) -> None:
    check_family(VARIANTS[name][0], tmp_path, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_heads_are_what_a_token_stores(name: str) -> None:
    config, stored = VARIANTS[name]
    family = family_from_dict(config.to_dict())
    head_dim = config.hidden_size // config.num_attention_heads
    assert family.kv_heads == stored
    assert family.kv_bytes_per_token(2) == 2 * stored * head_dim * 2
    with torch.device("meta"):
        layer = family.build_block()
    kv = family.make_span([layer], BlockRange(0, 1)).new_kv(1, 8, torch.float32, "cpu")
    assert kv.k.shape == (1, 1, stored, 8, head_dim)  # [layers, batch, kv_heads, max_length, head_dim]


@pytest.mark.parametrize(
    "config",
    [
        BloomConfig(**SMALL, n_layer=2, n_head=4),
        FalconConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4, alibi=True, multi_query=False),
    ],
    ids=["bloom", "falcon-alibi"],
)
@torch.inference_mode()
def test_alibi_far_from_the_start(config: PretrainedConfig, tmp_path: Path) -> None:
    """Positions past 256, left padding, then decode: Falcon rounds `slope * position` to bfloat16 there."""
    with one_thread():
        generator = torch.Generator().manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
        randomize(model, generator)
        model.save_pretrained(tmp_path)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        family = load_family(tmp_path)
        ckpt = Checkpoint(tmp_path)
        span = family.make_span([family.load_block(ckpt, b) for b in range(2)], BlockRange(0, 2))
        head = family.load_head(ckpt)

        length, prefill = 300, 297
        ids = torch.randint(0, 128, (2, length), generator=generator)
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, :5] = False
        expected = ref(ids, attention_mask=mask.long(), use_cache=False).logits
        kv = span.new_kv(2, length, torch.float32, "cpu")
        steps = [(0, prefill), *((p, p + 1) for p in range(prefill, length))]
        for a, b in steps:
            ours = head.logits(run_span(span, head.embed(ids[:, a:b]), kv, a, mask[:, :b]))
            real = mask[:, a:b]
            diff = (ours[real] - expected[:, a:b][real]).abs().max().item()
            assert diff <= 1e-5, f"step [{a}:{b}): max diff {diff:.2e}"


def test_alibi_slopes_match_transformers() -> None:
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from swarm.models.bloom import alibi_slopes

    for heads in (1, 4, 6, 8, 12, 16, 71, 112):
        assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_config_json_spellings() -> None:
    """Old checkpoints spell fields differently; what transformers' config classes accept, we accept."""
    bloom = family_from_dict({"model_type": "bloom", "n_embed": 96, "n_layer": 3, "n_head": 8})
    assert (bloom.config.hidden_size, bloom.num_blocks, bloom.config.num_attention_heads) == (96, 3, 8)
    assert bloom.config.head_dim == 12 and bloom.config.tie_word_embeddings
    assert bloom.config.vocab_size == BloomConfig().vocab_size  # transformers' default when left out

    # Falcon-7B as published: multi-query, parallel attention, rotary; RW-style spellings of the counts
    falcon = family_from_dict({"model_type": "falcon", "hidden_size": 4544, "n_head": 71, "n_layer": 32})
    assert falcon.kv_heads == 1 and falcon.num_blocks == 32 and falcon.config.head_dim == 64
    # transformers 4.x spelling of RoPE settings
    falcon = family_from_dict({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4,
                               "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}})  # fmt: skip
    rope = cast(OurFalconConfig, falcon.config)
    assert (rope.rope_theta, rope.rope_type, rope.rope_factor) == (500.0, "linear", 4.0)


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
        ({"new_decoder_architecture": True, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"activation": "swiglu"}, "swiglu"),
        ({"num_attention_heads": 5}, "divisible"),
    ],
)
def test_falcon_configs_we_cannot_serve_say_why(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        family_from_dict({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, **data})


def test_no_transformers_at_run_time(tmp_path: Path) -> None:
    """A server process loads and runs both families without importing transformers."""
    paths = {}
    for name in ("bloom", "falcon-alibi-bias", "falcon-new-gqa"):
        path = tmp_path / name
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(VARIANTS[name][0]).save_pretrained(path)
        paths[name] = str(path)
    code = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        import torch
        from swarm.blocks import BlockRange
        from swarm.model_files import Checkpoint
        from swarm.models import load_family, run_span
        for path in json.loads({json.dumps(json.dumps(paths))}).values():
            family = load_family(Path(path))
            ckpt = Checkpoint(Path(path))
            span = family.make_span([family.load_block(ckpt, b) for b in range(2)], BlockRange(0, 2))
            kv = span.new_kv(1, 4, torch.float32, "cpu")
            out = run_span(span, torch.randn(1, 3, family.hidden_size), kv, 0)
            assert torch.isfinite(out).all()
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
        """
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
