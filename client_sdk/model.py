"""Hugging Face drop-in: `AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])` returns a
model whose `generate()` is transformers' own GenerationMixin (greedy, sampling, beam search, logits
processors, stopping criteria, streamers), while the transformer blocks run on the swarm.

This is the only module of client_sdk that imports `transformers`, and it is imported on first use of these
classes (see __init__.py). Embeddings, final norm and LM head run locally (the SwarmClient's `LocalModel`).
During `generate` the KV cache lives on the servers: `RemoteCache` stands in for it, tells transformers how
many tokens the servers hold, and turns beam-search reorders into `hypo_ids` for the next step.
`model(input_ids)` without a cache runs `Forward` (and `Backward` through autograd) via `RemoteSequential`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import AutoConfig, Cache, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client_sdk.autograd import RemoteSequential
from client_sdk.blocking import SwarmClient
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
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to("cpu", torch.long)
        # Two reorders before one step compose: row i takes old row prev[idx[i]].
        self.pending_hypo_ids = idx if self.pending_hypo_ids is None else self.pending_hypo_ids[idx]


class RemoteSession:
    """`model.inference_session(max_length=N)`: one server-side KV cache kept across `generate` calls.

    The servers' streams open at the first step (when the batch size is known). `token_ids` holds every
    token the session has seen, so a later `generate(new_ids)` continues the conversation without resending it.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.inference: InferenceSession | None = None
        self.token_ids: torch.Tensor | None = None  # [batch, tokens] seen so far (last one may be unprocessed)
        self.cache = RemoteCache(self)

    @property
    def position(self) -> int:
        return self.inference.position if self.inference is not None else 0

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        client = self.model.client
        if self.inference is None:
            self.inference = client.run(client.async_client.open_session(self.max_length, hidden.shape[0]))
        hypo_ids, self.cache.pending_hypo_ids = self.cache.pending_hypo_ids, None
        return client.run(self.inference.step(hidden, attention_mask, hypo_ids))

    def close(self) -> None:
        if self.inference is not None:
            inference, self.inference = self.inference, None
            self.model.client.run(inference.close())


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose blocks are remote. Build it with `AutoDistributedModelForCausalLM.from_pretrained`."""

    config_class = PretrainedConfig
    main_input_name = "input_ids"
    base_model_prefix = "model"
    _supports_sdpa = True  # attention runs on the servers; any implementation the config names is fine here
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: PretrainedConfig, client: SwarmClient) -> None:
        super().__init__(config)
        self.client = client
        local = client.async_client.local
        self.head = local.head  # embeddings, final norm, LM head (frozen, local)
        self.layers = RemoteSequential(client)  # the remote blocks
        self._session: RemoteSession | None = None
        path = local.path
        if (path / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(path)
        else:
            self.generation_config = GenerationConfig.from_model_config(config)

    @property
    def local_dtype(self) -> torch.dtype:
        return self.client.async_client.local.dtype

    def get_input_embeddings(self) -> torch.nn.Module:
        # the family's head names it (embed_tokens, word_embeddings, ...); it holds exactly one embedding
        return next(m for m in self.head.modules() if isinstance(m, torch.nn.Embedding))

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
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.head.embed(input_ids)
        inputs_embeds = inputs_embeds.to(self.client.async_client.wire_dtype)  # ClientConfig.wire_dtype
        if isinstance(cache, RemoteCache):
            hidden = cache.session.step(inputs_embeds.detach(), attention_mask)
        else:  # no session: one Forward through the chain (differentiable through RemoteSequential)
            cache = None
            hidden = self.layers(inputs_embeds, attention_mask)
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
    """`from_pretrained(path_or_name, initial_peers=[...], **client_options)` -> DistributedModelForCausalLM."""

    @staticmethod
    def from_pretrained(
        path_or_name: str | os.PathLike[str],
        initial_peers: str | Sequence[str],
        model_id: str | None = None,
        **client_options: Any,
    ) -> DistributedModelForCausalLM:
        client = SwarmClient(initial_peers, path_or_name, model_id, **client_options)
        try:
            config = AutoConfig.from_pretrained(client.async_client.local.path)
            model = DistributedModelForCausalLM(config, client)
        except BaseException:
            client.close()
            raise
        return model.eval()
