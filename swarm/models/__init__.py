"""Registry of model families: `family_for(config)` maps a model folder's config to its adapter."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from swarm.models.base import BlockSpan, ClientHead, ModelFamily
from swarm.models.bloom import BloomFamily
from swarm.models.falcon import FalconFamily
from swarm.models.llama import LlamaFamily
from swarm.models.mixtral import MixtralFamily

FAMILIES: tuple[type[ModelFamily], ...] = (LlamaFamily, MixtralFamily, BloomFamily, FalconFamily)


def family_for(config: PretrainedConfig) -> ModelFamily:
    model_type = getattr(config, "model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(config)
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(supported)}")


def load_family(model_path: Path) -> ModelFamily:
    return family_for(AutoConfig.from_pretrained(model_path))


__all__ = ["BlockSpan", "ClientHead", "ModelFamily", "FAMILIES", "family_for", "load_family"]
