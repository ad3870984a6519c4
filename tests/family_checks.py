"""One exactness check for every model family: our plain-torch spans and head against transformers.

`check_family(config, tmp_path)` saves a random transformers model built from `config`, loads our family from
the saved folder exactly as a server and a client would (config.json -> `load_family`, blocks one by one into
two spans, the head), and compares logits with the transformers model in fp32 for every way a step can come:

- prefill, then decode token by token (KV written at explicit positions);
- rollback: a step at an earlier position overwrites the cache and continues exactly;
- left-padded batches with an attention mask (positions = cumsum(mask) - 1, as `generate` makes them);
- one `Span.forward` call carrying several sessions at once (different batch sizes, positions, lengths, one of
  them prefilling, one left-padded);
- beams (`kv.reorder`, then a step);
- Forward without a cache, and Backward: gradients w.r.t. each span's input (the first one is the input
  embeddings for Llama-like models) against transformers' gradients w.r.t. the same layers' inputs;
- bf16 spans: finite and close to the fp32 reference.

Weights are re-drawn at a larger scale than transformers' init (std 0.02 leaves every layer a near identity,
so a wrong rotary angle or mask would hide below 1e-5); norm weights and biases get random values too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint
from swarm.models import ClientHead, KVCache, ModelFamily, Segment, Span, load_family, run_span

LENGTH = 11  # tokens per test sequence (sliding-window tests use windows smaller than this)
PREFILL = 6
MAX_LENGTH = 16  # KV slots reserved per session
BF16_TOLERANCE = 5e-2  # relative (norm-wise) distance of bf16 logits from the fp32 reference
ALL_CHECKS = ("decode", "rollback", "padded", "segments", "beams", "forward", "backward", "bf16")


def check_family(
    config: PretrainedConfig,
    tmp_path: Path,
    atol: float = 1e-5,
    *,
    split: int | None = None,
    checks: Sequence[str] = ALL_CHECKS,
    seed: int = 0,
    grad_rtol: float = 1e-5,
    **opts: Any,
) -> None:
    """Assert that our family equals transformers on `config` (see the module docstring).

    split: first block of the second span (default: half of the blocks). checks: a subset of ALL_CHECKS.
    Unknown options raise (a typo must not silently skip a check).
    """
    if opts:
        raise TypeError(f"check_family: unknown options {sorted(opts)}")
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {ALL_CHECKS}")
    with one_thread():
        setup = Setup.build(config, Path(tmp_path), split, seed, atol)
        for name in checks:
            if name == "backward":
                check_backward(setup, grad_rtol)
            else:
                CHECKS[name](setup)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from intra-op threads, which spin and slow down a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Weights at a scale where every part of a layer matters: matrices ~ N(0, 1/fan_in), norms ~ 1 ± 0.2."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            elif p.dim() == 1:
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids exactly as transformers' `generate` derives them from an attention mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


@dataclass
class Setup:
    ref: PreTrainedModel
    family: ModelFamily
    spans: list[Span]
    head: ClientHead
    path: Path
    atol: float
    vocab: int
    generator: torch.Generator

    @classmethod
    def build(cls, config: PretrainedConfig, path: Path, split: int | None, seed: int, atol: float) -> Setup:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, generator)
        model.save_pretrained(path, safe_serialization=True)
        # loaded back with default settings: the attention and experts kernels users get
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        family = load_family(path)
        n = family.num_blocks
        k = n // 2 if split is None else split
        ckpt = Checkpoint(path)
        spans = []
        for blocks in (BlockRange(0, k), BlockRange(k, n)):
            ckpt.tensors_read.clear()
            layers = [family.load_block(ckpt, b) for b in range(blocks.start, blocks.end)]
            own = {
                key for b in range(blocks.start, blocks.end) for key in ckpt.keys_with_prefix(family.block_prefix(b))
            }
            assert set(ckpt.tensors_read) <= own, "load_block read tensors of other blocks"
            spans.append(family.make_span(layers, blocks))
        head = family.load_head(ckpt)
        return cls(ref, family, spans, head, path, atol, int(config.vocab_size), generator)

    def ids(self, batch: int, length: int = LENGTH) -> torch.Tensor:
        return torch.randint(0, self.vocab, (batch, length), generator=self.generator)

    def new_kvs(self, batch: int, dtype: torch.dtype = torch.float32) -> list[KVCache]:
        return [span.new_kv(batch, MAX_LENGTH, dtype, "cpu") for span in self.spans]

    def spans_in(self, dtype: torch.dtype) -> list[Span]:
        if dtype == torch.float32:
            return self.spans
        return [self.family.make_span([layer.to(dtype) for layer in _copies(s)], s.blocks) for s in self.spans]

    def ours(
        self,
        ids: torch.Tensor,  # [batch, tokens]
        kvs: Sequence[KVCache | None],
        input_pos: int = 0,
        mask: torch.Tensor | None = None,  # [batch, input_pos + tokens]
        spans: Sequence[Span] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:  # [batch, tokens, vocab]
        hidden = self.head.embed(ids).to(dtype)
        for span, kv in zip(spans or self.spans, kvs, strict=True):
            hidden = run_span(span, hidden, kv, input_pos, mask)
        return self.head.logits(hidden.float())

    def reference(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The full transformers model on whole sequences, no cache: [batch, seq, vocab]."""
        return self.ref(ids, use_cache=False, **self.mask_kwargs(mask)).logits

    def mask_kwargs(self, mask: torch.Tensor | None) -> dict[str, Any]:
        if mask is None:
            return {}
        kwargs: dict[str, Any] = {"attention_mask": mask.long()}
        if "position_ids" in inspect.signature(self.ref.forward).parameters:
            kwargs["position_ids"] = generate_positions(mask)
        return kwargs

    def close(self, ours: torch.Tensor, expected: torch.Tensor, what: str, mask: torch.Tensor | None = None) -> None:
        """Equal within atol; with a mask, at real (non-padding) positions only."""
        if mask is not None:
            ours, expected = ours[mask.bool()], expected[mask.bool()]
        diff = (ours - expected).abs().max().item()
        assert diff <= self.atol, (
            f"{self.family.config.model_type}: {what}: max |ours - transformers| = {diff:.2e} > {self.atol}"
        )


def _copies(span: Span) -> list[nn.Module]:
    return [copy.deepcopy(layer) for layer in span.layers]


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """bool [batch, length]: row 0 left-padded by 3 tokens, row 1 by 1, the others not at all."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :3] = False
    if batch > 1:
        mask[1, :1] = False
    return mask


@torch.inference_mode()
def check_decode(s: Setup) -> None:
    """Prefill, then one token at a time at explicit positions; a lost cache must show (negative control)."""
    ids = s.ids(2)
    expected = s.reference(ids)
    kvs = s.new_kvs(2)
    s.close(s.ours(ids[:, :PREFILL], kvs), expected[:, :PREFILL], "prefill")
    for pos in range(PREFILL, LENGTH):
        s.close(s.ours(ids[:, pos : pos + 1], kvs, pos), expected[:, pos : pos + 1], f"decode at {pos}")
    blank = s.new_kvs(2)[1]
    blank.k.zero_(), blank.v.zero_()
    lost = s.ours(ids[:, -1:], [kvs[0], blank], LENGTH - 1)  # the second span's history lost
    diff = (lost - expected[:, -1:]).abs().max().item()
    assert diff > 100 * s.atol, f"{s.family.config.model_type}: a step without its history still matched ({diff:.1e})"


@torch.inference_mode()
def check_rollback(s: Setup) -> None:
    """A step at an earlier position overwrites what was there; the continuation is exact."""
    ids = s.ids(2)
    kvs = s.new_kvs(2)
    s.ours(ids, kvs)  # the whole sequence, then go back 3 tokens with other tokens
    back = LENGTH - 3
    other = torch.cat([ids[:, :back], s.ids(2, 3)], dim=1)
    expected = s.reference(other)
    s.close(s.ours(other[:, back : back + 2], kvs, back), expected[:, back : back + 2], "2 tokens after rollback")
    s.close(s.ours(other[:, back + 2 :], kvs, back + 2), expected[:, back + 2 :], "decode after rollback")
    s.close(s.ours(other[:, -1:], kvs, LENGTH - 1), expected[:, -1:], "the last token again")


@torch.inference_mode()
def check_padded(s: Setup) -> None:
    """Left-padded batch with an attention mask: prefill, a 2-token chunk, then single tokens."""
    ids, mask = s.ids(3), padding_mask(3, LENGTH)
    expected = s.reference(ids, mask)
    kvs = s.new_kvs(3)
    cuts = [0, PREFILL, PREFILL + 2, *range(PREFILL + 3, LENGTH + 1)]
    for a, b in zip(cuts, cuts[1:]):
        ours = s.ours(ids[:, a:b], kvs, a, mask[:, :b])
        s.close(ours, expected[:, a:b], f"padded step [{a}:{b})", mask[:, a:b])


@dataclass
class Session:
    ids: torch.Tensor  # [batch, total tokens]
    pos: int  # tokens already in the cache
    mask: torch.Tensor | None = None  # [batch, total tokens]
    kvs: list[KVCache] | None = None


@torch.inference_mode()
def check_segments(s: Setup) -> None:
    """Several sessions in ONE Span.forward call per span, each attending to its own cache only."""
    sessions = [
        Session(s.ids(1, 8), 7),  # decoding one token at position 7
        Session(s.ids(2, 6), 4),  # a 2-token chunk for a batch of 2 at position 4
        Session(s.ids(1, 5), 0),  # prefilling 5 tokens
        Session(s.ids(2, 9), 8, padding_mask(2, 9)),  # a left-padded batch decoding at position 8
        Session(s.ids(1, 3), 2),  # another single token, at position 2
    ]
    for sess in sessions:
        batch = sess.ids.shape[0]
        sess.kvs = s.new_kvs(batch)
        if sess.pos:
            mask = None if sess.mask is None else sess.mask[:, : sess.pos]
            s.ours(sess.ids[:, : sess.pos], sess.kvs, 0, mask)
    segments = [
        [Segment(x.ids.shape[0], x.ids.shape[1] - x.pos, x.kvs[i], x.pos, x.mask) for x in sessions]  # type: ignore[index]
        for i in range(len(s.spans))
    ]
    x = torch.cat([s.head.embed(sess.ids[:, sess.pos :]).flatten(0, 1) for sess in sessions])  # [N, hidden]
    for span, segs in zip(s.spans, segments):
        x = span(x, segs)
    a = 0
    for i, sess in enumerate(sessions):
        batch, new = sess.ids.shape[0], sess.ids.shape[1] - sess.pos
        ours = s.head.logits(x[a : a + batch * new].view(batch, new, -1))
        a += batch * new
        expected = s.reference(sess.ids, sess.mask)[:, sess.pos :]
        mask = None if sess.mask is None else sess.mask[:, sess.pos :]
        s.close(ours, expected, f"session {i} of a batched step", mask)


@torch.inference_mode()
def check_beams(s: Setup) -> None:
    """kv.reorder picks rows for beam search; the next steps equal transformers on the reordered inputs."""
    ids = s.ids(3)
    kvs = s.new_kvs(3)
    s.ours(ids[:, :PREFILL], kvs)
    rows = torch.tensor([2, 0, 0])
    for kv in kvs:
        kv.reorder(rows, PREFILL)
    beams = torch.cat([ids[rows, :PREFILL], s.ids(3, 2)], dim=1)
    expected = s.reference(beams)
    s.close(s.ours(beams[:, PREFILL : PREFILL + 1], kvs, PREFILL), expected[:, PREFILL : PREFILL + 1], "beam step")
    s.close(s.ours(beams[:, PREFILL + 1 :], kvs, PREFILL + 1), expected[:, PREFILL + 1 :], "second beam step")
    # reorder with a mask: the mask's rows move with the cache's rows
    ids, mask = s.ids(3), padding_mask(3, LENGTH)
    kvs = s.new_kvs(3)
    s.ours(ids[:, :PREFILL], kvs, 0, mask[:, :PREFILL])
    rows = torch.tensor([1, 0, 0])
    for kv in kvs:
        kv.reorder(rows, PREFILL)
    beams, beam_mask = torch.cat([ids[rows, :PREFILL], s.ids(3, 1)], dim=1), mask[rows, : PREFILL + 1]
    expected = s.reference(beams, beam_mask)[:, -1:]
    s.close(s.ours(beams[:, -1:], kvs, PREFILL, beam_mask), expected, "padded beam step")


@torch.inference_mode()
def check_forward(s: Setup) -> None:
    """Without a cache (Forward): every segment attends to its own tokens only."""
    ids = s.ids(2)
    s.close(s.ours(ids, [None, None]), s.reference(ids), "forward")
    ids, mask = s.ids(3), padding_mask(3, LENGTH)
    s.close(s.ours(ids, [None, None], 0, mask), s.reference(ids, mask), "padded forward", mask)


def check_backward(s: Setup, rtol: float = 1e-5) -> None:
    """Gradients of a random projection of the logits w.r.t. each span's input, against transformers'
    gradients w.r.t. the inputs of the same decoder layers (layer 0's input = the input embeddings)."""
    for mask in (None, padding_mask(2, LENGTH)):
        ids = s.ids(2)
        weights = torch.randn(2, LENGTH, s.vocab, generator=s.generator)
        real = torch.ones(2, LENGTH, dtype=torch.bool) if mask is None else mask
        starts = [span.blocks.start for span in s.spans]

        captured: dict[int, torch.Tensor] = {}
        layers = _reference_layers(s.ref, s.family.num_blocks)
        hooks = [layers[b].register_forward_pre_hook(_capture(captured, b), with_kwargs=True) for b in starts]
        try:
            logits = s.ref(ids, use_cache=False, **s.mask_kwargs(mask)).logits
        finally:
            for hook in hooks:
                hook.remove()
        loss = (logits[real] * weights[real]).sum()
        expected = torch.autograd.grad(loss, [captured[b] for b in starts])

        hidden = s.head.embed(ids).detach().requires_grad_(True)
        inputs = []  # each span's input, all in one graph
        for span in s.spans:
            inputs.append(hidden)
            hidden = run_span(span, hidden, None, 0, mask)
        logits = s.head.logits(hidden)
        ours = torch.autograd.grad((logits[real] * weights[real]).sum(), inputs)
        for b, g, e in zip(starts, ours, expected):
            g, e = g[real], e[real]
            err = ((g - e).norm() / e.norm()).item()
            assert err < rtol, (
                f"{s.family.config.model_type}: grad w.r.t. block {b}'s input (mask={mask is not None}): {err:.1e}"
            )


def _reference_layers(model: nn.Module, n: int) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    assert lists, "cannot find the reference model's decoder layers"
    return lists[0]


def _capture(into: dict[int, torch.Tensor], block: int) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        into[block] = args[0] if args else kwargs["hidden_states"]

    return hook


@torch.inference_mode()
def check_bf16(s: Setup) -> None:
    """bf16 spans and caches (the head stays fp32): finite and close to the fp32 reference."""
    spans = s.spans_in(torch.bfloat16)
    ids, mask = s.ids(3), padding_mask(3, LENGTH)
    for m in (None, mask):
        kvs = s.new_kvs(3, torch.bfloat16)
        parts = [s.ours(ids[:, :PREFILL], kvs, 0, None if m is None else m[:, :PREFILL], spans, torch.bfloat16)]
        for pos in range(PREFILL, LENGTH):
            step_mask = None if m is None else m[:, : pos + 1]
            parts.append(s.ours(ids[:, pos : pos + 1], kvs, pos, step_mask, spans, torch.bfloat16))
        ours, expected = torch.cat(parts, dim=1), s.reference(ids, m)
        if m is not None:
            ours, expected = ours[m], expected[m]
        assert torch.isfinite(ours).all(), f"{s.family.config.model_type}: bf16 logits are not finite"
        err = ((ours - expected).norm() / expected.norm()).item()
        assert err < BF16_TOLERANCE, f"{s.family.config.model_type}: bf16 logits off by {err:.1e} (relative)"


CHECKS = {
    "decode": check_decode,
    "rollback": check_rollback,
    "padded": check_padded,
    "segments": check_segments,
    "beams": check_beams,
    "forward": check_forward,
    "bf16": check_bf16,
}
