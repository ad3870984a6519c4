"""What a fine-tuning client adds to the frozen remote blocks, and the gradients it gets back.

`Tuning` describes one Forward/Backward call (or one inference session) over blocks [start, end): deep prompts
for every block of the range, client-owned LoRA weights per (block, module), and the name of a server-held
adapter. `for_span(a, b)` cuts out what one server's hop [a, b) needs, as the wire message (each server gets
only its own blocks' slices). `TuningGrads` collects what Backward returns: the gradient of the deep prompts
(per block) and of every LoRA tensor. Everything is checked on the client before it is sent (wrong shapes
fail here with a clear message, not as a status from a server), and every reply is checked against what was
sent. No transformers and no peft here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.errors import InvalidRequest, PollenError
from swarm.pb import shard_pb2
from swarm.tensors import from_proto, to_proto

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoraWeight:
    """PEFT's lora_A / lora_B of one linear module of one block: y = base(x) + scaling * (x @ a.T) @ b.T."""

    block: int  # global block index
    module: str  # path inside the block as PEFT names it, e.g. "self_attn.q_proj"
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float


@dataclass(frozen=True)
class Tuning:
    """Additions to the frozen blocks [start, end) of one call; all optional.

    `prompts` [end - start, batch or 1, pre_seq_len, hidden]: slice i is added to the hidden states at the first
    pre_seq_len positions before block start + i runs (a batch of 1 is shared by every row).
    """

    start: int
    end: int
    prompts: torch.Tensor | None = None
    lora: tuple[LoraWeight, ...] = ()
    adapter: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid block range {self.start}:{self.end}")
        p = self.prompts
        if p is not None:
            if p.dtype not in FLOATS:
                raise InvalidRequest(f"prompts must be a float tensor, got {p.dtype}")
            if p.dim() != 4 or p.shape[0] != self.end - self.start or 0 in p.shape:
                raise InvalidRequest(
                    f"prompts must have shape [{self.end - self.start} blocks, batch or 1, pre_seq_len, hidden] "
                    f"for blocks {self.start}:{self.end}, got {list(p.shape)}"
                )
        for w in self.lora:
            if not self.start <= w.block < self.end:
                raise InvalidRequest(
                    f"LoRA weights for block {w.block} are outside the call's blocks {self.start}:{self.end}"
                )
            if w.a.dim() != 2 or w.b.dim() != 2 or w.a.shape[0] != w.b.shape[1] or w.a.shape[0] == 0:
                raise InvalidRequest(
                    f"LoRA {w.block}.{w.module}: a must be [rank, in] and b [out, rank], "
                    f"got {list(w.a.shape)} and {list(w.b.shape)}"
                )
            if w.a.dtype not in FLOATS or w.b.dtype not in FLOATS:
                raise InvalidRequest(f"LoRA {w.block}.{w.module}: weights must be float, got {w.a.dtype}/{w.b.dtype}")

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[2]

    @property
    def empty(self) -> bool:
        return self.prompts is None and not self.lora and not self.adapter

    def check_input(self, hidden: torch.Tensor) -> None:
        """The prompts fit `hidden` [batch, seq, hidden] (raises InvalidRequest before anything is sent)."""
        p = self.prompts
        if p is None:
            return
        if p.shape[1] not in (1, hidden.shape[0]) or p.shape[3] != hidden.shape[2]:
            raise InvalidRequest(
                f"prompts of shape {list(p.shape)} do not fit hidden states of shape {list(hidden.shape)}: "
                f"expected [{self.end - self.start}, 1 or {hidden.shape[0]}, pre_seq_len, {hidden.shape[2]}]"
            )
        if hidden.shape[1] < p.shape[2]:
            raise InvalidRequest(
                f"a sequence of {hidden.shape[1]} tokens is shorter than the {p.shape[2]} prompt positions; "
                "the prompt prefix must be part of the input"
            )

    def rows(self, a: int, b: int) -> Tuning:
        """The same tuning for rows [a, b) of the batch (per-row prompts are sliced; shared ones are kept)."""
        p = self.prompts
        if p is None or p.shape[1] == 1:
            return self
        return Tuning(self.start, self.end, p[:, a:b], self.lora, self.adapter)

    def lora_indices(self, a: int, b: int) -> list[int]:
        """Indices into `lora` of the weights of blocks [a, b), in order."""
        return [i for i, w in enumerate(self.lora) if a <= w.block < b]

    def for_span(self, a: int, b: int, dtype: torch.dtype | None = None, prompts: bool = True) -> shard_pb2.Tuning:
        """The wire message for one server's blocks [a, b) (prompts in `dtype`, the hidden states' dtype)."""
        if not self.start <= a < b <= self.end:
            raise ValueError(f"span {a}:{b} is outside the tuned blocks {self.start}:{self.end}")
        msg = shard_pb2.Tuning(adapter=self.adapter)
        if prompts and self.prompts is not None:
            p = self.prompts[a - self.start : b - self.start]
            msg.prompts.CopyFrom(to_proto(p if dtype is None else p.to(dtype)))
        for i in self.lora_indices(a, b):
            w = self.lora[i]
            a_msg, b_msg = to_proto(w.a), to_proto(w.b)
            msg.lora.append(shard_pb2.LoraTensors(block=w.block, module=w.module, a=a_msg, b=b_msg, scaling=w.scaling))
        return msg


@dataclass
class TuningGrads:
    """Gradients of one call's tuning: `prompts` like Tuning.prompts, `lora[i]` = (d a, d b) of Tuning.lora[i]."""

    prompts: torch.Tensor | None = None
    lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def zeros(cls, tuning: Tuning) -> TuningGrads:
        p = None if tuning.prompts is None else torch.zeros_like(tuning.prompts, dtype=torch.float32)
        return cls(p)

    def add_span(self, tuning: Tuning, a: int, b: int, span: TuningGrads, rows: slice | None = None) -> None:
        """Accumulate the gradients of hop [a, b) (`span.prompts` covers only those blocks) of rows `rows`."""
        if span.prompts is not None and self.prompts is not None:
            target = self.prompts[a - tuning.start : b - tuning.start]
            if rows is not None and target.shape[1] > 1:
                target = target[:, rows]
            target += span.prompts.to(target.dtype)
        for i, (ga, gb) in span.lora.items():
            old = self.lora.get(i)
            self.lora[i] = (ga.float(), gb.float()) if old is None else (old[0] + ga, old[1] + gb)


def decode_grads(reply: shard_pb2.BackwardResponse, tuning: Tuning, a: int, b: int, where: str) -> TuningGrads:
    """A Backward reply's tuning gradients for hop [a, b), checked against what was sent (raises PollenError
    naming `where` on anything inconsistent: a server's fault, so the call may be retried elsewhere)."""
    grads = TuningGrads()
    if tuning.prompts is not None:
        sent = tuning.prompts[a - tuning.start : b - tuning.start]
        expected = list(sent.shape)
        if not reply.HasField("grad_prompts"):
            raise _bad(where, "sent no grad_prompts for the prompts it got")
        grads.prompts = _tensor(reply.grad_prompts, "grad_prompts", where)
        if list(grads.prompts.shape) != expected:
            raise _bad(where, f"sent grad_prompts of shape {list(grads.prompts.shape)}, expected {expected}")
    indices = tuning.lora_indices(a, b)
    if len(reply.grad_lora) != len(indices):
        raise _bad(where, f"sent {len(reply.grad_lora)} LoRA gradients for {len(indices)} LoRA modules")
    for i, g in zip(indices, reply.grad_lora, strict=True):
        w = tuning.lora[i]
        if g.block != w.block or g.module != w.module:
            raise _bad(where, f"sent the LoRA gradient of {g.block}.{g.module} in place of {w.block}.{w.module}")
        ga, gb = _tensor(g.a, "grad a", where), _tensor(g.b, "grad b", where)
        if ga.shape != w.a.shape or gb.shape != w.b.shape:
            shapes = f"{list(ga.shape)}/{list(gb.shape)}"
            raise _bad(where, f"sent LoRA gradients of shapes {shapes} for {w.block}.{w.module}")
        grads.lora[i] = (ga, gb)
    return grads


def _tensor(msg: object, name: str, where: str) -> torch.Tensor:
    try:
        return from_proto(msg, name)  # type: ignore[arg-type]
    except PollenError as e:
        raise _bad(where, f"sent a corrupt tensor: {e}") from e


def _bad(where: str, what: str) -> PollenError:
    exc = PollenError(f"{where} {what}")
    exc.retryable = True  # the server broke the protocol: another one may do better
    return exc
