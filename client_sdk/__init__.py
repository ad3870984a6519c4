"""Pollen's client: run a model whose transformer blocks are served by a swarm of shard servers.

Embeddings, final norm and LM head run locally; hidden states travel through the servers' spans.
`SwarmClient` is the light entry point (torch, grpc and `tokenizers`, never `transformers`);
`AutoDistributedModelForCausalLM` and `AutoDistributedModelForSequenceClassification` are the Hugging Face
drop-ins (with prompt tuning and client-owned LoRA) and import transformers when first used.
Every name here is imported on first access, so `import client_sdk` itself costs nothing.
"""

from __future__ import annotations

import gc
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client_sdk.autograd import RemoteSequential
    from client_sdk.blocking import SwarmClient
    from client_sdk.classification import (
        AutoDistributedModelForSequenceClassification,
        DistributedModelForSequenceClassification,
    )
    from client_sdk.client import AsyncSwarmClient, SwarmInfo
    from client_sdk.config import ClientConfig
    from client_sdk.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
    from client_sdk.tokenizer import Tokenizer

# public name -> module that defines it
_EXPORTS = {
    "AsyncSwarmClient": "client_sdk.client",
    "AutoDistributedModelForCausalLM": "client_sdk.model",
    "AutoDistributedModelForSequenceClassification": "client_sdk.classification",
    "ClientConfig": "client_sdk.config",
    "DistributedModelForCausalLM": "client_sdk.model",
    "DistributedModelForSequenceClassification": "client_sdk.classification",
    "RemoteSequential": "client_sdk.autograd",
    "SwarmClient": "client_sdk.blocking",
    "SwarmInfo": "client_sdk.client",
    "Tokenizer": "client_sdk.tokenizer",
}

__all__ = [
    "AsyncSwarmClient",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "RemoteSequential",
    "SwarmClient",
    "SwarmInfo",
    "Tokenizer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client_sdk' has no attribute {name!r}")
    # Importing the client allocates many long-lived objects (torch, pydantic models, protobuf descriptors),
    # which triggers full garbage collections that each walk everything torch created (~0.1-0.2 s apiece,
    # ~0.4 s in all) and find nothing to free. The collector is paused while the modules load.
    paused = gc.isenabled()
    gc.disable()
    try:
        value = getattr(importlib.import_module(module), name)
    finally:
        if paused:
            gc.enable()
    globals()[name] = value  # later lookups skip this function
    return value
