"""Speculative decoding: a small local draft proposes k tokens, the swarm checks them in ONE round trip.

A plain generate pays one trip through every server per token. Here the client drafts k tokens with a local
model (`Draft`), sends the pending token plus the k drafts as one multi-token `InferenceStep` at an explicit
position, computes the target's logits for all k + 1 positions with its local head, keeps the longest prefix
of drafts the target agrees with plus one token of the target's own (the correction, or a bonus when all k
matched), and rolls the session back past the first rejected draft (`InferenceSession.rollback`: no message;
the next step is written at the position after the last kept token and overwrites the rest in every server's
cache). Greedy output is the target's greedy output token for token, whatever the draft: a draft only decides
how many tokens a trip yields. With sampling, drafts are accepted by the rule of Leviathan et al. (2023), so
tokens follow the target's distribution (not the same draws as a plain seeded run).

Drafts keep their own KV cache of the one sequence, written at explicit positions, so they roll back for free:
- `BlocksDraft`: plain torch from `swarm.models`: the target's own first N blocks + its final norm and LM head
  (self-speculation, `draft_model="self:N"`: no second model needed), or every block of a smaller checkpoint
  with the same vocabulary (`draft_model="path/to/folder"`);
- `TransformersDraft`: any local transformers causal LM with the same vocabulary (its DynamicCache is cropped).
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from client_sdk.sampling import SamplingParams, logits_to_probs
from swarm.blocks import BlockRange
from swarm.errors import InvalidRequest
from swarm.model_files import Checkpoint, resolve_model_path
from swarm.models import ClientHead, Span, load_family, run_span

if TYPE_CHECKING:
    from client_sdk.head import LocalModel
    from client_sdk.session import InferenceSession

DEFAULT_DRAFT_TOKENS = 4  # k of the first trip; adapted afterwards
MAX_DRAFT_TOKENS = 16  # a longer draft mostly computes tokens that get rejected
SELF_PREFIX = "self:"

DraftSpec = Any  # "self:N", a model folder, a transformers model, or a Draft


class Draft(abc.ABC):
    """A local model that proposes tokens for one sequence at a time, with its own KV cache."""

    vocab_size: int

    @abc.abstractmethod
    def begin(self, max_length: int) -> None:
        """Start a new sequence of at most `max_length` tokens (an empty cache)."""

    @abc.abstractmethod
    def logits(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Append `ids` [1, t] at slots [position, position + t) (whatever was there is forgotten: rollback is
        stepping at an earlier position) -> logits [1, t, vocab]."""

    @abc.abstractmethod
    def end(self) -> None:
        """The sequence is done: free the cache."""


class BlocksDraft(Draft):
    """A span of blocks and a head from `swarm.models`, run locally (no transformers)."""

    def __init__(self, span: Span, head: ClientHead, vocab_size: int, dtype: torch.dtype, name: str) -> None:
        self.span, self.head, self.vocab_size, self.dtype, self.name = span, head, vocab_size, dtype, name
        self.kv: Any = None

    def begin(self, max_length: int) -> None:
        self.kv = self.span.new_kv(1, max_length, self.dtype, "cpu")

    def logits(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.head.embed(ids).to(self.dtype)  # [1, t, hidden]
            return self.head.logits(run_span(self.span, hidden, self.kv, position))  # [1, t, vocab]

    def end(self) -> None:
        self.kv = None

    def __repr__(self) -> str:
        return f"BlocksDraft({self.name}, {len(self.span.layers)} blocks)"


class TransformersDraft(Draft):
    """A local transformers causal LM (imported by the caller; this module never imports transformers)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.config: Any = getattr(model, "config")  # noqa: B009 (nn.Module types attributes as Tensor | Module)
        self.vocab_size = int(self.config.vocab_size)
        self.cache: Any = None

    def begin(self, max_length: int) -> None:
        from transformers import DynamicCache  # the caller already uses transformers: it passed a model of it

        self.cache = DynamicCache(config=self.config)

    def logits(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        extra = self.cache.get_seq_length() - position
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5.x: a negative count removes that many tokens from the end
        device = next(self.model.parameters()).device  # the draft may sit on a GPU
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(device), cache=self.cache, use_cache=True)
            return out.logits.cpu()  # type: ignore[no-any-return]

    def end(self) -> None:
        self.cache = None


def load_draft(spec: DraftSpec, local: LocalModel) -> Draft:
    """The draft for `local` (the target's local parts): a Draft as is; "self:N" the target's first N blocks
    + its head; a folder or hub name every block of that checkpoint; a transformers model wrapped."""
    if isinstance(spec, Draft):
        draft = spec
    elif isinstance(spec, str) and spec.startswith(SELF_PREFIX):
        draft = self_draft(local, spec.removeprefix(SELF_PREFIX))
    elif isinstance(spec, str | os.PathLike):
        draft = checkpoint_draft(spec, local.dtype)
    elif isinstance(spec, nn.Module) and hasattr(spec, "config"):
        draft = TransformersDraft(spec)
    else:
        raise InvalidRequest(
            f"draft_model must be 'self:N', a model folder, a transformers model or a Draft, got {type(spec).__name__}"
        )
    if draft.vocab_size < local.config.vocab_size:
        raise InvalidRequest(
            f"the draft's vocabulary has {draft.vocab_size} tokens, the model's {local.config.vocab_size}: "
            "a draft must use the model's tokenizer"
        )
    return draft


Speculation = tuple[Draft, int, bool]  # the draft, k of the first trip, adapt k


class Drafts:
    """A client's drafts, loaded once per spec string ("self:N", a folder) and kept for later calls."""

    def __init__(self, local: LocalModel) -> None:
        self.local = local
        self._by_spec: dict[str, Draft] = {}

    async def get(self, spec: DraftSpec | None, k: int, adaptive: bool) -> Speculation | None:
        """The speculation for `spec` (None: no speculation)."""
        if spec is None:
            return None
        if not isinstance(spec, str | os.PathLike):
            return load_draft(spec, self.local), k, adaptive
        key = os.fspath(spec)
        draft = self._by_spec.get(key)
        if draft is None:  # reads a checkpoint: off the event loop
            draft = self._by_spec[key] = await asyncio.to_thread(load_draft, spec, self.local)
        return draft, k, adaptive


def self_draft(local: LocalModel, blocks: str) -> BlocksDraft:
    """Self-speculation: the target's first `blocks` blocks read from its checkpoint, then its own final norm
    and LM head (the client's local head): a shallow copy of the model that tends to agree with it."""
    try:
        n = int(blocks)
    except ValueError:
        raise InvalidRequest(f"draft_model='self:N' needs a number of blocks, got 'self:{blocks}'") from None
    if not 1 <= n <= local.num_blocks:
        raise InvalidRequest(f"draft_model='self:{n}': N must be in 1..{local.num_blocks}, the model's blocks")
    family, checkpoint = local.family, Checkpoint(local.path)
    layers = [family.load_block(checkpoint, i).to(local.dtype) for i in range(n)]
    span = family.make_span(layers, BlockRange(0, n))
    return BlocksDraft(span, local.head, local.config.vocab_size, local.dtype, f"self:{n}")


def checkpoint_draft(path: str | os.PathLike[str], dtype: torch.dtype) -> BlocksDraft:
    """Every block and the head of another (smaller) checkpoint, in the target's local dtype."""
    folder = resolve_model_path(path)
    family, checkpoint = load_family(folder), Checkpoint(folder)
    layers = [family.load_block(checkpoint, i).to(dtype) for i in range(family.num_blocks)]
    span = family.make_span(layers, BlockRange(0, family.num_blocks))
    head = family.load_head(checkpoint, dtype)
    return BlocksDraft(span, head, family.config.vocab_size, dtype, folder.name)


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
    q: list[torch.Tensor],  # per draft, the draft's distribution [vocab] it was drawn from
    p: torch.Tensor,  # [k + 1, vocab]: the target's distributions (same temperature/top-k/top-p)
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, algorithm 1): keep draft i with probability
    min(1, p_i(d) / q_i(d)); at the first rejection draw from norm(max(p_i - q_i, 0)); after k kept drafts draw a
    bonus token from p_k. Every token is then distributed as the target alone would draw it."""
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator))
        if u * float(q[i][d]) < float(p[i, d]):  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
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
    token is sent with the next trip's drafts) and the draft's cache `seq[:draft_len]`. With `adaptive`, k grows
    by 2 after a trip whose drafts were all kept and shrinks by 1 otherwise (transformers' heuristic)."""
    check_speculation(ids, num_draft_tokens)
    vocab = local.config.vocab_size
    seq: list[int] = ids[0].tolist()
    prompt_len = len(seq)
    target_len = draft_len = 0
    k = num_draft_tokens

    def processed(logits: torch.Tensor, produced: int) -> torch.Tensor:  # [rows, vocab], row i = token produced+i
        if eos and produced < min_new_tokens:  # as transformers' MinNewTokensLengthLogitsProcessor
            logits = logits.clone()
            logits[: max(0, min_new_tokens - produced), eos] = float("-inf")
        return logits

    draft.begin(prompt_len + max_new_tokens)
    try:
        while (produced := len(seq) - prompt_len) < max_new_tokens:
            n = min(k, max_new_tokens - produced - 1)  # drafts this trip: never past max_new_tokens
            # 1. Draft n tokens locally, one at a time (the draft's cache gets all but the last).
            drafts: list[int] = []
            q: list[torch.Tensor] = []
            feed = seq[draft_len:]
            for j in range(n):
                logits = draft.logits(torch.tensor([feed]), draft_len)[0, -1:, :vocab]  # [1, vocab]
                draft_len += len(feed)
                logits = processed(logits, produced + j)
                if params.do_sample:
                    q.append(logits_to_probs(logits, params)[0])
                    drafts.append(int(torch.multinomial(q[-1], 1, generator=generator)))
                else:
                    drafts.append(int(logits.argmax()))
                feed = drafts[-1:]
            # 2. One trip: the tokens the servers lack (the prompt at first, then the last token) + the drafts.
            pending = seq[target_len:]
            with torch.inference_mode():
                hidden = local.head.embed(torch.tensor([pending + drafts])).to(wire_dtype)
            out = await session.step(hidden)  # [1, len(pending) + n, hidden]; failovers happen inside
            with torch.inference_mode():
                logits = local.head.logits(out[:, -(n + 1) :].to(local.dtype))[0]  # [n + 1, vocab]
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
            draft_len = min(draft_len, len(seq) + m)
            seq += new
            stats.steps += 1
            stats.drafted += n
            stats.accepted += m
            stats.tokens += len(new)
            stats.draft_lengths.append(n)
            if adaptive and n == k:  # a trip cut short by max_new_tokens says nothing about the draft
                k = min(k + 2, MAX_DRAFT_TOKENS) if m == n else max(1, k - 1)
            for t in new:
                yield t
            if eos and new[-1] in eos:
                break
    finally:
        draft.end()
