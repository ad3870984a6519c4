"""Conversation (one server-side session across turns) in-process against the real swarm, token for token
against transformers on the whole conversation: continuing, re-rendered histories, interrupted steps,
replaced pending tokens, repetition penalty, length limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import torch

from client_sdk import AsyncSwarmClient
from gateway.conversation import Conversation, GenerationParams, LengthExceeded
from tests.gateway.conftest import GatewaySwarm, _reference_model, reference_greedy

pytestmark = pytest.mark.e2e

EOS = (2,)


@pytest.fixture
async def client(gateway_swarm: GatewaySwarm) -> AsyncIterator[AsyncSwarmClient]:
    async with AsyncSwarmClient([gateway_swarm.peers], gateway_swarm.model_a) as c:
        yield c


async def turn(conv: Conversation, n: int, **kwargs: object) -> list[int]:
    params = GenerationParams(max_new_tokens=n, eos_token_ids=EOS, **kwargs)  # type: ignore[arg-type]
    gen = conv.generate(params)
    async with contextlib.aclosing(gen):
        return [t async for t in gen]


async def test_turns_continue_one_session(client: AsyncSwarmClient, gateway_swarm: GatewaySwarm) -> None:
    model = gateway_swarm.model_a
    conv = Conversation(client, 96)
    try:
        history = [5, 17, 42, 99, 23]
        conv.append(history)
        out = await turn(conv, 6)
        assert out == reference_greedy(model, history, 6)
        session = conv.session
        history += out + [7, 8, 9]
        conv.append([7, 8, 9])
        out = await turn(conv, 6)
        assert out == reference_greedy(model, history, 6)
        history += out
        # a re-rendered history that keeps what the servers hold continues the same session
        history += [11, 12]
        conv.rewrite(history)
        out = await turn(conv, 5)
        assert out == reference_greedy(model, history, 5) and conv.session is session
        # one that changes an earlier token starts over (one prefill), still exact
        history = history[:3] + [100] + history[4:] + out + [13]
        conv.rewrite(history)
        out = await turn(conv, 5)
        assert out == reference_greedy(model, history, 5) and conv.session is not session
    finally:
        await conv.close()


async def test_interrupted_step_restarts_exactly(client: AsyncSwarmClient, gateway_swarm: GatewaySwarm) -> None:
    """A turn cancelled inside a step (a client gone, Ctrl-C) may leave some servers a token ahead: the next turn
    re-sends the conversation and the tokens are still transformers'."""
    conv = Conversation(client, 96)
    try:
        conv.append([5, 17, 42])
        task = asyncio.ensure_future(turn(conv, 50))
        while len(conv.ids) < 6:  # cancel mid-generation
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        history = list(conv.ids) + [9]
        conv.append([9])
        out = await turn(conv, 6)
        assert out == reference_greedy(gateway_swarm.model_a, history, 6)
    finally:
        await conv.close()


async def test_replace_pending_and_limits(client: AsyncSwarmClient, gateway_swarm: GatewaySwarm) -> None:
    conv = Conversation(client, 24)
    try:
        conv.append([5, 17, 42])
        first = await turn(conv, 4)
        conv.replace_pending([60, 61])  # the last generated token never reaches the servers
        out = await turn(conv, 4)
        assert out == reference_greedy(gateway_swarm.model_a, [5, 17, 42, *first[:-1], 60, 61], 4)
        with pytest.raises(LengthExceeded, match="Maximum length exceeded"):
            await turn(conv, 24)
        with pytest.raises(LengthExceeded):
            conv.append(list(range(30)))
    finally:
        await conv.close()


async def test_repetition_penalty_matches_transformers(client: AsyncSwarmClient, gateway_swarm: GatewaySwarm) -> None:
    conv = Conversation(client, 64)
    prompt = [5, 17, 42, 99, 23]
    try:
        conv.append(prompt)
        out = await turn(conv, 16, repetition_penalty=1.8)
    finally:
        await conv.close()
    _, model = _reference_model(str(gateway_swarm.model_a))
    x = torch.tensor([prompt])
    with torch.inference_mode():
        ref = model.generate(  # type: ignore[attr-defined]
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=16, repetition_penalty=1.8,
            pad_token_id=0,
        )  # fmt: skip
    assert out == ref[0, len(prompt) :].tolist()
    assert out != reference_greedy(gateway_swarm.model_a, prompt, 16)  # the penalty changed something
