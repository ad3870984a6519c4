"""Drafts for speculative decoding (speculative.py): what proposes the tokens the swarm then verifies in one trip.

A `Draft` proposes up to k tokens to follow the sequence so far; the verification loop never looks inside it.
- `ModelDraft`s run a local model with their own KV cache of the one sequence, written at explicit positions, so
  they roll back for free:
  - `BlocksDraft`: plain torch from `swarm.models`: the target's own first N blocks + its final norm and LM head
    (self-speculation, `draft_model="self:N"`: no second model needed), or every block of a smaller checkpoint
    with the same vocabulary (`draft_model="path/to/folder"`);
  - `TransformersDraft`: any local transformers causal LM with the same vocabulary (its DynamicCache is cropped).
- `PromptLookupDraft` (`draft_model="prompt-lookup"` or "lookup:N"): no model at all: it copies what followed an
  earlier occurrence of the sequence's last n-gram (transformers' prompt lookup decoding). Free to compute, and
  right often where the output repeats its input: summaries, code edits, quoting, extraction.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from swarm.blocks import BlockRange
from swarm.errors import InvalidRequest
from swarm.model_files import Checkpoint, resolve_model_path
from swarm.models import ClientHead, Span, load_family, run_span

if TYPE_CHECKING:
    from client_sdk.head import LocalModel

DEFAULT_DRAFT_TOKENS = 4  # k of the first trip of a model draft; adapted afterwards
MAX_DRAFT_TOKENS = 16  # a longer draft mostly computes tokens that get rejected
SELF_PREFIX = "self:"
PROMPT_LOOKUP = "prompt-lookup"
LOOKUP_PREFIX = "lookup:"
# transformers' defaults: `prompt_lookup_num_tokens=10` is what its docs and the method's author use (its
# PromptLookupCandidateGenerator's default), `max_matching_ngram_size` is 2 when not given.
LOOKUP_DRAFT_TOKENS = 10
LOOKUP_NGRAM = 2

DraftSpec = Any  # "self:N", "prompt-lookup", "lookup:N", a model folder, a transformers model, or a Draft

# pick(logits [1, vocab] of the draft's next token, j = its index among this trip's drafts) -> (the token, the
# distribution it was drawn from [vocab], or None when chosen greedily). The verification loop supplies it: it
# applies the same logits processing and sampling rule as the target's side.
Pick = Callable[[torch.Tensor, int], tuple[int, torch.Tensor | None]]


class Proposal(NamedTuple):
    tokens: list[int]
    # per token, the distribution it was drawn from ([vocab]); None: chosen without one (greedy drafting or a
    # lookup), i.e. a point mass on the token, which speculative sampling accepts with probability p(token)
    probs: list[torch.Tensor] | None = None


class Draft(abc.ABC):
    """Proposes tokens for one sequence at a time."""

    vocab_size: int | None = None  # the draft's vocabulary (None: it proposes tokens of the sequence itself)
    default_k: int = DEFAULT_DRAFT_TOKENS  # num_draft_tokens when the caller gives none
    adapts_k: bool = True  # k grows after a trip whose drafts were all kept, shrinks otherwise

    def begin(self, max_length: int) -> None:  # noqa: B027 (an optional hook: stateless drafts need none)
        """Start a new sequence of at most `max_length` tokens."""

    @abc.abstractmethod
    def propose(self, seq: list[int], n: int, pick: Pick, eos: Sequence[int]) -> Proposal:
        """At most `n` tokens to follow `seq` (prompt + tokens so far); fewer, even none, is fine."""

    def keep(self, length: int) -> None:  # noqa: B027
        """Only `seq[:length]` stays: the verification rejected what the draft proposed after it."""

    def end(self) -> None:  # noqa: B027
        """The sequence is done: free what `begin` allocated."""


class ModelDraft(Draft):
    """A local model with a KV cache of the sequence: drafts one token per forward pass."""

    vocab_size: int
    length = 0  # tokens of the sequence in the cache

    @abc.abstractmethod
    def logits(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Append `ids` [1, t] at slots [position, position + t) (whatever was there is forgotten: rollback is
        stepping at an earlier position) -> logits [1, t, vocab]."""

    def propose(self, seq: list[int], n: int, pick: Pick, eos: Sequence[int]) -> Proposal:
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        feed = seq[self.length :]  # what the cache lacks (the last token kept at least)
        for j in range(n):
            logits = self.logits(torch.tensor([feed]), self.length)[0, -1:]  # [1, vocab]
            self.length += len(feed)
            token, p = pick(logits, j)
            tokens.append(token)
            if p is not None:
                probs.append(p)
            feed = [token]  # the last draft enters the cache with the next trip, if kept
        return Proposal(tokens, probs if probs else None)

    def keep(self, length: int) -> None:
        self.length = min(self.length, length)


class BlocksDraft(ModelDraft):
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


class TransformersDraft(ModelDraft):
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


class PromptLookupDraft(Draft):
    """Prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`): find the sequence's last
    n-gram (n = `max_ngram`, then shorter) earlier in the sequence and propose the tokens that followed it.
    No model: a proposal costs a scan of the sequence, so a trip that finds nothing is a plain step."""

    default_k = LOOKUP_DRAFT_TOKENS
    adapts_k = False  # as transformers: the length of a match, not the draft's track record, bounds a proposal

    def __init__(self, max_ngram: int = LOOKUP_NGRAM) -> None:
        if max_ngram < 1:
            raise InvalidRequest(f"draft_model='lookup:N': N (the n-gram to match) must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, seq: list[int], n: int, pick: Pick, eos: Sequence[int]) -> Proposal:
        return Proposal(lookup_continuation(seq, n, self.max_ngram, eos))

    def __repr__(self) -> str:
        return f"PromptLookupDraft(max_ngram={self.max_ngram})"


def lookup_continuation(seq: Sequence[int], n: int, max_ngram: int, eos: Sequence[int] = ()) -> list[int]:
    """Up to `n` tokens that followed the earliest earlier occurrence of `seq`'s last n-gram, trying
    n = max_ngram (at most len(seq) - 1) down to 1; cut before an EOS (the target could accept the EOS and
    the rest). Matches transformers' PromptLookupCandidateGenerator.get_candidates token for token."""
    ids, length = list(seq), len(seq)
    if n <= 0:
        return []
    for size in range(min(max_ngram, length - 1), 0, -1):
        tail = ids[length - size :]
        # the earliest window equal to the tail with at least one token after it (the tail itself has none)
        for start in range(length - size):
            if ids[start : start + size] == tail:
                found = ids[start + size : min(start + size + n, length)]
                cut = next((i for i, t in enumerate(found) if t in eos), len(found))
                # transformers takes the first match with tokens after it, even if they start with an EOS
                # (then it proposes nothing rather than look further)
                return found[:cut]
    return []


def load_draft(spec: DraftSpec, local: LocalModel) -> Draft:
    """The draft for `local` (the target's local parts): a Draft as is; "self:N" the target's first N blocks
    + its head; "prompt-lookup"/"lookup:N" prompt lookup; a folder or hub name every block of that checkpoint;
    a transformers model wrapped."""
    if isinstance(spec, Draft):
        draft = spec
    elif isinstance(spec, str) and spec.startswith(SELF_PREFIX):
        draft = self_draft(local, spec.removeprefix(SELF_PREFIX))
    elif spec == PROMPT_LOOKUP:
        draft = PromptLookupDraft()
    elif isinstance(spec, str) and spec.startswith(LOOKUP_PREFIX):
        try:
            draft = PromptLookupDraft(int(spec.removeprefix(LOOKUP_PREFIX)))
        except ValueError:
            raise InvalidRequest(f"draft_model='lookup:N' needs the longest n-gram to match, got {spec!r}") from None
    elif isinstance(spec, str | os.PathLike):
        draft = checkpoint_draft(spec, local.dtype)
    elif isinstance(spec, nn.Module) and hasattr(spec, "config"):
        draft = TransformersDraft(spec)
    else:
        raise InvalidRequest(
            "draft_model must be 'self:N', 'prompt-lookup', 'lookup:N', a model folder, a transformers model or a "
            f"Draft, got {type(spec).__name__}"
        )
    if draft.vocab_size is not None and draft.vocab_size < local.config.vocab_size:
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

    async def get(self, spec: DraftSpec | None, k: int | None, adaptive: bool) -> Speculation | None:
        """The speculation for `spec` (None: no speculation); k None: the draft's default."""
        if spec is None:
            return None
        if not isinstance(spec, str | os.PathLike):
            draft = load_draft(spec, self.local)
        else:
            key = os.fspath(spec)
            found = self._by_spec.get(key)
            if found is None:  # reads a checkpoint: off the event loop
                found = self._by_spec[key] = await asyncio.to_thread(load_draft, spec, self.local)
            draft = found
        return draft, draft.default_k if k is None else k, adaptive and draft.adapts_k


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
