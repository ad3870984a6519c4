"""OpenAI API request bodies (pydantic, with OpenAI's bounds) and the response objects, as vLLM shapes them.

Unknown fields are ignored (clients send many optional ones); fields whose meaning we cannot honour (n > 1,
logprobs, tools, JSON mode, suffix) are refused with a 400 naming the parameter rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from swarm.errors import InvalidRequest


class BadParam(InvalidRequest):
    """A 400 that names the offending parameter (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, code_name: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code_name = code_name


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields the two endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension; -1 or 0 = off
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=1.0, gt=0.0)  # vLLM's extension (transformers' rule)
    min_tokens: int | None = Field(default=0, ge=0)  # vLLM's extension
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    def check_common(self) -> None:
        if self.n not in (None, 1):
            raise BadParam("only n=1 is supported: one completion per request", "n")
        if self.logit_bias:
            raise BadParam("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise BadParam("stream_options is only allowed when stream is true", "stream_options")

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise BadParam(f"only text content parts are supported, got {part.type!r}", "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.logprobs or self.top_logprobs:
            raise BadParam("logprobs are not supported", "logprobs")
        if self.tools:
            raise BadParam("tools (function calling) are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise BadParam("only response_format {'type': 'text'} is supported", "response_format")

    def chat(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them ("developer" is the newer name of "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise BadParam("suffix (insertion) is not supported", "suffix")
        if self.logprobs:
            raise BadParam("logprobs are not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise BadParam("only best_of=1 is supported", "best_of")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids (a batch of prompts is refused)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise BadParam("prompt is empty", "prompt")
        items: list[Any] = list(p)
        if all(isinstance(x, int) for x in items):
            return [int(x) for x in items]
        if len(items) != 1:
            raise BadParam("one prompt per request (batches of prompts are not supported)", "prompt")
        only = items[0]
        return only if isinstance(only, str) else [int(x) for x in only]


# ---- responses -------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(finish: str | None) -> str | None:
    """Pieces end with "stop", "eos" or "length"; OpenAI says "stop" for both of the first two."""
    return None if finish is None else "length" if finish == "length" else "stop"


def chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(cid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(cid: str, obj: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def chat_response(cid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def completion_response(cid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": use,
    }
