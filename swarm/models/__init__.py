"""Registry of model families: `load_family(path)` reads config.json and builds the family that serves it.

Families are imported lazily (only the one a model needs), so a process pays for one family's module at most.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from swarm.models.base import ClientHead, KVCache, ModelFamily, Segment, Span, run_span
from swarm.models.config import ConfigError, ModelConfig, read_config_json

# model_type in config.json -> "module:FamilyClass"
FAMILIES: dict[str, str] = {
    "llama": "swarm.models.llama:LlamaFamily",
    "mistral": "swarm.models.llama:LlamaFamily",
    "qwen2": "swarm.models.llama:LlamaFamily",
    "mixtral": "swarm.models.mixtral:MixtralFamily",
    "bloom": "swarm.models.bloom:BloomFamily",
    "falcon": "swarm.models.falcon:FalconFamily",
}


def family_class(model_type: str) -> type[ModelFamily]:
    target = FAMILIES.get(model_type)
    if target is None:
        raise ConfigError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    module, _, name = target.partition(":")
    cls: type[ModelFamily] = getattr(importlib.import_module(module), name)
    return cls


def family_from_dict(data: dict[str, object]) -> ModelFamily:
    """The family for a config.json object (raises ConfigError when unsupported or incomplete)."""
    cls = family_class(str(data.get("model_type", "")))
    return cls(cls.config_class.from_dict(data))


def load_family(model_path: Path) -> ModelFamily:
    return family_from_dict(read_config_json(model_path))


__all__ = [
    "FAMILIES",
    "ClientHead",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "ModelFamily",
    "Segment",
    "Span",
    "family_class",
    "family_from_dict",
    "load_family",
    "read_config_json",
    "run_span",
]
