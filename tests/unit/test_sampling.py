"""Sampling filters against transformers' logits warpers on random logits, plus seeding."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from client_sdk.sampling import (
    SamplingParams,
    apply_top_k,
    apply_top_p,
    filter_logits,
    logits_to_probs,
    make_generator,
    sample,
)


def random_logits(seed: int, batch: int = 4, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k", [1, 2, 10, 50, 999, 1000, 5000])
def test_top_k_matches_transformers(seed: int, top_k: int) -> None:
    logits = random_logits(seed)
    expected = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, top_k), expected)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_p", [0.01, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(seed: int, top_p: float) -> None:
    logits = random_logits(seed)
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, top_p), expected)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(apply_top_p(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = torch.isfinite(apply_top_p(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(apply_top_p(probs.log(), 1e-6))
    assert kept.tolist() == [[True, False, False, False]]  # always at least one token


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 20, 0.9), (1.3, 0, 0.8), (0.5, 5, 1.0)])
def test_combined_filters_match_transformers_order(seed: int, temperature: float, top_k: int, top_p: float) -> None:
    logits = random_logits(seed)
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, SamplingParams(True, temperature, top_k, top_p))
    assert torch.equal(ours.isinf(), expected.isinf())
    finite = ~ours.isinf()
    assert torch.allclose(ours[finite], expected[finite])


def test_probs_sum_to_one_and_respect_filters() -> None:
    logits = random_logits(0)
    probs = logits_to_probs(logits, SamplingParams(True, 0.8, 10, 0.9))
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert ((probs > 0).sum(-1) <= 10).all()


def test_greedy_is_argmax() -> None:
    logits = random_logits(1)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_valid() -> None:
    logits = random_logits(2)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=20, top_p=0.9)
    draws_a = [sample(logits, params, make_generator(123)) for _ in range(3)]
    draws_b = [sample(logits, params, make_generator(123)) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(draws_a, draws_b, strict=True))
    allowed = torch.isfinite(filter_logits(logits, params))
    gen = make_generator(7)
    for _ in range(50):
        tokens = sample(logits, params, gen)
        assert allowed.gather(1, tokens[:, None]).all()


def test_sampling_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    sample(random_logits(3), SamplingParams(do_sample=True), make_generator(5))
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_invalid_params_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(do_sample=True, **kwargs)
