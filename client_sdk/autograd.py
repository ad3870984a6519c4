"""RemoteSequential: the chain of remote transformer blocks as a `torch.nn.Module`.

Its forward runs `Forward` on the swarm (throughput-weighted routes, failed hops re-run elsewhere) and,
when a gradient is needed, its backward runs `Backward` hop by hop in reverse through autograd, so
client-side parameters before it (soft prompts, embeddings, adapters) train as with local blocks.
The servers keep no activations: each Backward recomputes its hop's forward from the saved input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from client_sdk.blocking import SwarmClient
    from client_sdk.remote import SpanInputs


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        attention_mask: torch.Tensor | None,
        client: SwarmClient,
        start: int,
        end: int,
    ) -> torch.Tensor:
        remote = client.async_client.remote
        out, inputs = client.run(remote.forward(hidden.detach(), attention_mask, start, end))
        ctx.client = client
        ctx.inputs = inputs
        ctx.mask = attention_mask
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        client: SwarmClient = ctx.client
        inputs: SpanInputs = ctx.inputs
        grad = client.run(client.async_client.remote.backward(grad_output.contiguous(), inputs, ctx.mask))
        return grad.to(grad_output.dtype), None, None, None, None


class RemoteSequential(nn.Module):
    """Blocks [start, end) of the swarm's model; `module(hidden, attention_mask=None)` -> hidden.

    Slicing gives a sub-chain: `remote[2:6]` runs blocks 2..5 only.
    """

    def __init__(self, client: SwarmClient, start: int = 0, end: int | None = None) -> None:
        super().__init__()
        self.client = client
        self.start = start
        self.end = client.async_client.local.num_blocks if end is None else end
        if not 0 <= self.start < self.end <= client.async_client.local.num_blocks:
            raise ValueError(f"invalid block range {self.start}:{self.end}")

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteBlocks.apply(hidden, attention_mask, self.client, self.start, self.end)  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, item: int | slice) -> RemoteSequential:
        if isinstance(item, int):
            index = item + len(self) if item < 0 else item
            if not 0 <= index < len(self):
                raise IndexError(item)
            return RemoteSequential(self.client, self.start + index, self.start + index + 1)
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise ValueError("RemoteSequential slices must be contiguous")
        return RemoteSequential(self.client, self.start + start, self.start + stop)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end} of {self.client.async_client.model_id}"
