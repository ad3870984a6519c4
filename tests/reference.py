"""Transformers as the reference for server outputs: the hidden states a span of blocks must produce."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


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


def greedy_references(model_path: str | Path, prompts: Sequence[list[int]], new_tokens: int) -> list[list[int]]:
    """Plain transformers' greedy continuation of each prompt on the same weights, `new_tokens` tokens with EOS
    kept out until then (as `min_new_tokens`): what the swarm's tokens are checked against."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
            out.append(gen[0, len(prompt) :].tolist())
    return out
