"""The official `openai` package pointed at the gateway, unchanged: models, chat and text completions, streamed
and not, with stop strings, usage and seeds; errors in OpenAI's format. Outputs are compared with transformers'
greedy generation on the same weights (decoded without special tokens, as OpenAI's APIs return text)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import API_KEY, MAX_LENGTH, GatewayProcess, GatewaySwarm, reference_greedy
from tests.gateway.conftest import reference_tokenizer as ref_tok

pytestmark = pytest.mark.e2e

MODEL = "tiny-chat-a"
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture
async def client(gateway: GatewayProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def chat_ids(swarm: GatewaySwarm, messages: list[dict[str, str]]) -> list[int]:
    tok: Any = ref_tok(swarm.model_a)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def text_of(swarm: GatewaySwarm, ids: list[int]) -> str:
    return str(ref_tok(swarm.model_a).decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


def finish_of(ids: list[int], max_tokens: int) -> str:
    return "stop" if ids and ids[-1] == 2 else "length" if len(ids) == max_tokens else "stop"


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat-a", "tiny-chat-b"]
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "pollen"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


async def test_chat_completion_matches_transformers(client: openai.AsyncOpenAI, gateway_swarm: GatewaySwarm) -> None:
    ids = chat_ids(gateway_swarm, MESSAGES)
    ref = reference_greedy(gateway_swarm.model_a, ids, 12)
    reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text_of(gateway_swarm, ref)
    assert choice.finish_reason == finish_of(ref, 12)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(ref))
    assert reply.usage.total_tokens == len(ids) + len(ref)


async def test_chat_stream_with_usage(client: openai.AsyncOpenAI, gateway_swarm: GatewaySwarm) -> None:
    ids = chat_ids(gateway_swarm, MESSAGES)
    ref = reference_greedy(gateway_swarm.model_a, ids, 12)
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]  # ends at `data: [DONE]`
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text_of(gateway_swarm, ref)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish_of(ref, 12)]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ids), len(ref))
    assert all(c.usage is None for c in chunks[:-1])


async def test_completion_stops_before_the_stop_string(client: openai.AsyncOpenAI, gateway_swarm: GatewaySwarm) -> None:
    tok: Any = ref_tok(gateway_swarm.model_a)
    prompt = "Once upon a time"
    ref = reference_greedy(gateway_swarm.model_a, list(tok(prompt).input_ids), 30)
    text = text_of(gateway_swarm, ref)
    start = next(i for i in range(4, len(text) - 2) if text[i : i + 2].isascii() and text.find(text[i : i + 2]) == i)
    stop = text[start : start + 2]
    reply = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].text == text[:start] and reply.choices[0].finish_reason == "stop"
    stream = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == text[:start]
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.object == "text_completion" for c in chunks)
    # default max_tokens is 16, as OpenAI's; token ids work as a prompt; echo repeats the prompt
    short = await client.completions.create(model=MODEL, prompt=list(tok(prompt).input_ids), temperature=0, echo=True)
    ref16 = reference_greedy(gateway_swarm.model_a, list(tok(prompt).input_ids), 16)
    assert short.choices[0].text == prompt + text_of(gateway_swarm, ref16)
    assert short.usage is not None and short.usage.completion_tokens == len(ref16)


async def test_seeded_sampling_repeats(client: openai.AsyncOpenAI) -> None:
    async def sample(seed: int) -> str:
        reply = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
        )
        return reply.choices[0].text

    first = await sample(11)
    assert first == await sample(11)
    assert first != await sample(12)  # 16 draws over a near-uniform 320-token vocabulary


async def test_errors_in_openai_format(client: openai.AsyncOpenAI, gateway: GatewayProcess) -> None:
    async def bad_request(**kwargs: Any) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(
                **{"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **kwargs}  # type: ignore[arg-type]
            )
        return error.value

    assert (await bad_request(n=2)).param == "n"
    too_long = await bad_request(max_tokens=MAX_LENGTH)
    assert too_long.code == "context_length_exceeded" and "maximum context length" in too_long.message
    assert (await bad_request(temperature=3)).param == "temperature"
    assert (await bad_request(tools=[{"type": "function", "function": {"name": "f"}}])).param == "tools"
    assert (await bad_request(messages=[])).param == "messages"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError) as denied:
            await intruder.models.list()
    assert denied.value.code == "invalid_api_key"
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers) as http:
        response = await http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["type"] == "invalid_request_error"
        missing_route = await http.get("/v1/nothing-here")
        assert missing_route.status_code == 404 and "error" in missing_route.json()
