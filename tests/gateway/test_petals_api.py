"""chat.petals.dev's protocol through a real gateway, with the `websockets` package and httpx as clients; every
output is checked against transformers' greedy generation on the same weights (decoded with special tokens, as
chat.petals.dev decodes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.gateway.conftest import MAX_LENGTH, GatewayProcess, GatewaySwarm, reference_greedy, reference_tokenizer

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
MODEL = "tiny-chat-a"


def ws_url(gateway: GatewayProcess) -> str:
    return gateway.url.replace("http://", "ws://") + "/api/v2/generate"


async def open_session(gateway: GatewayProcess, max_length: int = 96, model: str = MODEL) -> ClientConnection:
    ws = await connect(ws_url(gateway), additional_headers=gateway.headers)
    await ws.send(json.dumps({"type": "open_inference_session", "model": model, "max_length": max_length}))
    assert json.loads(await ws.recv()) == {"ok": True}
    return ws


async def ask(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "generate", **fields}))
    return dict(json.loads(await ws.recv()))


def decode(swarm: GatewaySwarm, ids: list[int]) -> str:
    return str(reference_tokenizer(swarm.model_a).decode(ids, skip_special_tokens=False))  # type: ignore[attr-defined]


def encode(swarm: GatewaySwarm, text: str, special: bool = True) -> list[int]:
    return list(reference_tokenizer(swarm.model_a)(text, add_special_tokens=special).input_ids)  # type: ignore[operator]


async def test_one_reply_holds_the_whole_output_and_the_session_continues(
    gateway: GatewayProcess, gateway_swarm: GatewaySwarm
) -> None:
    """Without stop_sequence one recv() gets everything; later messages continue the same server-side session,
    with new inputs or none: the tokens are transformers' greedy tokens on the whole conversation."""
    history: list[int] = []
    async with await open_session(gateway) as ws:
        for inputs, new in ((PROMPT, 10), ("", 5), (" hello world", 6)):
            if inputs:
                history += encode(gateway_swarm, inputs, special=not history)  # BOS (if any) opens the session only
            expected = reference_greedy(gateway_swarm.model_a, history, new)
            fields: dict[str, Any] = {"max_new_tokens": new}
            if inputs:
                fields["inputs"] = inputs
            reply = await ask(ws, **fields)
            assert reply == {"ok": True, "outputs": decode(gateway_swarm, expected), "stop": True,
                             "token_count": len(expected)}  # fmt: skip
            history += expected


async def test_stop_sequence_streams_a_reply_per_step(gateway: GatewayProcess, gateway_swarm: GatewaySwarm) -> None:
    """With stop_sequence: a reply per token (max_new_tokens=1, as the chat.petals.dev web client asks), never
    half a character, until the text ends with the stop sequence, which stays in the output."""
    prompt_ids = encode(gateway_swarm, PROMPT)
    ref = reference_greedy(gateway_swarm.model_a, prompt_ids, 40)
    text = decode(gateway_swarm, ref)
    # a short ASCII stop string that first appears a few characters in
    start = next(i for i in range(3, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isprintable()
                 and text.find(text[i : i + 2]) == i)  # fmt: skip
    stop = text[start : start + 2]
    async with await open_session(gateway) as ws:
        await ws.send(json.dumps({"type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": stop}))
        replies = []
        while not replies or not replies[-1]["stop"]:
            replies.append(json.loads(await ws.recv()))
    assert all(r["ok"] for r in replies) and [r["stop"] for r in replies] == [False] * (len(replies) - 1) + [True]
    assert "".join(r["outputs"] for r in replies) == text[: start + 2]
    used = 0
    for k, reply in enumerate(replies[:-1]):
        used += reply["token_count"]
        assert reply["token_count"] >= 1
        shown = "".join(r["outputs"] for r in replies[: k + 1])
        assert shown == decode(gateway_swarm, ref[:used]) and not shown.endswith("\ufffd")  # complete characters
    used += replies[-1]["token_count"]
    assert stop in decode(gateway_swarm, ref[:used]) and stop not in decode(gateway_swarm, ref[: used - 1])


async def test_extra_stop_sequence_ends_the_turn_as_the_stop_sequence(
    gateway: GatewayProcess, gateway_swarm: GatewaySwarm
) -> None:
    """An extra stop sequence ends the reply; the session then holds the regular stop sequence in place of the
    token that completed it (chat.petals.dev's rule), so the next turn continues from there."""
    prompt_ids = encode(gateway_swarm, PROMPT)
    ref = reference_greedy(gateway_swarm.model_a, prompt_ids, 30)
    text = decode(gateway_swarm, ref)
    extra = text[4:6]
    n = next(j for j in range(1, len(ref) + 1) if extra in decode(gateway_swarm, ref[:j]))
    stop_sequence = "\n\n"
    async with await open_session(gateway) as ws:
        await ws.send(json.dumps({"type": "generate", "inputs": PROMPT, "max_new_tokens": 4,
                                  "stop_sequence": stop_sequence, "extra_stop_sequences": [extra]}))  # fmt: skip
        replies = []
        while not replies or not replies[-1]["stop"]:
            replies.append(json.loads(await ws.recv()))
        out = "".join(r["outputs"] for r in replies)
        assert out.endswith(extra) and sum(r["token_count"] for r in replies) == n
        history = prompt_ids + ref[: n - 1] + encode(gateway_swarm, stop_sequence, special=False)
        expected = reference_greedy(gateway_swarm.model_a, history, 5)
        assert await ask(ws, max_new_tokens=5) == {
            "ok": True, "outputs": decode(gateway_swarm, expected), "stop": True, "token_count": len(expected)
        }  # fmt: skip


async def expect_error(ws: ClientConnection, match: str, code: int = 1008) -> None:
    reply = json.loads(await ws.recv())
    assert reply["ok"] is False and match in reply["traceback"], reply
    with pytest.raises(ConnectionClosed) as closed:
        await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_bad_input_closes_only_that_socket(gateway: GatewayProcess, gateway_swarm: GatewaySwarm) -> None:
    """Every mistake gets `{"ok": false, "traceback": ...}` and a close; a session opened before them all still
    generates, token-exact."""
    async with await open_session(gateway) as bystander:
        cases: list[tuple[Any, str]] = [
            ("not json", "not valid JSON"),
            ({"type": "generate", "inputs": "hi"}, "expected a message of type 'open_inference_session'"),
            ({"type": "open_inference_session", "model": "nope", "max_length": 8}, "not served"),
            ({"type": "open_inference_session", "model": MODEL}, "needs max_length"),
            ({"type": "open_inference_session", "model": MODEL, "max_length": 10**6}, "Maximum length exceeded"),
            ({"type": "open_inference_session", "model": MODEL, "max_length": "long"}, "'max_length' must be"),
        ]
        for message, match in cases:
            async with connect(ws_url(gateway), additional_headers=gateway.headers) as ws:
                await ws.send(message if isinstance(message, str) else json.dumps(message))
                await expect_error(ws, match)
        async with await open_session(gateway, max_length=16) as ws:
            await ws.send(json.dumps({"type": "generate", "inputs": PROMPT, "max_new_tokens": 100}))
            await expect_error(ws, "Maximum length exceeded")
        async with await open_session(gateway) as ws:
            await ws.send(json.dumps({"type": "generate", "inputs": PROMPT, "max_new_tokens": 2, "temperature": "hot"}))
            await expect_error(ws, "'temperature' must be")
        async with await open_session(gateway) as ws:
            await ws.send("x" * 70_000)  # over --max-request-bytes: the server closes with 1009 (message too big)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        expected = reference_greedy(gateway_swarm.model_a, encode(gateway_swarm, PROMPT), 6)
        reply = await ask(bystander, inputs=PROMPT, max_new_tokens=6)
        assert reply["outputs"] == decode(gateway_swarm, expected)


async def test_websocket_needs_the_api_key(gateway: GatewayProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(gateway), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401


async def test_client_leaving_mid_generation_frees_its_slot(gateway: GatewayProcess) -> None:
    """A client that disconnects while its reply streams: generation stops and the slot is free again."""
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        ws = await open_session(gateway, max_length=MAX_LENGTH)
        await ws.send(json.dumps({"type": "generate", "inputs": PROMPT, "max_new_tokens": 1, "stop_sequence": "@@@@"}))
        assert json.loads(await ws.recv())["ok"]
        assert (await http.get("/healthz")).json()["busy"] == 1
        await ws.close()
        for _ in range(200):  # the reader notices the close at once; the next token ends the turn
            if (await http.get("/healthz")).json()["busy"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await http.get("/healthz")).json()["busy"] == 0


@pytest.mark.parametrize("how", ["form", "query", "json"])
async def test_http_generate(gateway: GatewayProcess, gateway_swarm: GatewaySwarm, how: str) -> None:
    fields = {"model": MODEL, "inputs": PROMPT, "max_new_tokens": 8}
    expected = reference_greedy(gateway_swarm.model_a, encode(gateway_swarm, PROMPT), 8)
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        if how == "form":
            response = await http.post("/api/v1/generate", data=fields)
        elif how == "query":
            response = await http.post("/api/v1/generate", params=fields)
        else:
            response = await http.post("/api/v1/generate", json={**fields, "max_new_tokens": None, "max_length": 12})
            expected = reference_greedy(gateway_swarm.model_a, encode(gateway_swarm, PROMPT),
                                        12 - len(encode(gateway_swarm, PROMPT)))  # fmt: skip
    assert response.status_code == 200
    assert response.json() == {"ok": True, "outputs": decode(gateway_swarm, expected)}


async def test_http_generate_errors(gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.headers, timeout=60) as http:
        cases = [
            ({"model": MODEL, "max_new_tokens": 4}, 400, "'inputs'"),
            ({"model": MODEL, "inputs": PROMPT}, 400, "max_new_tokens or max_length"),
            ({"model": "nope", "inputs": PROMPT, "max_new_tokens": 4}, 404, "not served"),
            ({"model": MODEL, "inputs": PROMPT, "max_new_tokens": 4, "top_p": 7}, 400, "top_p"),
            ({"model": MODEL, "inputs": PROMPT, "max_new_tokens": 10**5}, 400, "Maximum length exceeded"),
        ]
        for fields, status, match in cases:
            response = await http.post("/api/v1/generate", data=fields)
            assert response.status_code == status, response.text
            body = response.json()
            assert body["ok"] is False and match in body["traceback"]
        response = await http.post("/api/v1/generate", content=b"{oops", headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["traceback"]
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        unauthorized = await anonymous.post("/api/v1/generate", data=cases[0][0])
    assert unauthorized.status_code == 401 and unauthorized.json()["ok"] is False
