"""--quant int8/nf4 at load time (shard_server/quant.py) and the bytes-per-block estimate (shard_server/memory.py).

Every family: quantized spans hold bitsandbytes layers in place of every nn.Linear, stay close to the fp32
span, support Backward, and occupy exactly the bytes `block_bytes` predicts from the safetensors headers.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from shard_server.loader import LoadError, ModelInfo, inspect_model, load_span
from shard_server.memory import block_bytes, span_bytes
from shard_server.quant import (
    QuantUnavailable,
    check_quant_support,
    make_quantized_linear,
    module_bytes,
    quantizable_linears,
)
from swarm.blocks import BlockRange
from swarm.errors import Unsupported
from swarm.models import Span, run_span
from tests.models import FAMILIES, make_tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'pollen-swarm[quant]')")

CPU = torch.device("cpu")
ALL = BlockRange(0, 3)
# Relative Frobenius error of the span output vs the fp32 span (random hidden states, 3 tiny random blocks; the
# residual stream dominates, hence the small numbers). Measured over the 4 families: int8 <= 0.0007 (fp32
# compute) / 0.0046 (bf16); nf4 <= 0.0065 / 0.0082. The bounds leave ~3x headroom.
MAX_REL_ERROR = {("int8", torch.float32): 0.003, ("int8", torch.bfloat16): 0.015,
                 ("nf4", torch.float32): 0.02, ("nf4", torch.bfloat16): 0.025}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def info(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), num_layers=3)
    return inspect_model(str(path), ALL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward(span: Span, hidden: torch.Tensor, dtype: torch.dtype, cached: bool = False) -> torch.Tensor:
    """The span's output; with `cached`, through a KV cache (prefill of all but the last token, then one step)."""
    x = hidden.to(dtype)
    with torch.inference_mode():
        if not cached:
            return run_span(span, x).float()
        kv = span.new_kv(x.shape[0], x.shape[1], dtype, CPU)
        first = run_span(span, x[:, :-1], kv, 0)
        return torch.cat([first, run_span(span, x[:, -1:], kv, x.shape[1] - 1)], dim=1).float()


def input_grad(span: Span, hidden: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the Backward RPC computes: d(out . grad_out)/d(hidden), weights frozen."""
    x = hidden.to(dtype).requires_grad_(True)
    (grad,) = torch.autograd.grad(run_span(span, x), x, grad_out.to(dtype))
    return grad.float()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_span_is_close_and_supports_backward(info: ModelInfo, quant: str, dtype: torch.dtype) -> None:
    hidden = torch.randn(2, 6, info.family.hidden_size, generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    ref = load_span(info, ALL, CPU, torch.float32)
    span = load_span(info, ALL, CPU, dtype, quant=quant)

    replaced = [m for layer in span.layers for m in layer.modules() if isinstance(m, nn.Linear)]  # type: ignore[union-attr]
    expected_class = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert replaced and all(isinstance(m, expected_class) for m in replaced)
    floats = [p for p in span.parameters() if p.is_floating_point()]
    assert all(p.dtype == dtype and not p.requires_grad for p in floats)  # norms, biases (and experts) in dtype

    out = forward(span, hidden, dtype)
    error = rel(out, forward(ref, hidden, torch.float32))
    print(f"{info.family.name} {quant} {dtype}: relative error {error:.4f}")
    assert error <= MAX_REL_ERROR[(quant, dtype)], error
    # the KV-cached path (prefill, then a decode step) gives the same result as the stateless one
    torch.testing.assert_close(forward(span, hidden, dtype, cached=True), out, atol=1e-5, rtol=0)
    # Backward works through bitsandbytes layers (after inference_mode calls, as on a server), except nf4 on CPUs
    # where bitsandbytes repacked the weights for its inference-only kernel: there it is refused clearly.
    if any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False) for m in replaced):
        with pytest.raises(Unsupported, match="Backward through nf4"):
            input_grad(span, hidden, grad_out, dtype)
        return
    grad = input_grad(span, hidden, grad_out, dtype)
    assert rel(grad, input_grad(ref, hidden, grad_out, torch.float32)) <= 2 * MAX_REL_ERROR[(quant, dtype)]


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_block_bytes_from_headers_equal_loaded_bytes(info: ModelInfo, quant: str, dtype: str) -> None:
    if quant == "nf4" and dtype == "float16":
        pytest.skip("same sizes as bfloat16")
    span = load_span(info, ALL, CPU, getattr(torch, dtype), quant=quant)
    loaded = sum(module_bytes(layer) for layer in span.layers)  # type: ignore[union-attr]  # not rotary buffers
    assert span_bytes(info, 0, 3, dtype, quant) == loaded
    assert block_bytes(info, dtype, quant) * 3 == loaded  # the blocks of these models are all alike


def test_block_bytes_shrink_with_precision(info: ModelInfo) -> None:
    sizes = {q: block_bytes(info, "float32", q) for q in ("none", "int8", "nf4")}
    bf16 = block_bytes(info, "bfloat16")
    print(info.family.name, sizes, bf16)
    assert sizes["nf4"] < sizes["int8"] < sizes["none"] and bf16 < sizes["none"]
    if info.family.name != "mixtral":  # Mixtral's experts (most of a block) stay in --dtype
        assert sizes["int8"] < bf16
    with pytest.raises(ValueError, match="unknown quantization"):
        block_bytes(info, "float32", "int4")


def test_mixtral_experts_and_router_stay_in_dtype(tmp_path: Path) -> None:
    info = inspect_model(str(make_tiny_model("mixtral", tmp_path, num_layers=1)), BlockRange(0, 1))
    span = load_span(info, BlockRange(0, 1), CPU, torch.bfloat16, quant="nf4")
    layer = span.layers[0]  # type: ignore[index]
    assert layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert layer.mlp.gate.weight.dtype == torch.bfloat16
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    linears = [layer.get_submodule(name) for name in quantizable_linears(layer)]
    assert len(linears) == 4 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)  # attention only


def test_unsupported_device_and_missing_bitsandbytes_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantUnavailable, match="not available on device meta"):
        check_quant_support("int8", torch.device("meta"))
    with pytest.raises(QuantUnavailable, match="unknown quantization"):
        check_quant_support("int3", CPU)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(QuantUnavailable, match=r"needs bitsandbytes.*pollen-swarm\[quant\]"):
        check_quant_support("nf4", CPU)


def test_load_span_reports_quant_errors_as_load_errors(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = inspect_model(str(tiny_llama), BlockRange(0, 1))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(LoadError, match="needs bitsandbytes") as e:
        load_span(info, BlockRange(0, 1), CPU, torch.float32, quant="int8")
    assert "\n" not in str(e.value)


def test_backward_through_cpu_packed_nf4_is_refused() -> None:
    layer = make_quantized_linear(nn.Linear(64, 32), "nf4", torch.float32, CPU)
    layer.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks it on AVX512-BF16 CPUs
    with pytest.raises(Unsupported, match="Backward through nf4"):
        layer(torch.randn(2, 64, requires_grad=True))


def test_bitsandbytes_per_call_warnings_are_filtered(caplog: pytest.LogCaptureFixture) -> None:
    layer = make_quantized_linear(nn.Linear(64, 32), "int8", torch.float32, CPU)
    with caplog.at_level(logging.DEBUG):
        with torch.inference_mode():
            layer(torch.randn(2, 64))
            layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert not [r for r in caplog.records if "will be cast" in r.getMessage()]
