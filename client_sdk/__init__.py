"""Pollen's client: run a model whose transformer blocks are served by a swarm of shard servers.

Embeddings, final norm and LM head run locally; hidden states travel through the servers' spans.
`SwarmClient` is the light entry point; `AutoDistributedModelForCausalLM` is the Hugging Face drop-in
(imported lazily, so `import client_sdk` stays cheap).
"""

from __future__ import annotations

from typing import Any

from client_sdk.client import AsyncSwarmClient, SwarmClient, SwarmInfo
from client_sdk.config import ClientConfig

__all__ = [
    "AsyncSwarmClient",
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "RemoteSequential",
    "SwarmClient",
    "SwarmInfo",
]


def __getattr__(name: str) -> Any:
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from client_sdk import model

        return getattr(model, name)
    if name == "RemoteSequential":
        from client_sdk.autograd import RemoteSequential

        return RemoteSequential
    raise AttributeError(f"module 'client_sdk' has no attribute {name!r}")
