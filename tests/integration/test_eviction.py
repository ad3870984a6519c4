"""Eviction of idle sessions for a newcomer (issue 14 part 3), an in-process server and the client's
InferenceSession: under the budget of the server load test (10 sessions of 32 tokens), a newcomer to a full cache
is served by evicting the session idle longest; the evicted client replays on its next step on the same server
(never banned), whether the eviction came while it was between steps (its stream already ended when it writes)
or while its step was on the way; every output equals transformers' hidden states over the whole sequence.
Waits are on conditions (the stream's end, a session's last activity), never sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import LlamaForCausalLM

from client_sdk.routing import Span
from client_sdk.session import InferenceSession, SessionRouter
from client_sdk.transport import ChannelPool
from shard_server import ShardServer, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.errors import SessionEvicted
from tests.reference import pre_norm_hidden
from tests.servers import serve, wait_until

HIDDEN = 64
MAX_LENGTH = 32
SESSIONS_IN_BUDGET = 10  # as tests/integration/test_server_load.py
IDLE_S = 0.3  # --evict-idle-after here: short, and every wait for it is on a condition
EXACT = dict(atol=1e-4, rtol=0)


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama),
        blocks=BlockRange(0, 4),
        model_id="tiny",
        inference_max_length=MAX_LENGTH,
        cache_tokens=SESSIONS_IN_BUDGET * MAX_LENGTH,
        alloc_timeout_s=30.0,
        evict_idle_after_s=IDLE_S,
        throughput_tps=100.0,
        metrics_port=0,
    )
    async for srv in serve(config):
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


@pytest_asyncio.fixture
async def pool(server: ShardServer) -> AsyncIterator[ChannelPool]:
    pool = ChannelPool()
    yield pool
    await pool.close()
    await wait_until(lambda: server.cache.active_sessions == 0, "every session of the test to be released")


class Client:
    """Sessions on the one server, each with a router that sends it back there and records bans."""

    def __init__(self, server: ShardServer, pool: ChannelPool) -> None:
        record = server.live_record()
        assert record is not None
        self.span = Span(record.peer_id, server.address, 0, 4, record)
        self.pool = pool
        self.banned: list[str] = []
        self.sessions: list[InferenceSession] = []

    async def route(self, start: int, end: int) -> list[Span]:
        return [self.span]

    async def open(self) -> InferenceSession:
        router = SessionRouter(route=self.route, on_failure=self.banned.append)
        s = InferenceSession(self.pool, "tiny", [self.span], MAX_LENGTH, router=router, step_timeout_s=60)
        await s.open()
        self.sessions.append(s)
        return s

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions))


@pytest_asyncio.fixture
async def client(server: ShardServer, pool: ChannelPool) -> AsyncIterator[Client]:
    c = Client(server, pool)
    yield c
    await c.close()


class Tokens:
    """One session's input so far and the reference check of each step's output."""

    def __init__(self, session: InferenceSession, reference: LlamaForCausalLM, seed: int) -> None:
        self.session, self.reference = session, reference
        self.gen = torch.Generator().manual_seed(seed)
        self.inputs = torch.empty(1, 0, HIDDEN)

    async def step(self, tokens: int) -> None:
        x = torch.randn(1, tokens, HIDDEN, generator=self.gen)  # [1, tokens, hidden]
        self.inputs = torch.cat([self.inputs, x], dim=1)
        out = await self.session.step(x)
        torch.testing.assert_close(out, pre_norm_hidden(self.reference, self.inputs)[:, -tokens:], **EXACT)


def server_session(server: ShardServer, s: InferenceSession) -> object:
    return next(x for x in server.cache.sessions if x.session_id == s.session_id)


async def fill(client: Client, server: ShardServer) -> None:
    """Open sessions (no steps) until the cache budget is full."""
    while server.cache.tokens_left >= MAX_LENGTH:
        await client.open()
    assert server.cache.active_sessions == SESSIONS_IN_BUDGET


async def test_newcomer_evicts_the_idle_session_which_replays_at_its_next_step(
    server: ShardServer, client: Client, reference: LlamaForCausalLM
) -> None:
    before = server.cache.evictions
    old = Tokens(await client.open(), reference, seed=1)
    await old.step(8)
    await old.step(1)
    await fill(client, server)  # opened after old's last step: old is the session idle longest
    newcomer = Tokens(await client.open(), reference, seed=2)  # waits for old to be idle IDLE_S, evicts it
    assert server.cache.evictions == before + 1
    await newcomer.step(8)
    stream = old.session.streams[0]
    # Between steps: the client learns nothing until it writes, and then only that the stream is closed.
    await wait_until(lambda: stream.call.done(), "the evicted session's stream to end")
    await old.step(1)  # replays its 9 tokens on the same server (a reopen that evicts a filler) + 1 new
    await old.step(1)
    (failover,) = old.session.failovers
    assert "evicted" in failover.error and failover.replacement == [str(client.span)]
    assert client.banned == []  # not the server's fault
    assert server.cache.evictions == before + 2
    assert b"pollen_sessions_evicted_total 2.0" in server.metrics.render()


async def test_eviction_while_the_step_is_on_its_way(
    server: ShardServer, client: Client, reference: LlamaForCausalLM
) -> None:
    old = Tokens(await client.open(), reference, seed=3)
    await old.step(5)
    await fill(client, server)
    on_server = server_session(server, old.session)
    clock = server.cache.clock
    await wait_until(lambda: clock() - on_server.last_active >= IDLE_S, "the session to be idle long enough")  # type: ignore[attr-defined]
    stepping = asyncio.create_task(old.step(1))  # written once this test yields
    # An open that evicts runs to the end without yielding: the eviction happens before the step is written
    newcomer = await server.cache.open("newcomer", BlockRange(0, 4), MAX_LENGTH, 1)
    assert on_server.closed_as is SessionEvicted  # type: ignore[attr-defined]
    try:
        await stepping  # the stream ends under the step: it is replayed on a new session
        await old.step(2)
    finally:
        server.cache.release(newcomer)
    (failover,) = old.session.failovers
    assert "evicted" in failover.error and client.banned == []


def test_help_defends_the_default() -> None:
    from shard_server.cli import build_parser

    help_text = build_parser().format_help()
    assert "--evict-idle-after" in help_text and "(default: 60.0)" in help_text
    assert ShardServerConfig(model="m").evict_idle_after_s == 60.0
    with pytest.raises(ValueError, match="evict_idle_after_s"):
        ShardServerConfig(model="m", evict_idle_after_s=-1)
