"""RemoteSequential: the chain of remote transformer blocks as a `torch.nn.Module`.

Its forward runs `Forward` on the swarm (throughput-weighted routes, batches split into parts, failed hops
re-run elsewhere) and, when a gradient is needed, its backward runs `Backward` hop by hop in reverse through
autograd. Besides the input hidden states, the deep prompts and the client-owned LoRA weights sent along are
inputs of the autograd function, so they get their gradients from the servers' Backward and train exactly as
with local blocks. The servers keep no activations: each Backward recomputes its hop's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from client_sdk.tuning import LoraWeight, Tuning

if TYPE_CHECKING:
    from client_sdk.blocking import SwarmClient
    from client_sdk.remote import ForwardTrace


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one call: where it goes and what the LoRA tensors are."""

    client: SwarmClient
    start: int
    end: int
    lora: tuple[tuple[int, str, float], ...]  # (block, module, scaling) per (a, b) pair of tensors
    adapter: str

    def tuning(self, prompts: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> Tuning | None:
        if prompts is None and not self.lora and not self.adapter:
            return None
        weights = tuple(
            LoraWeight(block, module, tensors[2 * i].detach(), tensors[2 * i + 1].detach(), scaling)
            for i, (block, module, scaling) in enumerate(self.lora)
        )
        return Tuning(self.start, self.end, None if prompts is None else prompts.detach(), weights, self.adapter)


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [batch, seq, hidden]
        prompts: torch.Tensor | None,  # [blocks, batch or 1, pre_seq_len, hidden]
        attention_mask: torch.Tensor | None,  # [batch, seq]
        call: _Call,
        *lora: torch.Tensor,  # a0, b0, a1, b1, ...
    ) -> torch.Tensor:
        remote = call.client.async_client.remote
        tuning = call.tuning(prompts, lora)
        out, trace = call.client.run(remote.forward(hidden.detach(), attention_mask, call.start, call.end, tuning))
        ctx.call = call
        ctx.trace = trace
        ctx.prompt_dtype = None if prompts is None else prompts.dtype
        ctx.lora_dtypes = [t.dtype for t in lora]
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        call: _Call = ctx.call
        trace: ForwardTrace = ctx.trace
        grad, grads = call.client.run(call.client.async_client.remote.backward(grad_output.contiguous(), trace))
        grad_prompts = None
        if ctx.prompt_dtype is not None and grads is not None and grads.prompts is not None:
            grad_prompts = grads.prompts.to(ctx.prompt_dtype)
        grad_lora: list[torch.Tensor | None] = []
        for i in range(len(call.lora)):
            pair = grads.lora.get(i) if grads is not None else None
            if pair is None:  # cannot happen with a well-behaved swarm (replies are checked); be explicit
                raise RuntimeError(f"Backward returned no gradient for LoRA {call.lora[i][:2]}")
            grad_lora += [pair[0].to(ctx.lora_dtypes[2 * i]), pair[1].to(ctx.lora_dtypes[2 * i + 1])]
        return grad.to(grad_output.dtype), grad_prompts, None, None, *grad_lora


class RemoteSequential(nn.Module):
    """Blocks [start, end) of the swarm's model; `module(hidden, attention_mask=None, prompts=None, lora=())`
    -> hidden. `prompts` are deep prompts for these blocks ([blocks, batch or 1, pre_seq_len, hidden]), `lora`
    client-owned LoRA weights (only those of these blocks are sent); both receive gradients.

    Slicing gives a sub-chain: `remote[2:6]` runs blocks 2..5 only.
    """

    def __init__(self, client: SwarmClient, start: int = 0, end: int | None = None, adapter: str = "") -> None:
        super().__init__()
        self.client = client
        self.start = start
        self.end = client.async_client.local.num_blocks if end is None else end
        self.adapter = adapter  # a server-held LoRA adapter applied in every call ("" = none)
        if not 0 <= self.start < self.end <= client.async_client.local.num_blocks:
            raise ValueError(f"invalid block range {self.start}:{self.end}")

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        lora: Sequence[LoraWeight] = (),
    ) -> torch.Tensor:
        weights = [w for w in lora if self.start <= w.block < self.end]
        call = _Call(
            self.client, self.start, self.end, tuple((w.block, w.module, w.scaling) for w in weights), self.adapter
        )
        tensors = [t for w in weights for t in (w.a, w.b)]
        return _RemoteBlocks.apply(hidden, prompts, attention_mask, call, *tensors)  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, item: int | slice) -> RemoteSequential:
        if isinstance(item, int):
            index = item + len(self) if item < 0 else item
            if not 0 <= index < len(self):
                raise IndexError(item)
            return RemoteSequential(self.client, self.start + index, self.start + index + 1, self.adapter)
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise ValueError("RemoteSequential slices must be contiguous")
        return RemoteSequential(self.client, self.start + start, self.start + stop, self.adapter)

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end} of {self.client.async_client.model_id}"
