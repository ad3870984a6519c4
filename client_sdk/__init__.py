"""Pollen's client: run a model whose transformer blocks are served by a swarm of shard servers.

Embeddings, final norm and LM head run locally; hidden states travel through the servers' spans.
"""

from client_sdk.client import AsyncSwarmClient, ClientConfig, SwarmClient, SwarmInfo

__all__ = ["AsyncSwarmClient", "ClientConfig", "SwarmClient", "SwarmInfo"]
