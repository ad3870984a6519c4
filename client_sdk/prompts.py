"""What a caller may pass to `generate`/`stream` and what comes back: text -> text, list[int] -> list[int], a
1-D or 2-D LongTensor -> a LongTensor of the same rank. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from types import EllipsisType
from typing import Any

import torch

from client_sdk.tokenizer import Tokenizer

Prompt = str | list[int] | torch.Tensor
EosArg = int | Sequence[int] | None | EllipsisType  # ... = the model's default stop tokens


class Kind(Enum):
    """How the prompt came, so the answer goes back the same way."""

    TEXT = "text"
    LIST = "list"
    TENSOR_1D = "tensor1d"
    TENSOR_2D = "tensor2d"


def encode_prompt(inputs: Prompt, tokenizer: Tokenizer | None, vocab_size: int) -> tuple[torch.Tensor, Kind]:
    """Prompt -> ([batch, seq] int64 ids, kind to answer in). Raises ValueError/TypeError on bad input."""
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ValueError("the model folder has no tokenizer.json: pass token ids instead of text")
        ids = torch.tensor([tokenizer.encode(inputs)], dtype=torch.long)
        kind = Kind.TEXT
    elif isinstance(inputs, torch.Tensor):
        if inputs.dim() not in (1, 2) or inputs.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be a 1-D or 2-D integer tensor, got {inputs.dtype} {list(inputs.shape)}")
        ids = inputs.long().cpu().reshape(-1, inputs.shape[-1])
        kind = Kind.TENSOR_1D if inputs.dim() == 1 else Kind.TENSOR_2D
    elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
        ids = torch.tensor([inputs], dtype=torch.long).reshape(1, -1)
        kind = Kind.LIST
    else:
        raise TypeError(f"inputs must be str, list[int] or a LongTensor, got {type(inputs).__name__}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]")
    return ids, kind


def decode_answer(new: torch.Tensor, kind: Kind, tokenizer: Tokenizer | None) -> Any:
    """New tokens [batch, new] in the prompt's kind (text skips special tokens, as transformers' decode does)."""
    if kind is Kind.TEXT and tokenizer is not None:
        return tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    if kind is Kind.LIST:
        return new[0].tolist()
    return new[0] if kind is Kind.TENSOR_1D else new


def eos_ids(arg: EosArg, default: list[int]) -> list[int]:
    if arg is ...:
        return list(default)
    if arg is None:
        return []
    return [int(arg)] if isinstance(arg, int) else [int(e) for e in arg]
