"""Transformers as the reference for server outputs: the hidden states a span of blocks must produce."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def pre_norm_hidden(
    model: PreTrainedModel, embeds: torch.Tensor, mask: torch.Tensor | None = None, layers: int | None = None
) -> torch.Tensor:
    """What transformers feeds its final norm for input embeddings `embeds` [batch, seq, hidden] (or, with
    `layers`, the output of its first `layers` blocks), with an optional left-padding mask (positions
    cumsum(mask) - 1, as `generate` makes them). Llama-like models (`model.model.norm`)."""
    base = model.model
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    mask = mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    captured: list[torch.Tensor] = []
    if layers is None:
        hook = base.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        hook = base.layers[layers - 1].register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        with torch.no_grad():
            base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    finally:
        hook.remove()
    out = captured[0]
    return out[0] if isinstance(out, tuple) else out
