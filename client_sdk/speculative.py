"""Speculative decoding: a local draft proposes k tokens, the swarm checks them in ONE round trip.

A plain generate pays one trip through every server per token. Here the client drafts k tokens locally (a
`Draft`, drafts.py: a small model, the target's own first blocks, or a lookup in the text so far), sends the
pending token plus the k drafts as one multi-token `InferenceStep` at an explicit position, computes the target's
logits for all k + 1 positions with its local head, keeps the longest prefix of drafts the target agrees with
plus one token of the target's own (the correction, or a bonus when all k matched), and rolls the session back
past the first rejected draft (`InferenceSession.rollback`: no message; the next step is written at the position
after the last kept token and overwrites the rest in every server's cache). Greedy output is the target's greedy
output token for token, whatever the draft: a draft only decides how many tokens a trip yields. With sampling,
drafts are accepted by the rule of Leviathan et al. (2023), so tokens follow the target's distribution (not the
same draws as a plain seeded run); a draft proposed without a distribution (a lookup) counts as a point mass.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from client_sdk.drafts import MAX_DRAFT_TOKENS, Draft
from client_sdk.sampling import SamplingParams, logits_to_probs
from swarm.errors import InvalidRequest

if TYPE_CHECKING:
    from client_sdk.head import LocalModel
    from client_sdk.session import InferenceSession


@dataclass
class SpeculationStats:
    """What one speculative generate did (client.last_speculation): for logs, tests and benchmarks."""

    steps: int = 0  # round trips through the swarm (the first one carries the prompt)
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # of them, kept
    tokens: int = 0  # new tokens produced
    rollbacks: int = 0  # steps after which the session was rolled back
    draft_lengths: list[int] = field(default_factory=list)  # k of each trip

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def accept_greedy(drafts: list[int], logits: torch.Tensor) -> tuple[int, int]:
    """Target logits [k + 1, vocab] after the pending token and each draft -> (drafts kept m, the target's
    token after them). m is the longest prefix where each draft is the target's argmax."""
    target = logits.argmax(dim=-1).tolist()
    m = 0
    while m < len(drafts) and drafts[m] == target[m]:
        m += 1
    return m, int(target[m])


def accept_sampled(
    drafts: list[int],
    q: list[torch.Tensor] | None,  # per draft, the draft's distribution [vocab] it was drawn from (None: point masses)
    p: torch.Tensor,  # [k + 1, vocab]: the target's distributions (same temperature/top-k/top-p)
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, algorithm 1): keep draft i with probability
    min(1, p_i(d) / q_i(d)); at the first rejection draw from norm(max(p_i - q_i, 0)); after k kept drafts draw a
    bonus token from p_k. Every token is then distributed as the target alone would draw it. A draft chosen
    without a distribution (q a point mass on d) is kept with probability p_i(d), else the token is drawn from
    p_i without d: transformers' rule for prompt lookup (draw from p_i, keep the draft if the draw equals it)."""
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator))
        q_d = float(q[i][d]) if q is not None else 1.0
        if u * q_d < float(p[i, d]):  # u < p/q without dividing by a zero q
            continue
        if q is not None:
            residual = (p[i] - q[i]).clamp(min=0)
        else:
            residual = p[i].clone()
            residual[d] = 0.0
        dist = residual if float(residual.sum()) > 0 else p[i]  # p == q: nothing left, and p is the answer
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def check_speculation(ids: torch.Tensor, num_draft_tokens: int) -> None:
    """Refuse what speculative_tokens cannot do, before a session is opened for it."""
    if ids.shape[0] != 1:
        raise InvalidRequest(
            f"speculative decoding (draft_model) generates one sequence at a time, got a batch of {ids.shape[0]}: "
            "call generate once per prompt, or drop draft_model"
        )
    if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise InvalidRequest(f"num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS}, got {num_draft_tokens}")


async def speculative_tokens(
    session: InferenceSession,  # open for prompt_len + max_new_tokens tokens of 1 row; the caller closes it
    local: LocalModel,
    wire_dtype: torch.dtype,
    ids: torch.Tensor,  # [1, prompt_len] int64
    max_new_tokens: int,
    min_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    eos: list[int],
    draft: Draft,
    num_draft_tokens: int,
    adaptive: bool,
    stats: SpeculationStats,
) -> AsyncGenerator[int, None]:
    """The new tokens of one sequence, drafted locally and verified k + 1 at a time by the swarm.

    Bookkeeping: `seq` holds every token (prompt + new); the servers' caches hold `seq[:target_len]` (the last
    token is sent with the next trip's drafts); the draft is told what stays (`Draft.keep`). With `adaptive`, k
    grows by 2 after a trip whose drafts were all kept and shrinks by 1 otherwise (transformers' heuristic)."""
    check_speculation(ids, num_draft_tokens)
    seq: list[int] = ids[0].tolist()
    prompt_len = len(seq)
    target_len = 0
    k = num_draft_tokens

    def processed(logits: torch.Tensor, produced: int) -> torch.Tensor:  # [rows, vocab], row i = token produced+i
        if eos and produced < min_new_tokens:  # as transformers' MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            logits[: max(0, min_new_tokens - produced), eos] = float("-inf")
        return logits

    def pick(logits: torch.Tensor, j: int, produced: int) -> tuple[int, torch.Tensor | None]:
        """A model draft's j-th token of this trip from its logits [1, draft vocab], by the target's rules."""
        logits = processed(logits[:, : local.config.vocab_size], produced + j)  # [1, vocab]
        if not params.do_sample:
            return int(logits.argmax()), None
        probs = logits_to_probs(logits, params)[0]  # [vocab]
        return int(torch.multinomial(probs, 1, generator=generator)), probs

    draft.begin(prompt_len + max_new_tokens)
    draft.keep(0)  # nothing of an earlier sequence stays, whatever begin() did
    try:
        while (produced := len(seq) - prompt_len) < max_new_tokens:
            # 1. Draft at most n tokens locally: never past max_new_tokens.
            n = min(k, max_new_tokens - produced - 1)
            drafts, q = draft.propose(seq, n, functools.partial(pick, produced=produced), eos) if n else ([], None)
            drafts = drafts[:n]
            # 2. One trip: the tokens the servers lack (the prompt at first, then the last token) + the drafts.
            pending = seq[target_len:]
            with torch.inference_mode():
                hidden = local.head.embed(torch.tensor([pending + drafts])).to(wire_dtype)
            out = await session.step(hidden)  # [1, len(pending) + d, hidden]; failovers happen inside
            d = len(drafts)
            with torch.inference_mode():
                logits = local.head.logits(out[:, -(d + 1) :].to(local.dtype))[0]  # [d + 1, vocab]
                logits = processed(logits, produced)
                if params.do_sample:
                    m, token = accept_sampled(drafts, q, logits_to_probs(logits, params), generator)
                else:
                    m, token = accept_greedy(drafts, logits)
            new = [*drafts[:m], token]
            if eos and (stop := next((i for i, t in enumerate(new) if t in eos), None)) is not None:
                new = new[: stop + 1]
            # 3. Roll back past the first rejected draft: servers and draft keep seq + drafts[:m].
            target_len += len(pending) + m
            if session.position > target_len:
                session.rollback(target_len)
                stats.rollbacks += 1
            draft.keep(len(seq) + m)
            seq += new
            stats.steps += 1
            stats.drafted += d
            stats.accepted += m
            stats.tokens += len(new)
            stats.draft_lengths.append(d)
            if adaptive and d == k:  # a trip cut short by max_new_tokens says nothing about the draft
                k = min(k + 2, MAX_DRAFT_TOKENS) if m == d else max(1, k - 1)
            for t in new:
                yield t
            if eos and new[-1] in eos:
                break
    finally:
        draft.end()
