"""Prompt lookup drafting (client_sdk/drafts.py) against its reference, transformers' PromptLookupCandidateGenerator:
the same proposals for random and repetitive sequences, n-gram sizes and EOS ids; and speculative sampling with
point-mass drafts (what a lookup proposes) still draws from the target's distribution."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from client_sdk.drafts import PromptLookupDraft, lookup_continuation
from client_sdk.speculative import accept_sampled
from swarm.errors import InvalidRequest


def reference(seq: list[int], n: int, ngram: int, eos: list[int]) -> list[int]:
    gen = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(eos) if eos else None,
        num_output_tokens=n,
        max_matching_ngram_size=ngram,
        max_length=len(seq) + n + 1,  # room for n candidates and the target's token (no cut by max_length)
    )
    candidates, _ = gen.get_candidates(torch.tensor([seq]))
    return list(candidates[0, len(seq) :].tolist())


def sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    out = [[5], [5, 5], [1, 2, 3], [1, 2, 3, 1, 2], [7, 8, 9, 7, 8, 9, 7], [4, 2, 4, 3, 4]]
    for length in (8, 20, 60):
        for vocab in (4, 12, 50):  # small vocabularies repeat n-grams often
            out.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
    return out


@pytest.mark.parametrize("ngram", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_same_proposals_as_transformers(ngram: int, n: int) -> None:
    found = 0
    for seq in sequences():
        for eos in ([], [0], [1, 3]):
            ours = lookup_continuation(seq, n, ngram, eos)
            assert ours == reference(seq, n, ngram, eos), (seq, n, ngram, eos)
            found += bool(ours)
    assert found > 10  # the cases do exercise matches


def test_draft_wraps_the_lookup() -> None:
    draft = PromptLookupDraft()  # n-grams of 2 then 1, as transformers by default
    assert draft.default_k == 10 and not draft.adapts_k and draft.vocab_size is None
    seq = [10, 11, 12, 13, 14, 10, 11]
    proposal = draft.propose(seq, 3, lambda logits, j: (0, None), [])
    assert proposal.tokens == [12, 13, 14] and proposal.probs is None
    assert draft.propose([1, 2, 3], 3, lambda logits, j: (0, None), []).tokens == []  # nothing repeats
    with pytest.raises(InvalidRequest, match="lookup:N"):
        PromptLookupDraft(0)


def test_point_mass_drafts_keep_the_target_distribution() -> None:
    """A lookup's draft d comes with no distribution (q = a point mass on d): the first token must still be
    distributed as p, whether d is likely, unlikely or impossible under p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    trials = 20000
    for d in (0, 2, 3):
        counts = torch.zeros(4)
        for _ in range(trials):
            m, token = accept_sampled([d], None, p, gen)
            counts[d if m == 1 else token] += 1
        assert torch.allclose(counts / trials, p[0], atol=0.015), (d, counts / trials)
