"""Speculative decoding's pure parts: the acceptance rules and the history cut of a rollback. (The whole loop runs
against real servers in tests/e2e/test_speculative.py.)"""

from __future__ import annotations

import torch

from client_sdk.routing import Span
from client_sdk.span_stream import SpanStream, StepInput, consolidate
from client_sdk.speculative import accept_greedy, accept_sampled


def test_greedy_keeps_the_longest_agreeing_prefix_and_the_targets_next_token() -> None:
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 9]):
        logits[row, best] = 1.0  # the target's argmax after the pending token and after each draft
    assert accept_greedy([3, 5, 7], logits) == (3, 9)  # all kept, bonus token
    assert accept_greedy([3, 6, 7], logits) == (1, 5)  # second draft rejected: the target's token instead
    assert accept_greedy([0, 5, 7], logits) == (0, 3)
    assert accept_greedy([], logits[:1]) == (0, 3)  # no draft: plain greedy


def test_speculative_sampling_draws_from_the_target_distribution() -> None:
    """Drafts drawn from q, accepted by the rule: the first new token is distributed as p (and the second, after
    an accepted draft, as p of the next position), whatever q is."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.3])  # even proposes a token the target never picks
    trials = 20000
    first = torch.zeros(5)
    bonus = torch.zeros(5)
    for _ in range(trials):
        d = int(torch.multinomial(q, 1, generator=gen))
        m, token = accept_sampled([d], [q], p, gen)
        first[d if m == 1 else token] += 1
        if m == 1:
            bonus[token] += 1
    assert torch.allclose(first / trials, p[0], atol=0.02), first / trials
    assert torch.allclose(bonus / bonus.sum(), p[1], atol=0.03), bonus / bonus.sum()
    assert first[4] == 0


def test_same_draft_and_target_accepts_everything() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 8, generator=gen), dim=-1)
    drafts = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(2)]
    m, _ = accept_sampled(drafts, [p[0], p[1]], p, gen)
    assert m == 2


def test_rollback_cuts_the_history_replayed_on_failover() -> None:
    stream = SpanStream(Span("peer", "addr:1", 0, 2, None), "session")  # type: ignore[arg-type]
    hidden = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 3)  # token t has value t
    steps = [StepInput("a", hidden[:, :4], 0), StepInput("b", hidden[:, 4:8], 4), StepInput("c", hidden[:, 8:], 8)]
    for inp in steps:
        stream.confirm(inp)
    assert stream.position == 10
    stream.rollback(6)  # inside step b
    assert stream.position == 6
    assert [inp.tokens for inp in stream.history] == [4, 2]
    rebuilt = consolidate(stream.history)
    assert rebuilt is not None and rebuilt[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    stream.rollback(4)  # at a step boundary
    assert [inp.tokens for inp in stream.history] == [4]
    stream.rollback(9)  # beyond what it holds: nothing to cut
    assert stream.position == 4 and [inp.tokens for inp in stream.history] == [4]


def test_rollback_cuts_the_padding_mask_too() -> None:
    stream = SpanStream(Span("peer", "addr:1", 0, 2, None), "session")  # type: ignore[arg-type]
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    stream.confirm(StepInput("a", torch.zeros(1, 6, 3), 0, mask))
    stream.rollback(3)
    assert stream.history[0].mask is not None and stream.history[0].mask.tolist() == [[0, 1, 1]]
