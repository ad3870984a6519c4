"""`--quant int8|nf4`: replace a block's `nn.Linear` layers with bitsandbytes layers while the block is loaded.

Quantization happens per block (see `loader.load_span`): a block is read in full precision, its linear layers
are swapped for `Linear8bitLt` (LLM.int8(), `has_fp16_weights=False`) or `Linear4bit` (NF4), moving them to the
device quantizes them, and the full-precision weights are dropped before the next block is read. So a server
never holds more than its quantized blocks plus one block in full precision.

What is quantized: every `nn.Linear` (and subclasses such as Falcon's `FalconLinear`) inside a block: the
attention projections and, for Llama/BLOOM/Falcon, the MLP. What is not:
* norms, biases and any other parameter stay in `--dtype`;
* Mixtral's experts are not `nn.Linear`: transformers 5 keeps them as two fused 3-D parameters per layer
  (`gate_up_proj` [experts, 2*inter, hidden], `down_proj` [experts, hidden, inter]) run by a grouped-matmul
  kernel, and its router (`mlp.gate`) is a bare parameter too. Both stay in `--dtype`; only the attention
  projections of a Mixtral block are quantized. Routing decisions are sensitive to small errors, so keeping the
  router exact is deliberate; quantizing the experts would need our own experts kernel (not done).

Compute dtype: int8 layers take inputs in `--dtype` and return `--dtype` (bitsandbytes casts activations to
float16 internally); NF4 layers compute in `--dtype` (choose `--dtype bfloat16` for the fast kernels).

Backward (the Backward RPC: gradients w.r.t. the span's inputs, frozen weights) works through both kinds of
layers (see `_layer_class`). One exception: on CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights into an
inference-only layout on the first no-grad call; a gradient through such a layer raises `Unsupported`
(UNIMPLEMENTED on the wire) with a clear message (tests/unit/test_quant_layers.py checks whichever of the two
behaviours the CPU running it has).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from swarm.errors import Unsupported

log = logging.getLogger(__name__)

QUANT_CHOICES = ("none", "int8", "nf4")
DEFAULT_INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (activations above it are computed in float16)
NF4_BLOCKSIZE = 64  # bitsandbytes' default block size for 4-bit weights

# bitsandbytes logs these on import / on every call; they say nothing a server operator can act on.
_NOISY = (
    "inputs will be cast from",  # MatMul8bitLt, every call with non-float16 inputs
    "Failed to load CPU gemm_4bit_forward from kernels-community",  # import: optional hub kernel (no network)
    "Input type into Linear4bit is torch.float16",  # compute dtype advice; we choose it on purpose
)


class QuantUnavailable(ValueError):
    """--quant cannot work here (bitsandbytes missing, device unsupported, broken install); one-line message."""


class _DropNoisy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if record.args else str(record.msg)
        return not any(text in message for text in _NOISY)


_FILTER = _DropNoisy()


def silence_bnb_warnings() -> None:
    """Filter bitsandbytes' per-call/at-import log lines (its loggers are module loggers under `bitsandbytes`)."""
    for name in (
        "bitsandbytes",
        "bitsandbytes.autograd._functions",
        "bitsandbytes.backends.cpu.ops",
        "bitsandbytes.nn.modules",
    ):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def import_bnb() -> Any:
    """The bitsandbytes module, with its noisy log lines filtered; QuantUnavailable if it is not installed."""
    silence_bnb_warnings()  # before the import: the CPU backend logs while it is imported
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantUnavailable(
            f"--quant needs bitsandbytes, which is not installed ({e}); install it with "
            "`pip install 'pollen-swarm[quant]'` or run with --quant none"
        ) from None
    return bitsandbytes


def check_quant_support(quant: str, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> None:
    """Fail fast, before any weight is read, when `quant` cannot run on `device`.

    Quantizes and runs one small layer on the device: that exercises exactly the native library and kernels the
    blocks will use, which catches a CPU-only bitsandbytes build on a CUDA box, a missing CUDA runtime, etc.
    """
    if quant not in QUANT_CHOICES:
        raise QuantUnavailable(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if quant == "none":
        return
    bnb = import_bnb()
    version = getattr(bnb, "__version__", "?")
    supported = set(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    if device.type not in supported:
        raise QuantUnavailable(
            f"--quant {quant} is not available on device {device}: bitsandbytes {version} supports "
            f"{', '.join(sorted(supported))}"
        )
    try:
        probe = nn.Linear(128, 64, bias=True, dtype=compute_dtype)
        layer = make_quantized_linear(probe, quant, compute_dtype, device)
        with torch.inference_mode():
            out = layer(torch.ones(2, 128, dtype=compute_dtype, device=device))
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("the probe layer returned non-finite values")
    except Exception as e:  # noqa: BLE001 — any failure of the probe means "cannot quantize here"
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise QuantUnavailable(
            f"--quant {quant} does not work on device {device} with bitsandbytes {version}: "
            f"{type(e).__name__}: {first_line}"
        ) from None


def quantizable_linears(block: nn.Module) -> list[str]:
    """Names of the sub-modules `quantize_block` replaces (every nn.Linear, in module order)."""
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear) and name]


def quantize_block(
    block: nn.Module,
    quant: str,
    compute_dtype: torch.dtype,
    device: torch.device,
    int8_threshold: float = DEFAULT_INT8_THRESHOLD,
) -> nn.Module:
    """Replace every nn.Linear of `block` (in place) by a quantized layer on `device`; returns `block`.

    Each layer is quantized from the block's own (checkpoint precision) weights, one at a time, so the extra
    memory is one float16 copy of one weight matrix. Other parameters are left alone (the caller casts them).
    """
    if quant == "none":
        return block
    for name in quantizable_linears(block):
        owner_name, _, leaf = name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        linear = getattr(owner, leaf)
        setattr(owner, leaf, make_quantized_linear(linear, quant, compute_dtype, device, int8_threshold))
        del linear  # the last reference to the full-precision weight (besides the block's old attribute, gone)
        return_freed_memory()
    return block


_LIBC: Any = None


def return_freed_memory() -> None:
    """Give memory freed by the C allocator back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Quantizing a weight allocates and frees float16/float32 temporaries of its size (tens of MB). glibc raises
    its mmap threshold after such frees, so the next temporaries come from the heap, and fragmentation keeps
    them: measured +250 MB of RSS (peak +360 MB) when loading 2 int8 blocks of 113 MB. Trimming after each
    layer keeps the heap at what is alive.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def make_quantized_linear(
    linear: nn.Linear,
    quant: str,
    compute_dtype: torch.dtype,
    device: torch.device,
    int8_threshold: float = DEFAULT_INT8_THRESHOLD,
) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights quantized on `device`, frozen and in eval mode."""
    bnb = import_bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.detach()
    if quant == "int8":
        layer = _layer_class(bnb, "int8")(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=int8_threshold,
            device="meta",  # no random init: the real weight is assigned below
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    elif quant == "nf4":
        layer = _layer_class(bnb, "nf4")(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE, module=layer
        )
    else:
        raise QuantUnavailable(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    if has_bias:
        assert linear.bias is not None
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    layer = layer.to(device)  # bitsandbytes quantizes the weight when it is moved to a real device
    layer.requires_grad_(False)
    return layer.eval()


_CLASSES: dict[str, type[nn.Module]] = {}


def _layer_class(bnb: Any, quant: str) -> type[nn.Module]:
    """bitsandbytes' layer for `quant`, with two fixes for gradients w.r.t. the inputs (Backward RPC):

    * int8: MatMul8bitLt returns a view of its output; blocks that add to it in place (Falcon's parallel
      attention/MLP: `mlp_output += attention_output`) then fail under autograd, so with a graph it is cloned.
    * nf4: on CPUs with AVX512-BF16 the first no-grad call repacks the weight into a layout only an inference
      kernel reads; that kernel has no backward (the input gradient would silently be missing), so a gradient
      through such a layer raises Unsupported instead.
    """
    if not _CLASSES:

        class PollenLinear8bitLt(bnb.nn.Linear8bitLt):  # type: ignore[misc,name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x)
                return out.clone() if out.requires_grad else out

        class PollenLinear4bit(bnb.nn.Linear4bit):  # type: ignore[misc,name-defined]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                packed = getattr(getattr(self.weight, "quant_state", None), "packing_format_for_cpu", False)
                if packed and x.requires_grad and torch.is_grad_enabled():
                    raise Unsupported(
                        "Backward through nf4 blocks is not supported on this CPU server: bitsandbytes repacked "
                        "the weights for its inference-only AVX512-BF16 kernel; use a server without --quant nf4"
                    )
                return super().forward(x)

        _CLASSES.update(int8=PollenLinear8bitLt, nf4=PollenLinear4bit)
    return _CLASSES[quant]


# ---- sizes (no bitsandbytes needed) ----------------------------------------------------------------------


def quantized_weight_bytes(out_features: int, in_features: int, quant: str) -> int:
    """Bytes a quantized [out, in] weight occupies (the layer's bias is counted separately, in --dtype).

    int8 (LLM.int8(), row-wise): one byte per weight + one float32 scale per output row (SCB).
    nf4 (bitsandbytes defaults: block size 64, compressed statistics): half a byte per weight; one absmax per
    64 weights, itself quantized to one byte in blocks of 256 with a float32 absmax per such block, a 256-entry
    float32 code book for those and a float32 offset; plus the 16-entry float32 NF4 code book.
    """
    n = out_features * in_features
    if quant == "int8":
        return n + 4 * out_features
    if quant == "nf4":
        blocks = -(-n // NF4_BLOCKSIZE)
        nested_blocks = -(-blocks // 256)
        return -(-n // 2) + blocks + 4 * nested_blocks + 4 * 256 + 4 + 4 * 16
    raise ValueError(f"no quantized size for {quant!r}")


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters, buffers and bitsandbytes quantization states (for tests/bench)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*module.parameters(), *module.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for attr in ("absmax", "code", "offset"):
                add(getattr(state, attr, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                for attr in ("absmax", "code"):
                    add(getattr(nested, attr, None))
        add(getattr(t, "SCB", None))
    for sub in module.modules():
        state = getattr(sub, "state", None)  # Linear8bitLt moves SCB here after its first call
        if state is not None and hasattr(state, "SCB"):
            add(state.SCB)
    return total
