"""A full cache need not turn newcomers away (issue 14 part 3), with real processes: a dht-node and two
shard-servers (blocks 0:2 and 2:4 of a tiny random Llama), each under the budget of the server load test (10
sessions of 32 tokens) and `--evict-idle-after 0.5`. Ten clients fill both caches, generate a few tokens and go
idle; a newcomer opens (the servers evict the session idle longest for it) and generates; then the ten continue,
the evicted ones replaying their history on their next step, while the newcomer keeps its session. Every output
equals transformers' greedy tokens, and no client banned a server for an eviction.

No sleeps: the newcomer's open itself waits (in the server) until a session has been idle long enough.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from client_sdk import AsyncSwarmClient
from client_sdk.session import InferenceSession
from tests.launcher import Proc, SwarmProcesses
from tests.reference import greedy_references

pytestmark = pytest.mark.e2e

MAX_LENGTH = 32
SESSIONS_IN_BUDGET = 10  # as tests/integration/test_server_load.py: cache_tokens = 10 x 32
PROMPT_LEN = 8
NEW_TOKENS = MAX_LENGTH - PROMPT_LEN  # each session reserves exactly MAX_LENGTH tokens
BEFORE_IDLE = 3  # tokens each of the ten generates before going idle


@dataclass
class Swarm:
    procs: SwarmProcesses
    dht: Proc
    servers: list[Proc]
    model: Path


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    budget = ["--cache-tokens", str(SESSIONS_IN_BUDGET * MAX_LENGTH), "--inference-max-length", str(MAX_LENGTH)]
    flags = [*budget, "--evict-idle-after", "0.5", "--alloc-timeout", "60", "--throughput", "100"]
    try:
        dht = procs.start_dht()
        servers = procs.start_servers(tiny_llama, ("0:2", "2:4"), [dht.address], *flags)
        yield Swarm(procs, dht, servers, tiny_llama)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())  # the process logs explain most e2e failures
        procs.close()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(14)
    return [torch.randint(1, 128, (PROMPT_LEN,), generator=gen).tolist() for _ in range(SESSIONS_IN_BUDGET + 1)]


def greedy_reference(model_path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy_references(model_path, prompts, NEW_TOKENS)


class User:
    """One generation driven token by token (greedy), so that it can pause between tokens."""

    def __init__(self, client: AsyncSwarmClient, prompt: list[int]) -> None:
        self.client = client
        self.feed = torch.tensor([prompt])  # [1, new tokens]
        self.tokens: list[int] = []
        self.session: InferenceSession | None = None

    async def open(self) -> None:
        self.session = await self.client.open_session(MAX_LENGTH)

    async def generate(self, until: int) -> None:
        assert self.session is not None
        while len(self.tokens) < until:
            logits = (await self.client.next_logits(self.session, self.feed)).clone()  # [1, vocab]
            logits[:, self.client.local.eos_token_ids] = float("-inf")  # as the reference's min_new_tokens
            token = int(logits.argmax(-1))
            self.tokens.append(token)
            self.feed = torch.tensor([[token]])

    def evictions(self) -> int:
        assert self.session is not None
        return sum("evicted" in f.error for f in self.session.failovers)


def test_newcomer_to_full_caches_is_served_and_evicted_clients_stay_exact(swarm: Swarm) -> None:
    all_prompts = prompts()
    reference = greedy_reference(swarm.model, all_prompts)

    async def run() -> tuple[list[User], User, set[str]]:
        async with AsyncSwarmClient([swarm.dht.address], swarm.model) as client:
            users = [User(client, p) for p in all_prompts[:SESSIONS_IN_BUDGET]]
            for user in users:  # one after the other: the first is the session idle longest on both servers
                await user.open()
                await user.generate(BEFORE_IDLE)
            newcomer = User(client, all_prompts[-1])
            await newcomer.open()  # both caches are full: each server evicts its session idle longest
            await newcomer.generate(NEW_TOKENS)
            await asyncio.gather(*(user.generate(NEW_TOKENS) for user in users))
            sessions = [u.session for u in (*users, newcomer)]
            await asyncio.gather(*(s.close() for s in sessions if s is not None))
            return users, newcomer, client.view.banned()

    users, newcomer, banned = asyncio.run(run())
    assert newcomer.tokens == reference[-1]
    assert [u.tokens for u in users] == reference[:SESSIONS_IN_BUDGET]
    assert users[0].evictions() >= 1 and newcomer.evictions() == 0
    assert banned == set()
    for server in swarm.servers:
        assert "evicted after" in server.log(), server.name
    replays = sum(u.evictions() for u in users)
    print(f"{replays} replays after evictions, all {len(users) + 1} generations exact")
