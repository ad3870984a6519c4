"""Memory arithmetic before and after loading: free device memory, a block's weight bytes from the checkpoint's
tensor headers (nothing is loaded), how many blocks fit, the default KV-cache budget, the activation memory of a
Backward (and so how many tokens one may carry), and the process RSS.
"""

from __future__ import annotations

import functools
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from shard_server.loader import ModelInfo
from shard_server.quant import QUANT_CHOICES, quantizable_linears, quantized_weight_bytes
from swarm.model_files import Checkpoint
from swarm.models import ModelFamily
from swarm.models.lora import linear_modules
from swarm.tensors import dtype_from_name

log = logging.getLogger(__name__)

GIB = 1 << 30
# Left free for activations of one max-size request, the allocator's slack, Python and gRPC buffers.
HEADROOM_BYTES = GIB // 2
HEADROOM_FRACTION = 0.1
# With no --cache-tokens/--cache-bytes, KV caches may take this share of what is free after the weights.
DEFAULT_CACHE_FRACTION = 0.5
# With no --num-blocks, this many cache tokens per block are reserved while deciding how many blocks fit.
PLAN_CACHE_TOKENS = 4096
# With no --max-backward-tokens: a Backward may carry up to this many tokens (Petals' default) if they fit the
# activation budget, which is this share of what is free once the weights are loaded (the KV cache takes half).
DEFAULT_BACKWARD_TOKENS = 2048
ACTIVATION_FRACTION = 0.25

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def free_memory_bytes(device: torch.device) -> int:
    """Memory available for new allocations on `device` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not on Linux /proc: fall back to psutil

    return int(psutil.virtual_memory().available)


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process().memory_info().rss)


def usable_bytes(free_bytes: int) -> int:
    return max(0, int(free_bytes * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES)


def plan_num_blocks(
    free_bytes: int,
    block_bytes: int,
    kv_token_bytes_per_block: int,
    total_blocks: int,
    activations: ActivationModel | None = None,
) -> int:
    """As many blocks as fit with their weights plus PLAN_CACHE_TOKENS tokens of cache each, and (given the
    activation model) a Backward of DEFAULT_BACKWARD_TOKENS tokens through all of them (at least 1)."""
    per_block = block_bytes + PLAN_CACHE_TOKENS * kv_token_bytes_per_block
    usable = usable_bytes(free_bytes)
    if activations is not None:
        # a block-by-block Backward keeps every block's input, plus one block's graph whatever the block count
        per_block += activations.bytes(1, DEFAULT_BACKWARD_TOKENS, 1, False) - activations.bytes(
            1, DEFAULT_BACKWARD_TOKENS, 0, False
        )
        usable -= activations.bytes(1, DEFAULT_BACKWARD_TOKENS, 0, False)
    fit = max(0, usable) // max(1, per_block)
    return int(max(1, min(total_blocks, fit)))


def default_activation_bytes(free_after_weights: int) -> int:
    """The activation budget of one Forward/Backward (the worker runs one at a time)."""
    return int(usable_bytes(free_after_weights) * ACTIVATION_FRACTION)


@dataclass(frozen=True)
class ActivationModel:
    """What autograd keeps during a Backward, per token and block, as an upper bound.

    Measured with `saved_tensors_hooks` (tests/unit/test_lora_backward.py checks the bound for every family):
    per token and block the saved tensors take less than the sum of the in + out features of the block's linear
    layers (and of the experts a token is routed to) plus 4 × hidden for norms and residuals, in the compute
    dtype; sdpa keeps a float32 copy of the boolean mask per block ([batch, seq, seq]); ALiBi's float bias
    `[batch, heads, seq, seq]` is built once per hop and shared by every block.
    """

    hidden: int
    per_token_block: int  # elements
    heads: int
    alibi: bool
    element_bytes: int

    def bytes(self, batch: int, seq: int, blocks: int, whole_graph: bool) -> int:
        """Activation bytes of a Backward of [batch, seq] over `blocks` blocks: one graph over all of them, or
        (whole_graph=False) every block's input kept plus one block's graph at a time."""
        tokens, el = batch * seq, self.element_bytes
        one_block = tokens * self.per_token_block * el + batch * seq * seq * 4
        shared = batch * self.heads * seq * seq * el if self.alibi else 0
        gradients = 2 * tokens * self.hidden * el  # the gradient flowing back and the one being computed
        if whole_graph:
            return blocks * one_block + shared + gradients
        return blocks * tokens * self.hidden * el + one_block + shared + gradients

    def max_tokens(self, budget_bytes: int, blocks: int, cap: int) -> int:
        """The most tokens a block-by-block Backward may carry within `budget_bytes`, whatever their batch × seq
        split (a single sequence is the worst case: the attention terms grow with seq²); at least 1."""
        lo, hi = 1, max(1, cap)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.bytes(1, mid, blocks, False) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo


def activation_model(family: ModelFamily, dtype: torch.dtype) -> ActivationModel:
    with torch.device("meta"):
        block = family.build_block()
    per_token = sum(i + o for i, o in linear_modules(block).values()) + 4 * family.hidden_size
    # experts that are not nn.Linear (Mixtral's fused [experts, out, in] tensors): a token runs top-k of them
    top_k = int(getattr(family.config, "num_experts_per_tok", 1) or 1)
    per_token += top_k * sum(p.shape[1] + p.shape[2] for p in block.parameters() if p.dim() == 3)
    alibi = family.name == "bloom" or bool(getattr(family.config, "alibi", False))
    return ActivationModel(family.hidden_size, per_token, family.config.num_attention_heads, alibi, dtype.itemsize)


def default_cache_bytes(free_after_weights: int) -> int:
    """The KV budget when no flag sets it: a share of what is free once the weights are loaded."""
    return int(usable_bytes(free_after_weights) * DEFAULT_CACHE_FRACTION)


# ---- bytes per block for a dtype AND a quantization (--quant), from the headers -----------------------------
# Exact: equals what loader.load_span allocates for the block's parameters and bitsandbytes quantization states
# (tests/unit/test_quant_layers.py checks it for every family, dtype and quantization).


@functools.lru_cache(maxsize=64)
def _file_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} from one file's header (reads only the header bytes)."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def block_bytes(info: ModelInfo, dtype: str | torch.dtype, quant: str = "none", block: int = 0) -> int:
    """Bytes of global block `block` once loaded in `dtype` with `quant` ("none", "int8", "nf4"); nothing is read
    but the safetensors headers.

    Floating-point tensors take `dtype`'s size; the weights of the block's nn.Linear layers take their quantized
    size when `quant` is set (biases stay in `dtype`; Mixtral's fused experts and router are not nn.Linear and
    stay in `dtype`, see quant.py); integer tensors keep their stored size. Which weights are linear comes from
    the block's module tree built on the meta device.
    """
    torch_dtype = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    family = info.family
    checkpoint = Checkpoint(info.path)
    prefix = family.checkpoint_name(checkpoint, family.block_prefix(block), prefix=True)
    keys = checkpoint.keys_with_prefix(prefix)
    if not keys:
        raise KeyError(f"the checkpoint at {info.path} has no tensors under {prefix!r}")
    linear_weights: set[str] = set()  # names (prefix stripped) of the weights quantize_block replaces
    if quant != "none":
        with torch.device("meta"):
            module = family.build_block()
        linear_weights = {f"{name}.weight" for name in quantizable_linears(module)}
    total = 0
    for key in keys:
        st_dtype, shape = _file_header(checkpoint._file_of[key])[key]  # Checkpoint knows each key's file
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if key[len(prefix) :] in linear_weights and len(shape) == 2:
            total += quantized_weight_bytes(shape[0], shape[1], quant)
        elif st_dtype.startswith(("F", "BF")):
            total += numel * torch_dtype.itemsize
        else:
            total += numel * _SAFETENSORS_BYTES.get(st_dtype, 4)
    return total


def span_bytes(info: ModelInfo, start: int, end: int, dtype: str | torch.dtype, quant: str = "none") -> int:
    """Bytes of blocks [start, end): the sum of `block_bytes` (blocks may differ, e.g. per-layer settings)."""
    return sum(block_bytes(info, dtype, quant, block) for block in range(start, end))
