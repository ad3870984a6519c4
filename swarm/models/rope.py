"""Rotary position embeddings (RoPE) as transformers computes them, without importing it.

`read_rope(config_json)` normalizes both spellings of the scaling settings (transformers 5's `rope_parameters`,
older `rope_scaling` + `rope_theta`); `inverse_frequencies` reproduces transformers' `modeling_rope_utils` for
the types Llama-like checkpoints use (default, linear, dynamic, yarn, llama3); `Rotary` keeps float32 cos/sin
tables per device and dtype and hands out the rows of one step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.models.base import Segment
from swarm.models.config import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """What decides the rotary frequencies of one model."""

    rope_type: str
    theta: float
    head_dim: int
    max_position_embeddings: int
    params: dict[str, Any] = field(default_factory=dict, hash=False)  # factor, original_max_position_embeddings, ...

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


def read_rope(raw: Mapping[str, Any], head_dim: int, max_position_embeddings: int, default_theta: float) -> RopeSpec:
    """The rotary settings of a config.json object, with transformers' precedence and defaults."""
    # transformers: `rope_scaling` (older name) wins over `rope_parameters` when both are present
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    theta = params.get("rope_theta", raw.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial} is not supported by this family")
    if rope_type in ("llama3", "yarn"):
        # a top-level original_max_position_embeddings takes priority, as in transformers
        original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = original or max_position_embeddings
    needs = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in needs.get(rope_type, ()) if params.get(k) is None]
    if missing:
        raise ConfigError(f"RoPE type {rope_type!r} needs {', '.join(missing)} in rope_parameters")
    return RopeSpec(rope_type, float(theta), head_dim, max_position_embeddings, params)


def inverse_frequencies(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """float32 [head_dim / 2] inverse frequencies and the cos/sin scaling, as transformers computes them.

    `seq_len` only matters for "dynamic", whose base grows once a sequence passes max_position_embeddings.
    """
    dim, base = spec.head_dim, spec.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim / 2]
    kind = spec.rope_type
    if kind == "default":
        return 1.0 / (base**exponents), 1.0
    if kind == "linear":
        return 1.0 / (base**exponents) / spec.get("factor"), 1.0
    if kind == "dynamic":
        length = max(seq_len or 0, spec.max_position_embeddings)
        factor = spec.get("factor")
        base = base * ((factor * length / spec.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        return _llama3(spec, 1.0 / (base**exponents)), 1.0
    return _yarn(spec, base**exponents)


def _llama3(spec: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = spec.get("factor"), spec.get("low_freq_factor"), spec.get("high_freq_factor")
    old_context = spec.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: divided
    smooth = (old_context / wavelen - low) / (high - low)  # in between: interpolated
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: RopeSpec, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    dim, base = spec.head_dim, spec.theta
    original = spec.get("original_max_position_embeddings")
    factor = spec.get("factor") or spec.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = spec.get("attention_factor")
    if attention_factor is None:
        m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin of positions [0, length) in float32 (as transformers), cast once per dtype, grown on demand.

    A step's rows index these tables, so a hop costs a slice (one unpadded segment) or one gather, never a
    recomputation. "dynamic" RoPE changes its frequencies past max_position_embeddings: those segments are
    computed directly (see `rows`).
    """

    def __init__(self, spec: RopeSpec) -> None:
        self.spec = spec
        self.inv_freq, self.scaling = inverse_frequencies(spec)  # float32 [head_dim / 2]
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
        """float32 cos, signed sin [n, head_dim] of int64 positions [n]: transformers' arithmetic, step by step.

        The sin table's first half is negated (see `rotate`)."""
        freqs = positions[:, None].float() * inv_freq.to(positions.device)  # [n, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        sin[:, : freqs.shape[1]].neg_()
        return cos, sin

    def table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [>= length, head_dim] in `dtype`."""
        key = (device, dtype)
        tables = self._tables.get(key)
        if tables is None or tables[0].shape[0] < length:
            size = max(256, 1 << (length - 1).bit_length())  # powers of two: a few regrowths per process
            # Built outside inference mode even when a decode step asks first: a Backward later slices these
            # tables into its graph, and autograd refuses to save inference tensors.
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self.cos_sin(torch.arange(size, device=device), self.inv_freq, self.scaling)
                tables = (cos.to(dtype), sin.to(dtype))
            self._tables[key] = tables  # one assignment: readers in other threads see the old or the new pair
        return tables

    def rows(
        self, segments: Sequence[Segment], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [N, head_dim] of every row of a step, in row order."""
        cos_parts, sin_parts = [], []
        dynamic_limit = self.spec.max_position_embeddings if self.spec.rope_type == "dynamic" else None
        for seg in segments:
            if dynamic_limit is not None and seg.kv_length > dynamic_limit:
                pos = seg.positions(device).reshape(-1)
                # transformers recomputes the frequencies for seq_len = the highest position + 1 (per forward
                # call; it also keeps the largest one it has seen, model-wide, which a server shared by many
                # sessions must not). Here: per segment, from its own positions.
                inv_freq, scaling = inverse_frequencies(self.spec, int(pos.max()) + 1)
                c, s = self.cos_sin(pos, inv_freq, scaling)
                cos_parts.append(c.to(dtype))
                sin_parts.append(s.to(dtype))
                continue
            cos, sin = self.table(seg.kv_length, device, dtype)
            if seg.mask is None:  # positions input_pos.. for every batch row: a slice, repeated per row
                c, s = cos[seg.input_pos : seg.kv_length], sin[seg.input_pos : seg.kv_length]
                if seg.batch > 1:
                    c, s = c.repeat(seg.batch, 1), s.repeat(seg.batch, 1)
            else:
                pos = seg.positions(device).reshape(-1)  # [batch * tokens], all < kv_length
                c, s = cos.index_select(0, pos), sin.index_select(0, pos)
            cos_parts.append(c)
            sin_parts.append(s)
        if len(cos_parts) == 1:
            return cos_parts[0], sin_parts[0]
        return torch.cat(cos_parts), torch.cat(sin_parts)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim] rotated by cos, signed sin [N, 1, head_dim] from `Rotary`.

    transformers computes `x * cos + cat(-x2, x1) * sin` (x1, x2 the halves of x); with the sign moved into the
    table that is `x * cos + cat(x2, x1) * signed_sin`, the same products, in 3 kernels instead of 7."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)
