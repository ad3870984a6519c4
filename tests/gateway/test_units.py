"""The gateway's pure parts, without a swarm: stop strings, UTF-8 hold-back, penalties (against transformers'
logits processors), the middleware stack (on a toy app through httpx), configuration and the terminal table."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from client_sdk.tokenizer import Tokenizer
from gateway.config import GatewayConfig, ModelSpec, read_api_keys
from gateway.conversation import GenerationParams, LengthExceeded, apply_penalties
from gateway.middleware import AccessLog, ApiKeys, BodyLimit
from gateway.openai_schema import BadParam, ChatRequest, CompletionRequest
from gateway.registry import UnknownModel
from gateway.service import Busy, http_status
from gateway.terminal import _ranges, render_state
from gateway.text import Piece, StopMatcher, check_stops, generate_text
from swarm.errors import InvalidRequest, MissingBlocks, StepTimeout
from tests.gateway.chat_model import make_tokenizer

# ---- stop strings ----------------------------------------------------------------------------------------


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    ("pieces", "stops", "keep", "expected"),
    [
        (["Hello", " wor", "ld", "!"], ["world"], False, ("Hello ", True)),
        (["Hello", " wor", "ld", "!"], ["world"], True, ("Hello world", True)),
        (["ab", "c##", "#d"], ["###"], True, ("abc###", True)),
        (["ab", "c##", "#d"], ["###"], False, ("abc", True)),
        (["a#", "#b"], ["###"], False, ("a##b", False)),  # a held-back partial match that did not complete
        (["xyz"], ["yz", "xy"], False, ("", True)),  # the stop that ends first wins
        (["one two"], [], False, ("one two", False)),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], keep: bool, expected: tuple[str, bool]) -> None:
    assert feed(StopMatcher(stops, keep), pieces) == expected


def test_stop_bounds() -> None:
    assert check_stops(["a", ""]) == ["a"]
    with pytest.raises(InvalidRequest):
        check_stops(["x"] * 17)
    with pytest.raises(InvalidRequest):
        check_stops(["x" * 300])


class ScriptedConversation:
    """Stands in for a Conversation: generate() yields fixed tokens."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    async def generate(self, params: GenerationParams) -> AsyncGenerator[int, None]:
        for t in self.tokens[: params.max_new_tokens]:
            yield t


async def pieces_of(
    tokens: list[int], stops: Sequence[str] = (), keep: bool = False, special: bool = True
) -> list[Piece]:
    tokenizer = Tokenizer(make_tokenizer(), {"eos_token": "<|im_end|>"})
    params = GenerationParams(max_new_tokens=len(tokens), eos_token_ids=(2,))
    gen = generate_text(ScriptedConversation(tokens), params, tokenizer, stops, keep, special)  # type: ignore[arg-type]
    async with contextlib.aclosing(gen):
        return [p async for p in gen]


async def test_pieces_never_split_a_character() -> None:
    tok = make_tokenizer()
    text = "日本 ok"
    byte_tokens = [tok.token_to_id(ch) for ch in _byte_level(text)]  # one token per UTF-8 byte
    pieces = await pieces_of(byte_tokens)
    assert "".join(p.text for p in pieces) == text
    assert all("\ufffd" not in p.text for p in pieces)
    assert [p.text for p in pieces[:2]] == ["日", "本"] and pieces[0].tokens == 3  # 3 bytes, one piece
    assert sum(p.tokens for p in pieces) == len(byte_tokens) and pieces[-1].finish == "length"


async def test_eos_ends_the_turn_with_its_text_when_asked() -> None:
    tok = make_tokenizer()
    ids = tok.encode("hello world").ids
    shown = await pieces_of([*ids, 2, *ids], special=False)
    assert "".join(p.text for p in shown) == "hello world<|im_end|>" and shown[-1].finish == "eos"
    hidden = await pieces_of([*ids, 2], special=True)
    assert "".join(p.text for p in hidden) == "hello world" and hidden[-1].finish == "eos"
    stopped = await pieces_of(ids, stops=["o w"])
    assert "".join(p.text for p in stopped) == "hell" and stopped[-1].finish == "stop" and stopped[-1].stop == "o w"


def _byte_level(text: str) -> list[str]:
    """The byte-level alphabet's character for each UTF-8 byte of `text` (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[b] for b in text.encode()]


# ---- penalties against transformers ----------------------------------------------------------------------


def test_repetition_penalty_is_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    history = [3, 7, 7, 12, 40]
    params = GenerationParams(max_new_tokens=1, repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    assert torch.equal(apply_penalties(logits, params, history, []), expected)


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(1, 8)
    params = GenerationParams(max_new_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, [1, 2, 3], [3, 3, 5])
    assert out[0].tolist() == [0, 0, 0, -1.0, 0, -0.75, 0, 0]


def test_generation_params_are_validated() -> None:
    for bad in ({"top_p": 0.0}, {"top_k": -1}, {"do_sample": True, "temperature": 0.0}, {"repetition_penalty": 0.0},
                {"presence_penalty": 3.0}, {"max_new_tokens": -1}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            GenerationParams(**{"max_new_tokens": 1, **bad})  # type: ignore[arg-type]


# ---- middleware on a toy app -----------------------------------------------------------------------------


def toy_app(keys: frozenset[str] = frozenset(), max_bytes: int = 100) -> Any:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo_openai(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body)

    @app.post("/api/v1/generate")
    async def echo_petals(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body)

    @app.get("/")
    async def page() -> JSONResponse:
        return JSONResponse({"page": True})

    return AccessLog(ApiKeys(BodyLimit(app, max_bytes), keys))


async def test_middleware(caplog: pytest.LogCaptureFixture) -> None:
    transport = httpx.ASGITransport(app=toy_app(frozenset({"k1", "k2"})))
    async with httpx.AsyncClient(transport=transport, base_url="http://toy") as http:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            assert (await http.get("/")).status_code == 200  # the dashboard needs no key
            denied = await http.post("/v1/echo", json={"a": 1})
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
            assert denied.headers["www-authenticate"] == "Bearer"
            wrong = await http.post("/api/v1/generate", json={"a": 1}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json() == {"ok": False, "traceback": "invalid API key"}
            ok = await http.post("/v1/echo", json={"a": 1}, headers={"Authorization": "Bearer k2"})
            assert ok.status_code == 200 and ok.json() == {"a": 1}
            big = await http.post("/v1/echo", json={"a": "x" * 200}, headers={"Authorization": "Bearer k1"})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 5 and '"POST /v1/echo" 401' in lines[1] and '"POST /v1/echo" 413' in lines[4]
    assert all("k1" not in line and "k2" not in line for line in lines)


# ---- configuration, errors, schema, table ----------------------------------------------------------------


def test_api_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\nalpha\n\n  beta  \n")
    assert read_api_keys(path) == {"alpha", "beta"}
    path.write_text("# only comments\n")
    with pytest.raises(ValueError, match="no API keys"):
        read_api_keys(path)


def test_model_spec_and_config(tmp_path: Path) -> None:
    assert ModelSpec.parse("org/name") == ModelSpec("org/name")
    assert ModelSpec.parse("models/x=my-id") == ModelSpec("models/x", "my-id")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert ModelSpec.parse(str(odd)) == ModelSpec(str(odd))  # an existing path is never split
    with pytest.raises(ValueError):
        GatewayConfig(initial_peers=(), models=(ModelSpec("m"),))
    with pytest.raises(ValueError):
        GatewayConfig(initial_peers=("h:1",), models=(ModelSpec("m"),), max_concurrency=0)


def test_error_statuses() -> None:
    assert http_status(Busy("x"))[0] == 429
    assert http_status(UnknownModel("x")) == (404, "model_not_found")
    assert http_status(LengthExceeded("x")) == (400, "context_length_exceeded")
    assert http_status(BadParam("x", "n")) == (400, "invalid_request")
    assert http_status(MissingBlocks("x"))[0] == 503
    assert http_status(StepTimeout("x"))[0] == 504
    assert http_status(RuntimeError("x"))[0] == 500


def test_openai_requests() -> None:
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}], "max_completion_tokens": 5})  # fmt: skip
    chat.check()
    assert chat.chat() == [{"role": "system", "content": "be brief"}] and chat.wanted_tokens == 5
    with pytest.raises(BadParam) as n:
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}).check()
    assert n.value.param == "n"
    prompt = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2, 3]]})
    assert prompt.single_prompt() == [1, 2, 3]
    with pytest.raises(BadParam):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).single_prompt()


def test_render_state() -> None:
    row = {
        "short_peer_id": "abc…def", "address": "10.0.0.1:5000", "state": "online", "rtt_ms": 1.5,
        "span": {"start": 0, "end": 2, "server_info": {"quant_type": "nf4", "torch_dtype": "bfloat16",
                                                       "throughput": 12.34, "cache_tokens_left": 99,
                                                       "active_sessions": 3}},
    }  # fmt: skip
    state = {"bootstrap_states": ["online", "unreachable"], "model_reports": [{
        "name": "org/model", "state": "broken", "num_blocks": 4, "server_rows": [row],
        "block_coverage": [1, 1, 0, 0], "missing_blocks": [2, 3]}]}  # fmt: skip
    text = render_state(state)
    assert "dht-nodes online: 1 of 2" in text and "org/model  BROKEN  4 blocks, 1 online server" in text
    assert "servers per block: 11XX" in text and "no server holds blocks 2:4" in text
    assert "nf4" in text and "12.3" in text and "1.5 ms" in text
    assert _ranges([0, 1, 5, 7, 8]) == "0:2, 5:6, 7:9"
