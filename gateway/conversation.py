"""Conversation: one server-side inference session kept across turns, and the token loop every API shares.

The servers hold the KV cache of `ids[:fed]`; the last generated token is not sent until the next turn
(there is nothing to compute with it before then), so `ids[fed:]` is what the next step feeds first. A turn
appends text's tokens (`append`), or says what the whole conversation is now (`rewrite`, for chat templates
that re-render the history): the session then continues from what the servers already hold, or starts over
(re-sending the conversation in one prefill) when the history changed or a step was interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import torch

from client_sdk import AsyncSwarmClient
from client_sdk.sampling import SamplingParams, make_generator, sample
from client_sdk.session import InferenceSession
from swarm.errors import InvalidRequest

log = logging.getLogger(__name__)


class LengthExceeded(InvalidRequest):
    """The session has no room for the request (chat.petals.dev's clients look for "Maximum length exceeded")."""


@dataclass(frozen=True)
class GenerationParams:
    """How one turn picks its tokens; validated on construction (bad values raise InvalidRequest)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers' rule over every token of the conversation (1 = off)
    presence_penalty: float = 0.0  # OpenAI's rules over the tokens generated in this turn (0 = off)
    frequency_penalty: float = 0.0
    min_new_tokens: int = 0  # EOS cannot be drawn before this many tokens
    seed: int | None = None
    stop_on_eos: bool = True
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise InvalidRequest(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2, got {getattr(self, name)}")

    @property
    def sampling(self) -> SamplingParams:
        if not self.do_sample:
            return SamplingParams()
        return SamplingParams(True, self.temperature, self.top_k, self.top_p)


def apply_penalties(
    logits: torch.Tensor,  # [1, vocab]
    params: GenerationParams,
    history: Sequence[int],  # every token of the conversation so far
    generated: Sequence[int],  # the tokens of this turn so far
) -> torch.Tensor:  # [1, vocab]
    """Repetition penalty as transformers applies it (divide positive logits, multiply negative ones, once per
    distinct token), then OpenAI's presence/frequency penalties (subtract per distinct token / per occurrence)."""
    if params.repetition_penalty != 1.0 and history:
        ids = torch.tensor([list(history)], dtype=torch.long)  # [1, n]
        score = logits.gather(1, ids)
        score = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
        logits = logits.scatter(1, ids, score)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype).unsqueeze(0)  # [1, vocab]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def session_limit(client: AsyncSwarmClient, limit: int) -> int:
    """The longest session worth asking for: `limit`, and no more than any live server of the model accepts
    (a route may take any of them)."""
    servers = client.view.records.servers()
    return min([limit, *(r.inference_max_length for r in servers)])


class Conversation:
    """A multi-turn session on one model: `append` or `rewrite` the conversation, then `generate` tokens."""

    def __init__(self, client: AsyncSwarmClient, max_length: int) -> None:
        if max_length < 1:
            raise InvalidRequest(f"max_length must be >= 1, got {max_length}")
        self.client = client
        self.max_length = max_length  # tokens the servers reserve KV cache for
        self.ids: list[int] = []  # the whole conversation: tokens the servers hold, then the pending ones
        self.fed = 0  # ids[:fed] are in the servers' caches
        self.session: InferenceSession | None = None
        self._restart = False  # the servers' cache no longer matches ids[:fed]: start a new session

    @property
    def room(self) -> int:
        """Tokens that still fit in the session."""
        return self.max_length - len(self.ids)

    async def open(self) -> None:
        """Open the servers' session now (otherwise at the first `generate`): errors show up at once."""
        if self.session is None:
            self.session = await self.client.open_session(self.max_length)
            self.fed = 0

    def append(self, ids: Sequence[int]) -> None:
        """Add tokens (a user turn, a prompt) after everything so far."""
        self._check_room(len(ids))
        self.ids.extend(int(i) for i in ids)

    def rewrite(self, ids: Sequence[int]) -> None:
        """The conversation is now `ids` (a chat template rendered again with the newest turn). Continues the
        session when `ids` starts with what the servers hold, else re-sends everything at the next step."""
        ids = [int(i) for i in ids]
        if len(ids) > self.max_length:
            raise LengthExceeded(
                f"Maximum length exceeded: the conversation has {len(ids)} tokens, the session holds {self.max_length}"
            )
        if ids[: self.fed] != self.ids[: self.fed]:
            log.debug("conversation history changed at re-rendering: re-sending %d tokens", len(ids))
            self._restart = True
        self.ids = ids

    def replace_pending(self, ids: Sequence[int]) -> None:
        """Replace the tokens not yet sent (the last generated one) with `ids`: chat.petals.dev's way to end a
        turn that stopped on an extra stop sequence with the regular stop sequence instead."""
        self.ids = self.ids[: self.fed] + [int(i) for i in ids]
        self._check_room(0)

    def _check_room(self, extra: int) -> None:
        if len(self.ids) + extra > self.max_length:
            raise LengthExceeded(
                f"Maximum length exceeded: {len(self.ids) + extra} tokens, the session holds {self.max_length}"
            )

    async def generate(self, params: GenerationParams) -> AsyncGenerator[int, None]:
        """Yield up to `params.max_new_tokens` new tokens (fewer at EOS). The caller may stop early at any
        `yield` (e.g. on a stop string): the conversation stays consistent. A cancelled step (client gone,
        Ctrl-C) makes the next turn start a fresh session with the whole conversation."""
        if len(self.ids) + params.max_new_tokens > self.max_length:
            raise LengthExceeded(
                f"Maximum length exceeded: {len(self.ids)} tokens in the session + {params.max_new_tokens} new "
                f"tokens is over its max_length of {self.max_length}"
            )
        if params.max_new_tokens == 0:
            return
        if not self.ids:
            raise InvalidRequest("nothing to continue: the conversation is empty (send some inputs first)")
        if self._restart or self.fed >= len(self.ids):
            # The servers' cache is stale, or holds everything already (a rewrite back to fewer tokens): the
            # next-token logits need a step, so the conversation goes again in one prefill.
            await self.close()
        self._restart = False
        await self.open()
        session = self.session
        if session is None:
            raise RuntimeError("inference session did not open")
        eos = set(params.eos_token_ids) if params.stop_on_eos else set()
        generator = make_generator(params.seed) if params.do_sample else None
        sampling = params.sampling
        generated: list[int] = []
        feed = self.ids[self.fed :]
        for _ in range(params.max_new_tokens):
            try:
                logits = await self.client.next_logits(session, torch.tensor([feed], dtype=torch.long))
            except BaseException:
                self._restart = True  # some servers may have taken the step and others not
                raise
            self.fed += len(feed)
            with torch.inference_mode():
                logits = apply_penalties(logits.float(), params, self.ids, generated)
                if eos and len(generated) < params.min_new_tokens:
                    logits[:, sorted(eos)] = float("-inf")
                token = int(sample(logits, sampling, generator)[0])
            self.ids.append(token)
            generated.append(token)
            yield token
            if token in eos:
                return
            feed = [token]

    async def close(self) -> None:
        """Free the servers' caches (never raises)."""
        session, self.session = self.session, None
        self.fed = 0
        if session is not None:
            await session.close()
