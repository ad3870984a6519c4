"""The client's local parts of a model: embeddings, final norm and LM head (via the model family), the
config fingerprint servers must match, the default stop tokens and the tokenizer when the folder has one.
Transformer blocks are never read here: they live on the servers. No `transformers` import.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client_sdk.tokenizer import Tokenizer
from swarm.model_files import Checkpoint, config_fingerprint, default_model_id, resolve_model_path
from swarm.models import ClientHead, ModelConfig, ModelFamily, load_family

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


@dataclass
class LocalModel:
    path: Path
    model_id: str  # DHT namespace of the model's blocks
    model_hash: str  # config fingerprint; servers announcing another one run a different model
    family: ModelFamily
    head: ClientHead
    tokenizer: Tokenizer | None  # None if the folder has no tokenizer.json
    dtype: torch.dtype  # dtype of the local parts and of hidden states sent to the first server
    eos_token_ids: list[int]  # the model's default stop tokens (may be empty)
    pad_token_id: int | None  # what finished rows are padded with (None: the first EOS id, else 0)

    @property
    def config(self) -> ModelConfig:
        return self.family.config

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks


def load_local_model(
    model: str | os.PathLike[str], model_id: str | None = None, dtype: torch.dtype | None = None
) -> LocalModel:
    """Read config, the head tensors only, and the tokenizer if present. `dtype=None` keeps the stored one."""
    path = resolve_model_path(model)
    family = load_family(path)
    head = family.load_head(Checkpoint(path), dtype)
    head_dtype = next(head.parameters()).dtype
    tokenizer = Tokenizer.from_folder(path)
    generation = _generation_config(path)
    log.info("loaded the local parts of %s (%s); %d blocks are remote", path.name, head_dtype, family.num_blocks)
    pad = _first_id(generation.get("pad_token_id"))
    if pad is None:
        pad = family.config.pad_token_id
    return LocalModel(
        path=path,
        model_id=model_id or default_model_id(model),
        model_hash=config_fingerprint(path),
        family=family,
        head=head,
        tokenizer=tokenizer,
        dtype=head_dtype,
        eos_token_ids=_default_eos_ids(generation, family.config, tokenizer),
        pad_token_id=pad,
    )


def _generation_config(path: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent or unreadable)."""
    file = path / GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring %s: %s", file, e)
        return {}
    return data if isinstance(data, dict) else {}


def _default_eos_ids(generation: dict[str, Any], config: ModelConfig, tokenizer: Tokenizer | None) -> list[int]:
    """EOS ids from generation_config.json (preferred, as transformers does), config.json or the tokenizer."""
    eos = generation.get("eos_token_id")
    if eos is not None:
        return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
    if config.eos_token_ids:
        return config.eos_token_ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return []


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)
