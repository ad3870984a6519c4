"""In-process shard servers for integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shard_server import ShardServer, ShardServerConfig

START_STOP_TIMEOUT_S = 30


async def serve(config: ShardServerConfig) -> AsyncIterator[ShardServer]:
    """Start an in-process server, yield it, stop it (for module fixtures: `async for s in serve(cfg): yield s`)."""
    srv = ShardServer(config)
    await asyncio.wait_for(srv.start(), START_STOP_TIMEOUT_S)
    try:
        yield srv
    finally:
        await asyncio.wait_for(srv.stop(), START_STOP_TIMEOUT_S)
