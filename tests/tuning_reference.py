"""Local references for fine-tuning through the swarm: a transformers model (optionally with a peft LoRA
injected) run with Petals' prompt-tuning semantics, and helpers to compare gradients.

Prompt tuning, locally: the shallow prompt [batch, pre_seq_len, hidden] is concatenated in front of the input
embeddings, the mask gets pre_seq_len ones in front, and before decoder layer i a forward pre-hook adds deep
prompt slice i to the hidden states at the first pre_seq_len positions. With a mask, positions are
`cumsum(mask) - 1` (as transformers' `generate` makes them, and as the servers compute them).
"""

from __future__ import annotations

from typing import Any

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def prompted_hidden(
    base: Any,  # a LlamaModel (`model.model` of a transformers Llama), maybe with LoRA layers
    input_ids: torch.Tensor,  # [batch, seq]
    mask: torch.Tensor | None = None,  # [batch, seq]
    shallow: torch.Tensor | None = None,  # [batch or 1, pre_seq_len, hidden]
    deep: torch.Tensor | None = None,  # [num_layers, batch or 1, pre_seq_len, hidden]
) -> torch.Tensor:  # the final norm's output [batch, seq, hidden], prefix cut off
    embeds = base.embed_tokens(input_ids)
    batch = input_ids.shape[0]
    n = 0
    if shallow is not None:
        n = shallow.shape[1]
        embeds = torch.cat([shallow.expand(batch, -1, -1).to(embeds.dtype), embeds], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    handles = []
    if deep is not None:
        for i, layer in enumerate(base.layers):

            def add_prompt(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                k = deep.shape[2]
                hidden = torch.cat([hidden[:, :k] + deep[i].to(hidden.dtype), hidden[:, k:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return out[:, n:]


def pooled_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """transformers' sequence-classification pooling: the rightmost token that is not padding."""
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    return (torch.arange(input_ids.shape[-1], dtype=torch.int32) * non_pad).argmax(-1)


def deep_layout(intermediate: torch.Tensor, num_layers: int, batch: int) -> torch.Tensor:
    """Petals' `get_prompt`, literally: intermediate_prompt_embeddings.weight [pre_seq_len, layers * hidden] ->
    [layers, batch, pre_seq_len, hidden]."""
    n = intermediate.shape[0]
    rows = intermediate.unsqueeze(0).expand(batch, -1, -1)  # the embedding of prefix tokens 0..n-1 per row
    return rows.reshape(batch, n, num_layers, -1).permute([2, 0, 1, 3])
