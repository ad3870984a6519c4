"""What every Hugging Face style distributed model shares: the local parts, the remote blocks, and what the
client trains through them (Petals' prompt tuning, and LoRA that the client owns).

`DistributedPreTrainedModel` holds the frozen local parts (embeddings, final norm, LM head: the SwarmClient's
`LocalModel`) and the remote blocks (`RemoteSequential`). With `tuning_mode="ptune"` it adds
`prompt_embeddings` (nn.Embedding(pre_seq_len, hidden)), prepended to the input embeddings; with "deep_ptune"
also `intermediate_prompt_embeddings` (nn.Embedding(pre_seq_len, num_hidden_layers * hidden)): slice i is added
to the hidden states at the prefix positions before block i (block 0 included), on the servers. The prefix is
cut off the outputs. `add_lora(peft.LoraConfig(...))` adds client-owned LoRA weights for every remote block
(client_sdk/lora.py); `save_lora(path)` writes them as a PEFT adapter folder. Everything else is frozen.

Imports transformers (for PreTrainedModel); the light SwarmClient path never imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from client_sdk.autograd import RemoteSequential
from client_sdk.blocking import SwarmClient
from client_sdk.tuning import LoraWeight, Tuning

if TYPE_CHECKING:
    from peft import LoraConfig

    from client_sdk.lora import ClientLora

TUNING_MODES = ("ptune", "deep_ptune")
M = TypeVar("M", bound="DistributedPreTrainedModel")


class DistributedPreTrainedModel(PreTrainedModel):
    """Local parts + remote blocks + trainable prompts / LoRA. Build subclasses with `from_pretrained`."""

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
        self.family = local.family
        self.head = local.head  # embeddings, final norm, LM head (frozen, local)
        self.layers = RemoteSequential(client, adapter=getattr(config, "active_adapter", None) or "")
        self.tuning_mode: str | None = getattr(config, "tuning_mode", None)
        self.pre_seq_len = int(getattr(config, "pre_seq_len", 0) or 0) if self.tuning_mode else 0
        self.requires_grad_(False)  # everything so far is frozen; the tuned parameters come below
        if self.tuning_mode:
            hidden, layers = self.family.hidden_size, self.family.num_blocks
            std = float(getattr(config, "initializer_range", 0.02))  # what transformers' init gives Petals' prompts
            # float32 whatever the local dtype, as Petals: prompts and their optimizer state need the precision
            self.prompt_embeddings = nn.Embedding(self.pre_seq_len, hidden, dtype=torch.float32)
            nn.init.normal_(self.prompt_embeddings.weight, std=std)
            if self.tuning_mode == "deep_ptune":
                deep = nn.Embedding(self.pre_seq_len, layers * hidden, dtype=torch.float32)
                self.intermediate_prompt_embeddings = deep
                nn.init.normal_(self.intermediate_prompt_embeddings.weight, std=std)
        self.lora: ClientLora | None = None

    # ---- local parts -------------------------------------------------------------------------------------------

    @property
    def local_dtype(self) -> torch.dtype:
        return self.client.async_client.local.dtype

    @property
    def wire_dtype(self) -> torch.dtype:
        return self.client.async_client.wire_dtype

    def get_input_embeddings(self) -> nn.Module:
        # the family's head names it (embed_tokens, word_embeddings, ...); it holds exactly one embedding
        return next(m for m in self.head.modules() if isinstance(m, nn.Embedding))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's last norm (before the LM head), run locally."""
        norm = getattr(self.head, "norm", None) or getattr(self.head, "ln_f", None)
        if norm is None:
            raise NotImplementedError(f"{type(self.head).__name__} has no final norm the client can find")
        return norm(hidden)  # type: ignore[no-any-return]

    def embed_inputs(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:  # [batch, seq, hidden]
        """Embeddings of the input, checked (bad input fails here, before anything is sent)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.is_floating_point() or 0 in input_ids.shape:
                raise ValueError(f"input_ids must be a non-empty integer [batch, seq] tensor, got {input_ids.dtype} "
                                 f"{list(input_ids.shape)}")  # fmt: skip
            vocab = self.family.config.vocab_size
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
                raise ValueError(f"input_ids must be in [0, {vocab}), got values up to {int(input_ids.max())}")
            inputs_embeds = self.head.embed(input_ids)
        assert inputs_embeds is not None
        hidden = self.family.hidden_size
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != hidden or not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a float [batch, seq, {hidden}] tensor, got "
                             f"{inputs_embeds.dtype} {list(inputs_embeds.shape)}")  # fmt: skip
        if attention_mask is not None and attention_mask.shape[0] != inputs_embeds.shape[0]:
            raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows for {inputs_embeds.shape[0]} inputs")
        return inputs_embeds

    # ---- prompts -----------------------------------------------------------------------------------------------

    def get_prompt(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shallow [batch, pre_seq_len, hidden], deep [num_blocks, 1, pre_seq_len, hidden] or None).

        The deep prompts are the same for every row, so they travel once with a batch dimension of 1.
        """
        if not self.pre_seq_len:
            raise RuntimeError("this model has no prompts (from_pretrained(..., tuning_mode='ptune', pre_seq_len=N))")
        shallow = self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
        # BLOOM normalises its input embeddings locally; the prompts are part of the input, as in Petals
        embed_norm = getattr(self.head, "word_embeddings_layernorm", None)
        if embed_norm is not None:
            shallow = embed_norm(shallow.to(self.local_dtype))
        deep = None
        if self.tuning_mode == "deep_ptune":
            n, layers, hidden = self.pre_seq_len, self.family.num_blocks, self.family.hidden_size
            # row j of the embedding holds block i's prompt at position j in columns i*hidden:(i+1)*hidden
            deep = self.intermediate_prompt_embeddings.weight.view(n, layers, hidden).permute(1, 0, 2).unsqueeze(1)
        return shallow, deep

    def run_blocks(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:  # [batch, seq, hidden] in the local dtype, the prompt prefix cut off
        """The input through every remote block (Forward; Backward through autograd), prompts included."""
        batch = inputs_embeds.shape[0]
        embeds, mask, prompts = inputs_embeds, attention_mask, None
        n = self.pre_seq_len
        if n:
            shallow, deep = self.get_prompt(batch)
            embeds = torch.cat([shallow.to(embeds.dtype), embeds], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            prompts = None if deep is None else deep.to(self.wire_dtype)
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"attention_mask must have shape {[batch, embeds.shape[1] - n]}, got "
                             f"{list(attention_mask.shape) if attention_mask is not None else None}")  # fmt: skip
        hidden = self.layers(embeds.to(self.wire_dtype), mask, prompts, self.lora_weights())
        return hidden[:, n:].to(self.local_dtype)

    # ---- client-owned LoRA -------------------------------------------------------------------------------------

    def add_lora(self, config: LoraConfig) -> ClientLora:
        """LoRA weights for every remote block as trainable parameters of this model (PEFT's init and naming)."""
        from client_sdk.lora import ClientLora

        if self.lora is not None:
            raise RuntimeError("this model already has client-owned LoRA weights")
        self.lora = ClientLora(config, self.family)
        return self.lora

    def save_lora(self, path: str | os.PathLike[str]) -> None:
        """Write the client-owned LoRA as a PEFT adapter folder (loads with peft and `shard-server --adapters`)."""
        if self.lora is None:
            raise RuntimeError("no client-owned LoRA: call add_lora(peft.LoraConfig(...)) first")
        self.lora.save(path, str(self.client.async_client.local.path))

    def lora_weights(self) -> Sequence[LoraWeight]:
        return () if self.lora is None else self.lora.weights()

    def session_tuning(self) -> Tuning | None:
        """What an inference session carries for its whole life: the adapter and the LoRA weights (detached)."""
        adapter = self.layers.adapter
        weights = tuple(
            LoraWeight(w.block, w.module, w.a.detach(), w.b.detach(), w.scaling) for w in self.lora_weights()
        )
        if not weights and not adapter:
            return None
        return Tuning(0, self.family.num_blocks, None, weights, adapter)


def load_distributed(
    cls: type[M],
    path_or_name: str | os.PathLike[str],
    initial_peers: str | Sequence[str],
    model_id: str | None,
    tuning_mode: str | None,
    pre_seq_len: int,
    active_adapter: str | None,
    config_options: dict[str, Any],
    client_options: dict[str, Any],
) -> M:
    """`from_pretrained` of every distributed model class: connect a SwarmClient, read the config, build."""
    if tuning_mode is not None and tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be None, 'ptune' or 'deep_ptune', got {tuning_mode!r}")
    if tuning_mode and pre_seq_len < 1:
        raise ValueError(f"tuning_mode={tuning_mode!r} needs pre_seq_len >= 1, got {pre_seq_len}")
    if pre_seq_len and not tuning_mode:
        raise ValueError("pre_seq_len needs tuning_mode='ptune' or 'deep_ptune'")
    if active_adapter:
        client_options = {**client_options, "active_adapter": active_adapter}
    client = SwarmClient(initial_peers, path_or_name, model_id, **client_options)
    try:
        config = AutoConfig.from_pretrained(client.async_client.local.path, **config_options)
        config.tuning_mode = tuning_mode
        config.pre_seq_len = pre_seq_len
        config.active_adapter = active_adapter
        model = cls(config, client)
    except BaseException:
        client.close()
        raise
    return model.eval()
