"""Pollen shard server: loads blocks [start, end) of a model and serves them over gRPC (`pollen.v1.Shard`),
announcing itself in the DHT. `ShardServer` is the composition root; `cli.main` is `shard-server`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shard_server.config import ShardServerConfig

if TYPE_CHECKING:
    from shard_server.server import ShardServer

__all__ = ["ShardServer", "ShardServerConfig"]


def __getattr__(name: str) -> Any:
    # Lazy: `shard-server --help` must not pay for importing torch.
    if name == "ShardServer":
        from shard_server.server import ShardServer

        return ShardServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
