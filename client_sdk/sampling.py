"""Turn the last position's logits into the next token: greedy, temperature, top-k, top-p (nucleus).

gpt-fast style: small pure functions over `[batch, vocab]` tensors. The filters follow the semantics of
transformers' Temperature/TopK/TopP logits warpers (applied in that order) so a seeded Pollen run and a
transformers run draw from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; validated once per generate call, not per token."""

    do_sample: bool = False
    temperature: float = 1.0  # > 0; only used when sampling
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask everything below the k-th largest logit with -inf. [batch, vocab] -> [batch, vocab]"""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [batch, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (always >= 1 token).

    Sorting ascending and dropping the tokens whose cumulative mass stays <= 1 - top_p is the same rule
    as "keep the most likely tokens until their mass reaches top_p", and matches transformers bit for bit.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1] = False  # the most likely token always survives
    drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p. [batch, vocab] float -> [batch, vocab] with -inf for dropped."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[batch, vocab] logits -> [batch, vocab] probabilities after filtering (float32 for stable sums)."""
    return torch.softmax(filter_logits(logits.float(), params), dim=-1)


def sample(
    logits: torch.Tensor,  # [batch, vocab]
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [batch] int64
    """Pick one token per row: argmax when not sampling, else a draw from the filtered distribution."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator, so a seeded generate neither reads nor disturbs torch's global RNG."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # fresh non-deterministic seed
    else:
        gen.manual_seed(seed)
    return gen
