"""Tensors on the wire: raw bytes + dtype enum + shape. Never pickle.

`from_proto` validates everything a peer could get wrong (unknown dtype, negative or huge shapes, byte
count) and raises `InvalidRequest` with a message that names the problem.
"""

from __future__ import annotations

import math

import torch

from swarm.errors import InvalidRequest
from swarm.pb import common_pb2

_TO_WIRE: dict[torch.dtype, common_pb2.DType] = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.bool: common_pb2.DTYPE_BOOL,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_proto(tensor: torch.Tensor) -> common_pb2.Tensor:
    """Serialize a CPU or GPU tensor as raw bytes (bf16 travels as its 16-bit pattern)."""
    if tensor.dtype not in _TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} cannot travel on the wire")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return common_pb2.Tensor(data=data, shape=list(t.shape), dtype=_TO_WIRE[tensor.dtype])


MAX_DIMS = 8  # no tensor on the wire has more; bounds the work of checking a shape


def from_proto(msg: common_pb2.Tensor, name: str = "tensor", max_elements: int = 1 << 31) -> torch.Tensor:
    """Deserialize and validate; raises InvalidRequest on anything inconsistent."""
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise InvalidRequest(f"{name}: unsupported or missing dtype enum {msg.dtype}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"{name}: {len(shape)} dimensions is over the limit of {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{name}: negative dimension in shape {list(shape)}")
    # Dimensions of size 0 counted as 1: an empty tensor of shape [0, 2**40, 2**40] holds no bytes, yet torch
    # computes its strides from the other dimensions and overflows. This bound also bounds the element count.
    if math.prod(max(d, 1) for d in shape) > max_elements:
        # not the product itself: a hostile shape's product can have thousands of digits
        raise InvalidRequest(
            f"{name}: shape {list(shape)} spans more elements than allowed (a size-0 dimension counts as 1): "
            f"over the limit of {max_elements}"
        )
    numel = math.prod(shape)
    expected = numel * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidRequest(
            f"{name}: shape {list(shape)} of {dtype_name(dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    wire_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    # frombuffer shares the (read-only) protobuf bytes; clone so callers may write to the tensor.
    flat = torch.frombuffer(bytearray(msg.data), dtype=wire_dtype)
    if dtype == torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat.reshape(shape)
