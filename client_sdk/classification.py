"""`AutoDistributedModelForSequenceClassification.from_pretrained(path, initial_peers=[...], num_labels=K,
tuning_mode=..., pre_seq_len=...)`: sequence classification with the blocks on the swarm.

The `score` head (nn.Linear(hidden, K, bias=False), trainable) runs on the client after the final norm, and
pooling and loss are transformers' (`LlamaForSequenceClassification`, i.e. `GenericForSequenceClassification`):
the logits of the rightmost token that is not `pad_token_id` (so right and left padding both work), and the
loss its config's `problem_type` names, decided on first use as transformers decides it (1 label: regression;
integer labels: single-label; else multi-label). Attention masks go to the servers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from client_sdk.blocking import SwarmClient
from client_sdk.pretrained import DistributedPreTrainedModel, load_distributed

log = logging.getLogger(__name__)


class DistributedModelForSequenceClassification(DistributedPreTrainedModel):
    """Build it with `AutoDistributedModelForSequenceClassification.from_pretrained`."""

    def __init__(self, config: PretrainedConfig, client: SwarmClient) -> None:
        super().__init__(config, client)
        self.num_labels = int(config.num_labels or 1)
        self.score = nn.Linear(self.family.hidden_size, self.num_labels, bias=False, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=float(getattr(config, "initializer_range", 0.02)))  # as transformers

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [batch, seq]
        attention_mask: torch.Tensor | None = None,  # [batch, seq]
        inputs_embeds: torch.Tensor | None = None,  # [batch, seq, hidden]
        labels: torch.Tensor | None = None,  # [batch] (classes or values) or [batch, num_labels]
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        embeds = self.embed_inputs(input_ids, inputs_embeds, attention_mask)
        if labels is not None and labels.shape[0] != embeds.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows for {embeds.shape[0]} inputs")
        hidden = self.run_blocks(embeds, attention_mask)  # [batch, seq, hidden], prompt prefix cut off
        batch = hidden.shape[0]
        pad = self.config.get_text_config().pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            if pad is not None:
                log.warning("padding tokens cannot be found in inputs_embeds: the last position is pooled")
            last = torch.full((batch,), hidden.shape[1] - 1, dtype=torch.long)
        else:  # the rightmost token that is not padding (right or left padding alike)
            non_pad = (input_ids != pad).to(torch.int32)
            last = (torch.arange(input_ids.shape[-1], dtype=torch.int32) * non_pad).argmax(-1)
        pooled_hidden = hidden[torch.arange(batch), last]  # [batch, hidden]
        # norm and score per row, so pooling first gives the logits of transformers' pooled rows
        logits = self.score(self.final_norm(pooled_hidden).to(self.score.weight.dtype))  # [batch, num_labels]
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


class AutoDistributedModelForSequenceClassification:
    """`from_pretrained(path_or_name, initial_peers=[...], num_labels=2, tuning_mode=None, pre_seq_len=0,
    active_adapter=None, problem_type=None, **client_options)` -> DistributedModelForSequenceClassification."""

    @staticmethod
    def from_pretrained(
        path_or_name: str | os.PathLike[str],
        initial_peers: str | Sequence[str],
        model_id: str | None = None,
        *,
        num_labels: int = 2,
        problem_type: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        **client_options: Any,
    ) -> DistributedModelForSequenceClassification:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        config_options: dict[str, Any] = {"num_labels": num_labels}
        if problem_type is not None:
            config_options["problem_type"] = problem_type
        return load_distributed(
            DistributedModelForSequenceClassification, path_or_name, initial_peers, model_id, tuning_mode,
            pre_seq_len, active_adapter, config_options, client_options,
        )  # fmt: skip
