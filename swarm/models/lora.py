"""Fine-tuning inside a span's plain-torch blocks: LoRA (server adapters and client-owned weights) and deep prompts.

One step batch may mix segments with and without tuning. Each linear layer still runs ONE base matmul over all N
rows; a segment with LoRA then gets `scaling * (x @ A.T) @ B.T` added to its own rows (PEFT's
`base(x) + lora_B(lora_A(x)) * scaling`, dropout off). Deep prompts `[batch | 1, pre_seq_len, hidden]` per layer
are added to a segment's rows whose cache slot is below pre_seq_len, before that layer runs (Petals' deep prompt
tuning). Nothing here is trained on the server: gradients w.r.t. client LoRA weights and prompts are autograd's,
taken by the caller (shard_server/backend.py) w.r.t. the tensors it put in the segments.

Decode without tuning pays nothing for any of this: a span runs its plain layers unless a segment of the hop is
tuned (one check per hop, in `Span.forward`). The first tuned hop builds the *tuned twins* of the span's layers:
shallow copies sharing every weight, in which each linear module is wrapped by a `LoraLinear` that reads the
current hop's per-segment LoRA from the span's `SpanTuning`. LoRA targets modules by their path inside a block as
PEFT names them (`self_attn.q_proj`, `self_attention.query_key_value`, ...): every `nn.Linear` of a block
(bitsandbytes' quantized layers are `nn.Linear` subclasses, so LoRA sits on int8/nf4 blocks too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

LoraKey = tuple[int, str]  # (global block index, module path inside the block)


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA pair of one linear module: y += scaling * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in_features]  (PEFT's lora_A.weight)
    b: torch.Tensor  # [out_features, rank] (PEFT's lora_B.weight)
    scaling: float  # lora_alpha / rank (lora_alpha / sqrt(rank) with rsLoRA)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        # the order PEFT computes it in: lora_B(lora_A(x)) * scaling
        return (x @ self.a.T) @ self.b.T * self.scaling


@dataclass(frozen=True, eq=False)
class LoraSet:
    """All LoRA a segment runs with, by (block, module); several pairs on one module add up (e.g. a server adapter
    and the client's own LoRA in one session)."""

    modules: Mapping[LoraKey, tuple[LoraWeights, ...]]

    @staticmethod
    def of(pairs: Iterable[tuple[LoraKey, LoraWeights]]) -> LoraSet:
        modules: dict[LoraKey, tuple[LoraWeights, ...]] = {}
        for key, weights in pairs:
            modules[key] = (*modules.get(key, ()), weights)
        return LoraSet(modules)

    @staticmethod
    def combine(*sets: LoraSet | None) -> LoraSet | None:
        present = [s for s in sets if s is not None and s.modules]
        if len(present) <= 1:
            return present[0] if present else None
        return LoraSet.of((key, w) for s in present for key, ws in s.modules.items() for w in ws)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for ws in self.modules.values() for w in ws)

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraSet:
        return LoraSet(
            {
                key: tuple(LoraWeights(w.a.to(device, dtype), w.b.to(device, dtype), w.scaling) for w in ws)
                for key, ws in self.modules.items()
            }
        )


class TunedSegment(Protocol):
    """What tuning reads of a segment (swarm.models.base.Segment)."""

    batch: int
    tokens: int
    input_pos: int
    prompts: Sequence[torch.Tensor] | None  # per local layer: [batch | 1, pre_seq_len, hidden]
    lora: LoraSet | None

    @property
    def rows(self) -> int: ...


def linear_modules(block: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path inside the block: (in_features, out_features)} of every linear layer LoRA can target."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and name
    }


class LoraRouter:
    """The current hop's segments as row ranges with their LoRA: what every `LoraLinear` of a span reads."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, int, LoraSet | None]] = []  # (first row, end row, LoRA) per segment

    def set(self, segments: Sequence[TunedSegment]) -> None:
        self.parts = []
        a = 0
        for seg in segments:
            self.parts.append((a, a + seg.rows, seg.lora))
            a += seg.rows

    def apply(self, key: LoraKey, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` [N, out] = base(x) for x [N, in]; plus each segment's LoRA delta on its own rows."""
        pieces: list[torch.Tensor] = []
        changed = False
        for a, b, lora in self.parts:
            pairs = lora.modules.get(key) if lora is not None else None
            y = out[a:b]
            if pairs:
                xs = x[a:b]
                for w in pairs:
                    y = y + w.delta(xs)
                changed = True
            pieces.append(y)
        if not changed:
            return out
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class LoraLinear(nn.Module):
    """A block's linear layer in a tuned twin: the shared base layer, then the hop's LoRA for (block, path)."""

    def __init__(self, base: nn.Module, key: LoraKey, router: LoraRouter) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router.apply(self.key, x, self.base(x))


def tuned_twin(module: nn.Module, block: int, router: LoraRouter, prefix: str = "") -> nn.Module:
    """A shallow copy of `module` sharing all its weights, with every nn.Linear below it wrapped in a LoraLinear.

    Only the modules on the way to a linear layer are copied (their `_modules` dict replaced); parameters, buffers
    and every other attribute are the original's, so the twin costs a few small objects per layer.
    """
    twin = copy.copy(module)
    children: dict[str, nn.Module | None] = {}
    for name, child in module._modules.items():
        path = f"{prefix}{name}"
        if child is None:
            children[name] = None
        elif isinstance(child, nn.Linear):
            children[name] = LoraLinear(child, (block, path), router)
        elif any(isinstance(m, nn.Linear) for m in child.modules()):
            children[name] = tuned_twin(child, block, router, f"{path}.")
        else:
            children[name] = child
    twin.__dict__["_modules"] = children
    return twin


class PromptRows:
    """Where one hop's deep prompts go: the rows (of the flattened [N, hidden] input) whose cache slot is below
    pre_seq_len, and per layer the prompt values for those rows."""

    def __init__(self, segments: Sequence[TunedSegment], device: torch.device) -> None:
        rows: list[torch.Tensor] = []
        self.parts: list[tuple[Sequence[torch.Tensor], int, int, int]] = []  # (prompts, batch, first slot, count)
        a = 0
        for seg in segments:
            if seg.prompts is not None:
                pre = seg.prompts[0].shape[1]
                count = min(seg.tokens, pre - seg.input_pos)
                if count > 0:
                    # row of (batch b, token t) is a + b * tokens + t, for t < count
                    starts = a + torch.arange(seg.batch, device=device)[:, None] * seg.tokens  # [batch, 1]
                    rows.append((starts + torch.arange(count, device=device)).reshape(-1))  # [batch * count]
                    self.parts.append((seg.prompts, seg.batch, seg.input_pos, count))
            a += seg.rows
        self.index = torch.cat(rows) if len(rows) > 1 else rows[0] if rows else None  # int64 [R]

    def add(self, layer: int, x: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, hidden]
        if self.index is None:
            return x
        values = [
            prompts[layer][:, first : first + count].expand(batch, count, -1).reshape(batch * count, -1)
            for prompts, batch, first, count in self.parts
        ]  # [R, hidden]
        return x.index_add(0, self.index, values[0] if len(values) == 1 else torch.cat(values))


class SpanTuning:
    """A span's tuned path: its layers' tuned twins (built on first use) and the state of the hop being run.

    Used by one thread at a time (the server's worker): `begin` sets the hop's segments, then `layer(i, ...)` runs
    local layer i with the prompts and LoRA of every segment, possibly several times (Backward recomputes).
    """

    def __init__(self, layers: Sequence[nn.Module], first_block: int) -> None:
        self.layers = layers
        self.first_block = first_block
        self.router = LoraRouter()
        self._twins: list[nn.Module] | None = None
        self._run: Sequence[nn.Module] = layers
        self._prompts: PromptRows | None = None

    @property
    def twins(self) -> list[nn.Module]:
        if self._twins is None:
            self._twins = [tuned_twin(layer, self.first_block + i, self.router) for i, layer in enumerate(self.layers)]
        return self._twins

    def begin(self, x: torch.Tensor, segments: Sequence[TunedSegment]) -> None:
        self.router.set(segments)
        self._run = self.twins if any(seg.lora is not None for seg in segments) else self.layers
        with_prompts = any(seg.prompts is not None for seg in segments)
        self._prompts = PromptRows(segments, x.device) if with_prompts else None

    def layer(self, i: int, x: torch.Tensor, segments: Sequence[Any], ctx: Any) -> torch.Tensor:
        if self._prompts is not None:
            x = self._prompts.add(i, x)
        return self._run[i](x, segments, ctx, i)

    def end(self) -> None:
        """Drop the hop's references (its LoRA tensors and prompts may be large and belong to one request)."""
        self.router.parts = []
        self._prompts = None
        self._run = self.layers
