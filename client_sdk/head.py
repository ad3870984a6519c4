"""The client's local parts of a model: embeddings, final norm and LM head (via the model family), the
config fingerprint servers must match, and the tokenizer when the folder has one. Transformer blocks are
never read here: they live on the servers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from swarm.model_files import Checkpoint, config_fingerprint, default_model_id, resolve_model_path
from swarm.models import ClientHead, ModelFamily, family_for

log = logging.getLogger(__name__)

# Any of these in the model folder means AutoTokenizer can load a tokenizer from it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LocalModel:
    path: Path
    model_id: str  # DHT namespace of the model's blocks
    model_hash: str  # config fingerprint; servers announcing another one run a different model
    config: PretrainedConfig
    family: ModelFamily
    head: ClientHead
    tokenizer: Any | None  # a transformers tokenizer, or None if the folder has none
    dtype: torch.dtype  # dtype of the local parts and of hidden states sent to the first server
    eos_token_ids: list[int]  # the model's default stop tokens (may be empty)

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks


def load_local_model(
    model: str | os.PathLike[str], model_id: str | None = None, dtype: torch.dtype | None = None
) -> LocalModel:
    """Read config, the head tensors only, and the tokenizer if present. `dtype=None` keeps the stored one."""
    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    family = family_for(config)
    keys = family.head_keys()  # local name -> checkpoint key
    tensors = Checkpoint(path).read(keys.values())
    local = {name: tensors[key] for name, key in keys.items()}
    if dtype is not None:
        local = {name: t.to(dtype) for name, t in local.items()}
    head = family.make_head(local).eval()
    head_dtype = next(iter(local.values())).dtype
    tokenizer = _load_tokenizer(path)
    log.info(
        "loaded local parts of %s (%d tensors, %s); %d blocks are remote",
        path.name,
        len(local),
        head_dtype,
        family.num_blocks,
    )
    return LocalModel(
        path=path,
        model_id=model_id or default_model_id(model),
        model_hash=config_fingerprint(path),
        config=config,
        family=family,
        head=head,
        tokenizer=tokenizer,
        dtype=head_dtype,
        eos_token_ids=_default_eos_ids(path, config, tokenizer),
    )


def _load_tokenizer(path: Path) -> Any | None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # imported lazily: only folders with a tokenizer pay for it

    return AutoTokenizer.from_pretrained(path)


def _default_eos_ids(path: Path, config: PretrainedConfig, tokenizer: Any | None) -> list[int]:
    """EOS ids from generation_config.json (preferred, as transformers does), config.json or the tokenizer."""
    eos: Any = None
    if (path / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]
