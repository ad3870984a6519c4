"""Hugging Face drop-in: `AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])` returns a
model whose `generate()` is transformers' own GenerationMixin (greedy, sampling, beam search, logits
processors, stopping criteria, streamers), while the transformer blocks run on the swarm.

Imported on first use of these classes (see __init__.py): it imports transformers. Embeddings, final norm and
LM head run locally; prompts and client-owned LoRA come from `DistributedPreTrainedModel` (pretrained.py).
During `generate` the KV cache lives on the servers: `RemoteCache` stands in for it, tells transformers how
many tokens the servers hold, turns beam-search reorders into `hypo_ids` for the next step, and rolls the servers
back when assisted generation (`generate(assistant_model=draft)`) crops rejected drafts. With prompt
tuning the servers' caches start with the prompt prefix: the first step of a session sends it (and the deep
prompts of each server's blocks), and transformers never sees it. `model(input_ids)` without a cache runs
`Forward` (and `Backward` through autograd) via `RemoteSequential`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import Cache, GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from client_sdk.blocking import SwarmClient
from client_sdk.pretrained import DistributedPreTrainedModel, load_distributed
from client_sdk.session import InferenceSession


class RemoteCache(Cache):
    """What transformers sees as the KV cache; the real one is on the servers of `session`."""

    def __init__(self, session: RemoteSession) -> None:
        super().__init__(layers=[])
        self.session = session
        self.pending_hypo_ids: torch.Tensor | None = None  # beam reorder to apply at the next step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    @property
    def is_linear(self) -> list[bool]:  # type: ignore[override]
        return [False]

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return True  # rolling the servers back costs nothing (see crop)

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted generation (`generate(assistant_model=...)`) drops the rejected drafts: `crop(-n)` forgets the
        last n tokens (transformers 5.x; a positive count is the legacy absolute length, refused as transformers
        does). The servers overwrite them at the next step; failover replays never rebuild them."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        if tokens_to_remove < 0:
            self.session.rollback(self.session.position + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to("cpu", torch.long)
        # Two reorders before one step compose: row i takes old row prev[idx[i]].
        self.pending_hypo_ids = idx if self.pending_hypo_ids is None else self.pending_hypo_ids[idx]


class RemoteSession:
    """`model.inference_session(max_length=N)`: one server-side KV cache kept across `generate` calls.

    The servers' streams open at the first step (when the batch size is known), with the model's adapter and
    client LoRA. `token_ids` holds every token the session has seen, so a later `generate(new_ids)` continues
    the conversation without resending it. Positions count the user's tokens: the prompt prefix the servers
    hold in front of them (prompt tuning) is invisible here.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.prefix = model.pre_seq_len  # prompt positions in front of the tokens in the servers' caches
        self.inference: InferenceSession | None = None
        self.token_ids: torch.Tensor | None = None  # [batch, tokens] seen so far (last one may be unprocessed)
        self.cache = RemoteCache(self)

    @property
    def position(self) -> int:
        return self.inference.position - self.prefix if self.inference is not None else 0

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden [batch, new, hidden], mask [batch, position + new] -> the last block's output [batch, new, hidden]."""
        client = self.model.client
        batch, new = hidden.shape[:2]
        if self.inference is None:
            coro = client.async_client.open_session(self.max_length + self.prefix, batch, self.model.session_tuning())
            self.inference = client.run(coro)
        hypo_ids, self.cache.pending_hypo_ids = self.cache.pending_hypo_ids, None
        prompts = None
        if self.prefix:
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, self.prefix), attention_mask], dim=1)
            if self.inference.position == 0:  # the prefill: the prompt prefix goes first
                shallow, deep = self.model.get_prompt(batch)
                hidden = torch.cat([shallow.to(hidden.dtype), hidden], dim=1)
                prompts = None if deep is None else deep.to(hidden.dtype)
        out = client.run(self.inference.step(hidden, attention_mask, hypo_ids, prompts))
        return out[:, -new:]

    def rollback(self, position: int) -> None:
        """Forget the user's tokens from `position` on (the prompt prefix stays)."""
        if self.inference is None:
            raise RuntimeError("nothing to roll back: the session has not started")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        self.inference.rollback(position + self.prefix)

    def close(self) -> None:
        if self.inference is not None:
            inference, self.inference = self.inference, None
            self.model.client.run(inference.close())


class DistributedModelForCausalLM(DistributedPreTrainedModel, GenerationMixin):
    """A causal LM whose blocks are remote. Build it with `AutoDistributedModelForCausalLM.from_pretrained`."""

    def __init__(self, config: PretrainedConfig, client: SwarmClient) -> None:
        super().__init__(config, client)
        self._session: RemoteSession | None = None
        path = client.async_client.local.path
        if (path / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(path)
        else:
            self.generation_config = GenerationConfig.from_model_config(config)

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[RemoteSession]:
        """Keep one server-side session across several `generate` calls (multi-turn chat)."""
        if self._session is not None:
            raise RuntimeError("an inference session is already active on this model")
        session = self._session = RemoteSession(self, max_length)
        try:
            yield session
        finally:
            self._session = None
            session.close()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [batch, seq]
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq]
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # [batch, seq, hidden]
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        embeds = self.embed_inputs(input_ids, inputs_embeds, attention_mask)
        if labels is not None and tuple(labels.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"labels must have shape {list(embeds.shape[:2])}, got {list(labels.shape)}")
        if isinstance(cache, RemoteCache):
            hidden = cache.session.step(embeds.detach().to(self.wire_dtype), attention_mask)
        else:  # no session: one Forward through the chain (differentiable through RemoteSequential)
            cache = None
            hidden = self.run_blocks(embeds, attention_mask)
        logits = self.head.logits(hidden.to(self.local_dtype))  # [batch, seq, vocab]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """transformers' generate, with the KV cache on the servers (a session per call unless one is open)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs input_ids")
        session = self._session
        if session is None:
            with self.inference_session(self._max_length(inputs, kwargs)):
                return self.generate(inputs, *args, **kwargs)
        mask = kwargs.pop("attention_mask", None)
        if session.token_ids is not None:  # continue the session: transformers sees the whole conversation
            if session.token_ids.shape[0] != inputs.shape[0]:
                raise ValueError("a session continues with the batch size it started with")
            if mask is not None:
                mask = torch.cat([torch.ones_like(session.token_ids), mask], dim=1)
            inputs = torch.cat([session.token_ids, inputs], dim=1)
        if mask is None:
            mask = torch.ones_like(inputs)
        out = super().generate(inputs, *args, attention_mask=mask, cache=session.cache, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if sequences.shape[0] == inputs.shape[0]:
            session.token_ids = sequences
        return out

    def _max_length(self, inputs: torch.Tensor, kwargs: dict[str, Any]) -> int:
        gen = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", gen.max_new_tokens)
        if new is not None:
            return int(inputs.shape[1] + new)
        return int(kwargs.get("max_length", gen.max_length or inputs.shape[1] + 20))


class AutoDistributedModelForCausalLM:
    """`from_pretrained(path_or_name, initial_peers=[...], tuning_mode=None, pre_seq_len=0, active_adapter=None,
    **client_options)` -> DistributedModelForCausalLM."""

    @staticmethod
    def from_pretrained(
        path_or_name: str | os.PathLike[str],
        initial_peers: str | Sequence[str],
        model_id: str | None = None,
        *,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        **client_options: Any,
    ) -> DistributedModelForCausalLM:
        return load_distributed(
            DistributedModelForCausalLM, path_or_name, initial_peers, model_id, tuning_mode, pre_seq_len,
            active_adapter, {}, client_options,
        )  # fmt: skip
