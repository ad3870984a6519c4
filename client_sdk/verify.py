"""Verified outputs: a random share of inference steps is recomputed on a second server and compared.

In a public swarm any server can return wrong hidden states (a bug, bad hardware, or on purpose). With
`verify_fraction` > 0 the session hands a span's step to `OutputVerifier.check` with that probability: the span's
whole input so far (its history, one tensor) goes to another server holding the same blocks through the
stateless Forward RPC, and the last outputs are compared within the tolerance of the wire dtype. If they
disagree a third server decides; the server in the minority is distrusted for the client's lifetime (never
routed through again, logged) and, if it was the session's own server, the session redoes its steps elsewhere
(replay). Only servers announcing the same precision are compared (an int8 server legitimately differs from a
float32 one). Checked steps cost one Forward over the session's tokens so far on one (rarely two) more servers.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from client_sdk.routing import Span
from client_sdk.transport import ChannelPool
from swarm.errors import PollenError
from swarm.pb import common_pb2, shard_pb2
from swarm.tensors import from_proto, to_proto

log = logging.getLogger(__name__)

# Largest |a - b| accepted, relative to the largest |value| of the output (+1 for outputs near zero). Two honest
# servers differ by rounding only: batch shapes and kernels change the order of sums (float32 ~1e-6 relative).
RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two servers' outputs for the same input are equal within the wire dtype's rounding."""
    if a.shape != b.shape:
        return False
    tol = RELATIVE_TOLERANCE.get(a.dtype, 5e-2)
    a32, b32 = a.float(), b.float()
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        return False
    scale = 1.0 + float(torch.maximum(a32.abs().max(), b32.abs().max()))
    return float((a32 - b32).abs().max()) <= tol * scale


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: `wrong` is the peer_id found in the minority ("" if none)."""

    checked: bool  # False: no other server to compare with, or it failed (the step is not judged)
    wrong: str = ""


class OutputVerifier:
    """Checks spans' outputs against other servers. `holders(span)` lists candidate records (live, not banned)."""

    def __init__(
        self,
        pool: ChannelPool,
        model_id: str,
        fraction: float,
        holders: Callable[[Span], list[Span]],
        distrust: Callable[[str, str], None],
        on_failure: Callable[[str], object],
        timeout_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.model_id = model_id
        self.fraction = fraction
        self.holders = holders  # other servers able to run exactly the span's blocks
        self.distrust = distrust  # peer_id, why: banned for the client's lifetime
        self.on_failure = on_failure  # a verifier that failed its call: avoided for a while
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self.checks = 0
        self.disagreements = 0

    def wants(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    async def check(
        self,
        span: Span,
        full_input: torch.Tensor,  # [batch, tokens so far, hidden]: the span's whole input (history consolidated)
        mask: torch.Tensor | None,  # [batch, tokens so far] or None
        output: torch.Tensor,  # [batch, n, hidden]: the span's output for the last n tokens
    ) -> Verdict:
        others = [s for s in self.holders(span) if s.peer_id != span.peer_id]
        self.rng.shuffle(others)
        n = output.shape[1]
        second, others = await self._first_answer(others, full_input, mask, n)
        if second is None:
            log.debug("no second server to verify %s", span)
            return Verdict(False)
        self.checks += 1
        peer2, y2 = second
        if agree(output, y2):
            return Verdict(True)
        self.disagreements += 1
        log.warning("outputs of %s and %s disagree on blocks %d:%d; asking a third server", span, peer2.address,
                    span.start, span.end)  # fmt: skip
        third, _ = await self._first_answer(others, full_input, mask, n)
        if third is None:
            log.warning("no third server to settle the disagreement on %s; the step stands", span)
            return Verdict(False)
        peer3, y3 = third
        why = f"its output for blocks {span.start}:{span.end} disagreed with two other servers"
        if agree(y2, y3) and not agree(output, y3):
            self.distrust(span.peer_id, f"{span.address}: {why} ({peer2.address}, {peer3.address})")
            return Verdict(True, span.peer_id)
        if agree(output, y3):
            self.distrust(peer2.peer_id, f"{peer2.address}: {why} ({span.address}, {peer3.address})")
            return Verdict(True, peer2.peer_id)
        log.warning("three servers disagree on blocks %d:%d (%s, %s, %s); the step stands", span.start, span.end,
                    span.address, peer2.address, peer3.address)  # fmt: skip
        return Verdict(False)

    async def _first_answer(
        self, candidates: list[Span], hidden: torch.Tensor, mask: torch.Tensor | None, n: int
    ) -> tuple[tuple[Span, torch.Tensor] | None, list[Span]]:
        """Forward on the candidates in turn until one answers: ((span, its last n outputs), the rest)."""
        while candidates:
            peer, candidates = candidates[0], candidates[1:]
            try:
                out = await self._forward(peer, hidden, mask)
            except PollenError as e:
                log.info("verifier %s failed (%s); trying another", peer, e)
                self.on_failure(peer.peer_id)
                continue
            return (peer, out[:, -n:]), candidates
        return None, []

    async def _forward(self, span: Span, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        request = shard_pb2.ForwardRequest(
            model_id=self.model_id,
            blocks=common_pb2.BlockRange(start=span.start, end=span.end),
            hidden=to_proto(hidden),
            request_id=uuid.uuid4().hex,
        )
        if mask is not None:
            request.attention_mask.CopyFrom(to_proto(mask))
        reply = await self.pool.call_once(span.address, request, self.timeout_s)
        out = from_proto(reply.hidden, f"verification from {span.address}")
        if out.shape != hidden.shape:
            raise PollenError(f"{span.address} returned shape {list(out.shape)} for {list(hidden.shape)}")
        return out
