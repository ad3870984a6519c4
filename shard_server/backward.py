"""The gradients of one Backward request through a span: w.r.t. its input, its deep prompts (one leaf per block)
and the client's LoRA weights (leaves A, B per module); the server's weights are frozen.

Two ways, the same numbers:
- one graph: the span's forward with autograd, then one `autograd.grad` (fastest; activations of every block);
- block by block (Petals' way): the forward without a graph keeping each block's input, then from the last block
  back, each block recomputed with a graph and differentiated alone. Memory is then the inputs plus ONE block's
  graph, at the price of one more forward. The backend picks it when one graph would not fit its budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from swarm.models import Segment, Span
from swarm.models.lora import LoraKey, LoraWeights


def span_gradients(
    span: Span,
    x: torch.Tensor,  # [N, hidden]: the span's input (a leaf-able tensor, compute dtype)
    g: torch.Tensor,  # [N, hidden]: dLoss/d(output)
    seg: Segment,  # the request's one segment, its prompts/LoRA holding the leaves below
    prompts: Sequence[torch.Tensor] | None,  # leaves, one per block of the span
    client: Sequence[tuple[LoraKey, LoraWeights]],  # leaves a, b per module
    whole_graph: bool,
) -> list[torch.Tensor]:
    """[d input, *d prompts per block, dA, dB per client LoRA pair in order] (zeros where a leaf is unused)."""
    segments = [seg]
    with torch.no_grad():
        ctx = span.prologue(x, segments)
    tuning = span.tuning
    tuning.begin(x, segments)
    try:
        if whole_graph:
            return _one_graph(span, x, g, segments, ctx, prompts, client)
        return _block_by_block(span, x, g, segments, ctx, prompts, client)
    finally:
        tuning.end()


def _one_graph(
    span: Span,
    x: torch.Tensor,
    g: torch.Tensor,
    segments: list[Segment],
    ctx: Any,
    prompts: Sequence[torch.Tensor] | None,
    client: Sequence[tuple[LoraKey, LoraWeights]],
) -> list[torch.Tensor]:
    wrt = [x, *(prompts or []), *(t for _, w in client for t in (w.a, w.b))]
    with torch.enable_grad():
        h = x.requires_grad_(True)
        for i in range(len(span.layers)):
            h = span.tuning.layer(i, h, segments, ctx)
        grads = torch.autograd.grad(h, wrt, g, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for d, t in zip(grads, wrt, strict=True)]


def _block_by_block(
    span: Span,
    x: torch.Tensor,
    g: torch.Tensor,
    segments: list[Segment],
    ctx: Any,
    prompts: Sequence[torch.Tensor] | None,
    client: Sequence[tuple[LoraKey, LoraWeights]],
) -> list[torch.Tensor]:
    tuning = span.tuning
    n = len(span.layers)
    by_block: dict[int, list[int]] = {}  # global block -> indices into `client`
    for j, ((block, _), _) in enumerate(client):
        by_block.setdefault(block, []).append(j)
    d_prompts: list[torch.Tensor | None] = [None] * n
    d_lora: list[torch.Tensor | None] = [None] * (2 * len(client))
    inputs: list[torch.Tensor | None] = []  # each block's input [N, hidden]
    h = x
    with torch.no_grad():
        for i in range(n):
            inputs.append(h)
            h = tuning.layer(i, h, segments, ctx)
    for i in reversed(range(n)):
        xi = inputs[i]
        assert xi is not None
        inputs[i] = None  # freed as soon as its block's graph exists
        mine = by_block.get(span.blocks.start + i, [])
        with torch.enable_grad():
            xi = xi.detach().requires_grad_(True)
            out = tuning.layer(i, xi, segments, ctx)
            wrt = [xi, *([prompts[i]] if prompts is not None else [])]
            wrt += [t for j in mine for t in (client[j][1].a, client[j][1].b)]
            grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
        g = torch.zeros_like(xi) if grads[0] is None else grads[0]
        k = 1
        if prompts is not None:
            d_prompts[i], k = grads[1], 2
        for j in mine:
            d_lora[2 * j], d_lora[2 * j + 1] = grads[k], grads[k + 1]
            k += 2
    leaves = [*(prompts or []), *(t for _, w in client for t in (w.a, w.b))]
    found = [*(d_prompts if prompts is not None else []), *d_lora]
    return [g, *(torch.zeros_like(t) if d is None else d for d, t in zip(found, leaves, strict=True))]
