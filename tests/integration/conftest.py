"""Fixtures shared by the in-process shard-server tests: each module defines its own `server` fixture (its
config, started with tests.servers.serve) and gets a gRPC stub to it from here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from shard_server import ShardServer
from swarm.net import open_channel
from swarm.pb import shard_pb2_grpc


@pytest_asyncio.fixture(scope="module")
async def stub(server: ShardServer) -> AsyncIterator[shard_pb2_grpc.ShardStub]:
    async with open_channel(server.address) as channel:
        yield shard_pb2_grpc.ShardStub(channel)
