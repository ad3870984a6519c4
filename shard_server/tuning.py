"""Proto -> domain for fine-tuning (`Tuning` on Forward/Backward/InferenceOpen, `prompts` on a step): every check a
client's prompts and LoRA weights must pass before they reach the worker, each failure an InvalidRequest whose
message names the value and what was expected. The tensors stay on the CPU in the client's dtype; the backend
converts them to its device and dtype (and, for Backward, takes gradients w.r.t. the converted copies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from swarm.blocks import BlockRange
from swarm.errors import InvalidRequest
from swarm.models.lora import LoraKey, LoraSet, LoraWeights
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import dtype_name, from_proto

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MAX_LORA_RANK = 64


@dataclass(frozen=True)
class TuningLimits:
    """What this server accepts: the linear modules of its blocks, the largest client LoRA rank, its adapters."""

    modules: Mapping[str, tuple[int, int]]  # module path inside a block -> (in_features, out_features)
    hidden_size: int
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    adapters: Mapping[str, LoraSet] = field(default_factory=dict)  # held adapters, on the compute device


@dataclass(eq=False)
class RequestTuning:
    """A request's (or a session's) validated tuning; LoRA pairs in the order the client sent them."""

    prompts: torch.Tensor | None = None  # [span_blocks, batch | 1, pre_seq_len, hidden], as sent
    lora: list[tuple[LoraKey, LoraWeights]] = field(default_factory=list)  # client-owned, as sent (CPU)
    adapter: LoraSet | None = None  # a held adapter (already on the compute device)

    @property
    def client_elements(self) -> int:
        """Elements of client LoRA a session keeps for its whole life (counted in its cache reservation)."""
        return sum(w.a.numel() + w.b.numel() for _, w in self.lora)

    @property
    def empty(self) -> bool:
        return self.prompts is None and not self.lora and self.adapter is None


def decode_tuning(
    msg: shard_pb2.Tuning,
    blocks: BlockRange,
    limits: TuningLimits,
    batch: int | None,
    seq: int | None,
) -> RequestTuning | None:
    """The tuning of a Forward/Backward over `blocks` with input [batch, seq, hidden], or of a session (batch and
    seq None: prompts then come per step). None when the message carries nothing."""
    tuning = RequestTuning()
    if msg.adapter:
        tuning.adapter = limits.adapters.get(msg.adapter)
        if tuning.adapter is None:
            held = ", ".join(sorted(limits.adapters)) or "none"
            raise InvalidRequest(f"unknown adapter {msg.adapter!r}: this server holds adapters: {held}")
    if msg.HasField("prompts"):
        if batch is None or seq is None:
            raise InvalidRequest("tuning.prompts cannot be set when a session opens: send them with the step")
        tuning.prompts = decode_prompts(msg.prompts, blocks, limits.hidden_size, batch)
        pre = tuning.prompts.shape[2]
        if seq < pre:
            raise InvalidRequest(f"prompts cover pre_seq_len={pre} positions but the sequence has only {seq} tokens")
    seen: set[LoraKey] = set()
    for i, entry in enumerate(msg.lora):
        key, weights = decode_lora(entry, i, blocks, limits)
        if key in seen:
            raise InvalidRequest(f"lora[{i}]: block {key[0]} module {key[1]!r} is sent twice")
        seen.add(key)
        tuning.lora.append((key, weights))
    return None if tuning.empty else tuning


def decode_prompts(msg: common_pb2.Tensor, blocks: BlockRange, hidden_size: int, batch: int) -> torch.Tensor:
    """Deep prompts [span_blocks, batch | 1, pre_seq_len, hidden] for the request's blocks."""
    prompts = from_proto(msg, "prompts")
    if prompts.dtype not in FLOATS:
        raise InvalidRequest(f"prompts must be float32, float16 or bfloat16, got {dtype_name(prompts.dtype)}")
    n = len(blocks)
    shape = list(prompts.shape)
    if prompts.dim() != 4 or shape[0] != n or shape[1] not in (1, batch) or shape[2] < 1 or shape[3] != hidden_size:
        raise InvalidRequest(
            f"prompts must have shape [{n} (blocks {blocks}), {batch if batch == 1 else f'{batch} or 1'}, "
            f"pre_seq_len >= 1, {hidden_size}], "
            f"got {shape}"
        )
    return prompts


def check_step_prompts(prompts: torch.Tensor, position: int, tokens: int) -> None:
    """Step prompts must reach a slot the step writes (they add to slots < pre_seq_len only)."""
    pre = prompts.shape[2]
    if position >= pre:
        raise InvalidRequest(
            f"step prompts cover slots [0, {pre}) but the step writes slots [{position}, {position + tokens}): "
            f"send prompts only with the steps that write the prefix"
        )


def decode_lora(
    entry: shard_pb2.LoraTensors, i: int, blocks: BlockRange, limits: TuningLimits
) -> tuple[LoraKey, LoraWeights]:
    what = f"lora[{i}] (block {entry.block}, module {entry.module!r})"
    if not blocks.start <= entry.block < blocks.end:
        raise InvalidRequest(f"{what}: block {entry.block} is outside this request's blocks {blocks}")
    shape = limits.modules.get(entry.module)
    if shape is None:
        raise InvalidRequest(f"{what}: unknown module; the blocks' linear modules are {', '.join(limits.modules)}")
    in_features, out_features = shape
    a = from_proto(entry.a, f"{what}.a")
    b = from_proto(entry.b, f"{what}.b")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in FLOATS:
            raise InvalidRequest(f"{what}: {name} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != in_features
        or b.shape[0] != out_features
        or a.shape[0] != b.shape[1]
    ):
        raise InvalidRequest(
            f"{what}: a must be [rank, {in_features}] and b [{out_features}, rank], got a {list(a.shape)} and "
            f"b {list(b.shape)}"
        )
    rank = a.shape[0]
    if not 1 <= rank <= limits.max_lora_rank:
        raise InvalidRequest(
            f"{what}: rank {rank} is outside 1..{limits.max_lora_rank} (this server's --max-lora-rank)"
        )
    if not math.isfinite(entry.scaling):
        raise InvalidRequest(f"{what}: scaling must be finite, got {entry.scaling}")
    return (entry.block, entry.module), LoraWeights(a, b, float(entry.scaling))
