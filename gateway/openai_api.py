"""OpenAI-compatible API: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, streamed as
server-sent events ending with `data: [DONE]` (usage last with `stream_options.include_usage`), errors as
`{"error": {"message", "type", "param", "code"}}`. Each request is one session, closed at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from gateway.conversation import Conversation, GenerationParams
from gateway.middleware import Receive, Scope, Send, error_body
from gateway.openai_schema import (
    BadParam,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    finish_reason,
    new_id,
    usage,
    usage_chunk,
)
from gateway.registry import ModelEntry
from gateway.service import Gateway, describe, http_status
from gateway.text import Piece, check_stops, generate_text

log = logging.getLogger(__name__)
router = APIRouter()

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def error_response(exc: BaseException, path: str) -> Response:
    """The OpenAI error object for `exc`, with its status."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        body = error_body(path, 400, f"{param}: {err['msg']}" if param else err["msg"], None, param)
        return Response(body, 400, media_type="application/json")
    status, code = http_status(exc)
    param = exc.param if isinstance(exc, BadParam) else None
    (log.warning if status >= 500 else log.info)("%s failed: %s", path, describe(exc))
    return Response(error_body(path, status, str(exc), code, param), status, media_type="application/json")


@dataclass
class Job:
    """A validated request: the model, the prompt ids, how to generate."""

    entry: ModelEntry
    ids: list[int]
    params: GenerationParams
    stops: list[str]
    echo: str = ""

    @property
    def max_length(self) -> int:
        return len(self.ids) + self.params.max_new_tokens


def _job(gw: Gateway, req: SamplingFields, entry: ModelEntry, ids: list[int], wanted: int | None, default: int) -> Job:
    limit = gw.max_length(entry)
    new = wanted if wanted is not None else max(default, 0)
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if not ids:
        raise BadParam("the prompt is empty", param)
    if len(ids) + new > limit:
        raise BadParam(
            f"This model's maximum context length is {limit} tokens. However, you requested {len(ids) + new} "
            f"tokens ({len(ids)} in the prompt, {new} in the completion). Please reduce the length of the prompt "
            "or completion.",
            param,
            "context_length_exceeded",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    params = GenerationParams(
        max_new_tokens=new,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=max(req.top_k or 0, 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        min_new_tokens=req.min_tokens or 0,
        seed=None if req.seed is None else req.seed % 2**63,
        eos_token_ids=entry.eos_token_ids,
    )
    return Job(entry, ids, params, check_stops(req.stops))


def _chat_job(gw: Gateway, req: ChatRequest) -> Job:
    req.check()
    entry = gw.model(req.model)
    try:
        ids = entry.tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise BadParam(f"the model's chat template refused the messages: {e}", "messages") from None
    except ValueError as e:  # no chat template
        raise BadParam(str(e), "messages") from None
    return _job(gw, req, entry, ids, req.wanted_tokens, gw.max_length(entry) - len(ids))


def _completion_job(gw: Gateway, req: CompletionRequest) -> Job:
    req.check()
    entry = gw.model(req.model)
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        ids = entry.tokenizer.encode(prompt)
        echo = prompt
    else:
        vocab = entry.client.local.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise BadParam(f"token ids must be in [0, {vocab})", "prompt")
        ids = prompt
        echo = entry.tokenizer.decode(prompt) if req.echo else ""
    job = _job(gw, req, entry, ids, req.max_tokens, DEFAULT_COMPLETION_TOKENS)
    job.echo = echo if req.echo else ""
    return job


class EventStream(Response):
    """Server-sent events from an async generator of JSON objects, then `data: [DONE]`. Stops generating as
    soon as the client disconnects, and always runs `cleanup` (the session and the concurrency slot)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[dict[str, Any], None], cleanup: Callable[[], Awaitable[Any]]) -> None:
        super().__init__()
        self.events = events
        self.cleanup = cleanup
        # no content-length: the body is as long as the generation
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        producer = asyncio.create_task(self._produce(send))
        watcher = asyncio.create_task(self._wait_disconnect(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and not producer.done():
                log.info("client disconnected from a stream: generation stopped")
        finally:
            for task in (producer, watcher):
                task.cancel()
            results = await asyncio.gather(producer, watcher, return_exceptions=True)
            await self.cleanup()
        if isinstance(results[0], Exception) and not isinstance(results[0], OSError):
            log.error("event stream failed", exc_info=results[0])

    async def _produce(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with contextlib.aclosing(self.events):
            async for event in self.events:
                data = b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


async def _run(gw: Gateway, job: Job, conv: Conversation, t0: float) -> AsyncGenerator[Piece, None]:
    """The job's pieces, with metrics."""
    name = job.entry.name
    gw.metrics.prompt_tokens.labels(name).inc(len(job.ids))
    first = True
    pieces = generate_text(conv, job.params, job.entry.tokenizer, job.stops, keep_stop=False)
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if first and piece.tokens:
                gw.metrics.ttft.labels(name).observe(time.perf_counter() - t0)
                first = False
            gw.metrics.generated_tokens.labels(name).inc(piece.tokens)
            yield piece


async def _respond(
    request: Request, api: str, make_job: Callable[[Gateway, Any], Job], model: type[SamplingFields]
) -> Response:
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    chat = api == "openai_chat"
    try:
        req = model.model_validate_json(await request.body())
        job = make_job(gw, req)
        if req.stream:
            return await _stream(gw, job, req.include_usage, chat, api, t0)
        with gw.slot():
            async with gw.conversation(job.entry, job.max_length) as conv:
                conv.append(job.ids)
                text, count, finish = [job.echo], 0, None
                async for piece in _run(gw, job, conv, t0):
                    text.append(piece.text)
                    count += piece.tokens
                    finish = piece.finish
        use = usage(len(job.ids), count)
        build = chat_response if chat else completion_response
        gw.metrics.requests.labels(api, "ok").inc()
        gw.metrics.duration.labels(api).observe(time.perf_counter() - t0)
        return JSONResponse(build(new_id("chatcmpl" if chat else "cmpl"), job.entry.name, "".join(text),
                                  finish_reason(finish) or "length", use))  # fmt: skip
    except Exception as e:  # noqa: BLE001 — every failure becomes an OpenAI error object
        status = 400 if isinstance(e, ValidationError) else http_status(e)[0]
        gw.metrics.requests.labels(api, str(status)).inc()
        return error_response(e, request.url.path)


async def _stream(gw: Gateway, job: Job, include_usage: bool, chat: bool, api: str, t0: float) -> Response:
    """Admit the request and open its session before answering 200, so that 429, 503 and friends arrive
    as HTTP statuses; then stream."""
    stack = contextlib.AsyncExitStack()
    try:
        stack.enter_context(gw.slot())
        conv = await stack.enter_async_context(gw.conversation(job.entry, job.max_length))
        conv.append(job.ids)
        await conv.open()
    except BaseException:
        await stack.aclose()
        raise
    cid, created, model = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), job.entry.name
    extra = {"usage": None} if include_usage else {}

    async def events() -> AsyncGenerator[dict[str, Any], None]:
        count = 0
        try:
            if chat:
                yield {**chat_chunk(cid, model, created, {"role": "assistant", "content": ""}, None), **extra}
            elif job.echo:
                yield {**completion_chunk(cid, model, created, job.echo, None), **extra}
            async for piece in _run(gw, job, conv, t0):
                count += piece.tokens
                finish = finish_reason(piece.finish)
                if chat:
                    if piece.text:
                        yield {**chat_chunk(cid, model, created, {"content": piece.text}, None), **extra}
                    if finish:
                        yield {**chat_chunk(cid, model, created, {}, finish), **extra}
                elif piece.text or finish:
                    yield {**completion_chunk(cid, model, created, piece.text, finish), **extra}
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield usage_chunk(cid, obj, model, created, usage(len(job.ids), count))
            gw.metrics.requests.labels(api, "ok").inc()
        except Exception as e:  # noqa: BLE001 — the status line is gone: the error travels as an event
            status, code = http_status(e)
            gw.metrics.requests.labels(api, str(status)).inc()
            log.warning("stream of %s failed: %s", api, describe(e))
            yield json.loads(error_body("/v1/", status, str(e), code))
        finally:
            gw.metrics.duration.labels(api).observe(time.perf_counter() - t0)

    return EventStream(events(), stack.aclose)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _respond(request, "openai_chat", _chat_job, ChatRequest)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _respond(request, "openai_completions", _completion_job, CompletionRequest)


def _model_card(gw: Gateway, entry: ModelEntry) -> dict[str, Any]:
    return {
        "id": entry.name,
        "object": "model",
        "created": int(gw.started_at),
        "owned_by": "pollen",
        "max_model_len": gw.max_length(entry),
    }


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    return JSONResponse({"object": "list", "data": [_model_card(gw, e) for e in gw.registry]})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        return JSONResponse(_model_card(gw, gw.model(model_id)))
    except Exception as e:  # noqa: BLE001 — unknown model: OpenAI's 404 object
        return error_response(e, request.url.path)
