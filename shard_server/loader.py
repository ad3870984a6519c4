"""Load blocks [start, end) of a checkpoint and nothing else: each block is built on the meta device and
receives exactly the tensors under its checkpoint prefix, then is cast to the server's dtype and device.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, PretrainedConfig

from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint, resolve_model_path
from swarm.models import BlockSpan, ModelFamily, family_for

log = logging.getLogger(__name__)


class LoadError(ValueError):
    """The model exists but cannot serve the requested blocks (range, family, missing tensors)."""


@dataclass(frozen=True)
class ModelInfo:
    """What is known about the model before any weight is read."""

    path: Path
    config: PretrainedConfig
    family: ModelFamily


def inspect_model(model: str, blocks: BlockRange) -> ModelInfo:
    """Resolve the folder, read config.json and check the block range: cheap, so it runs before binding a port.

    Raises ModelNotFound (no such folder/cache entry) or LoadError (unsupported family, range too large).
    """
    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    try:
        family = family_for(config)
    except ValueError as e:
        raise LoadError(str(e)) from None
    if blocks.end > family.num_blocks:
        raise LoadError(f"blocks {blocks} are out of range: the model at {path} has {family.num_blocks} blocks")
    return ModelInfo(path, config, family)


def load_span(
    info: ModelInfo,
    blocks: BlockRange,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> BlockSpan:
    """Blocks [start, end) as a span on `device` in `dtype`, in eval mode with frozen weights."""
    ckpt = checkpoint if checkpoint is not None else Checkpoint(info.path)
    family = info.family
    layers = []
    bar = tqdm(range(blocks.start, blocks.end), desc="loading blocks", unit="block", file=sys.stderr,
               disable=not progress)  # fmt: skip
    for local, block in enumerate(bar):
        # Built on meta and given exactly this block's tensors (converted to the module's layout if needed).
        try:
            layer = family.load_block(ckpt, block, local)
        except (KeyError, RuntimeError) as e:
            raise LoadError(f"block {block}: {e}") from None
        # Cast per block so peak memory stays ~one block above the final size.
        layer.to(device=device, dtype=dtype)
        layer.requires_grad_(False)  # Backward needs grads w.r.t. inputs only
        layers.append(layer.eval())
    span = family.make_span(layers, blocks)
    # Moves the rotary buffers only; they stay float32 (as in transformers) for exact positions.
    span.to(device=device)
    return span.eval()


def sub_span(info: ModelInfo, full: BlockSpan, blocks: BlockRange) -> BlockSpan:
    """A span over some of `full`'s already-loaded layers (shared, not copied)."""
    held = full.blocks
    layers = list(full.layers[blocks.start - held.start : blocks.end - held.start])  # type: ignore[index]
    span = info.family.make_span(layers, blocks)
    device = next(full.parameters()).device
    return span.to(device=device).eval()
