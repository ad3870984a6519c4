"""Load blocks [start, end) of a checkpoint and nothing else: each block is built on the meta device and
receives exactly the tensors under its checkpoint prefix, then (optionally) has its linear layers quantized and
is cast to the server's dtype and device, before the next block is read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shard_server.quant import DEFAULT_INT8_THRESHOLD, QuantUnavailable, check_quant_support, quantize_block
from swarm.blocks import BlockRange
from swarm.model_files import Checkpoint, resolve_model_path
from swarm.models import ConfigError, ModelConfig, ModelFamily, Span, load_family

log = logging.getLogger(__name__)


class LoadError(ValueError):
    """The model exists but cannot serve the requested blocks (range, family, missing tensors)."""


@dataclass(frozen=True)
class ModelInfo:
    """What is known about the model before any weight is read."""

    path: Path
    family: ModelFamily

    @property
    def config(self) -> ModelConfig:
        return self.family.config


def inspect_model(model: str, blocks: BlockRange) -> ModelInfo:
    """Resolve the folder, read config.json and check the block range: cheap, so it runs before binding a port.

    Raises ModelNotFound (no such folder/cache entry) or LoadError (unsupported family, range too large).
    """
    path = resolve_model_path(model)
    try:
        family = load_family(path)  # our own typed config: no transformers in the server process
    except ConfigError as e:
        raise LoadError(str(e)) from None
    if blocks.end > family.num_blocks:
        raise LoadError(f"blocks {blocks} are out of range: the model at {path} has {family.num_blocks} blocks")
    return ModelInfo(path, family)


def load_span(
    info: ModelInfo,
    blocks: BlockRange,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: Checkpoint | None = None,
    quant: str = "none",
    int8_threshold: float = DEFAULT_INT8_THRESHOLD,
) -> Span:
    """Blocks [start, end) as a span on `device` in `dtype`, in eval mode with frozen weights.

    With `quant` int8/nf4 each block's linear layers are quantized right after the block is read (see
    shard_server/quant.py), so peak memory is the quantized blocks so far plus one block in full precision.
    Raises LoadError when the quantization cannot run here (checked on a probe layer before any weight is read).
    """
    if quant != "none":
        try:
            check_quant_support(quant, device, dtype)
        except QuantUnavailable as e:
            raise LoadError(str(e)) from None
    ckpt = checkpoint if checkpoint is not None else Checkpoint(info.path)
    family = info.family
    layers = []
    for block in range(blocks.start, blocks.end):
        t0 = time.perf_counter()
        # Built on meta and given exactly this block's tensors (converted to the module's layout if needed).
        try:
            layer = family.load_block(ckpt, block)
        except (KeyError, RuntimeError) as e:
            raise LoadError(f"block {block}: {e}") from None
        # Quantize (from the checkpoint's precision) and cast per block, so peak memory stays ~one
        # full-precision block above the final size.
        quantize_block(layer, quant, dtype, device, int8_threshold)
        layer.to(device=device, dtype=dtype)  # quantized weights are integer tensors: only norms/biases cast
        if quant != "none" and device.type == "cpu":
            _release_checkpoint_pages(layer)
        layer.requires_grad_(False)  # Backward needs grads w.r.t. inputs only
        layers.append(layer.eval())
        log.debug("block %d loaded in %.2f s", block, time.perf_counter() - t0)
    span = family.make_span(layers, blocks)
    # Moves the span's own buffers (e.g. rotary tables) without changing their dtype: they stay float32.
    span.to(device=device)
    span.requires_grad_(False)
    return span.eval()


def _release_checkpoint_pages(layer: nn.Module) -> None:
    """Copy the tensors a quantized block still shares with the checkpoint (norms, biases, Mixtral's experts).

    safetensors hands out tensors that are views of the memory-mapped file; one small view keeps the whole
    file's mapping alive, and every page that quantization read stays resident. Without a quantization (and
    without a dtype change) the views ARE the served weights, so they are kept as they are (zero copy).
    """
    for module in layer.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()
