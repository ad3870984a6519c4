"""chat.petals.dev's API, so its clients work unchanged: WebSocket `/api/v2/generate` (one server-side
session per connection, kept across `generate` messages) and HTTP `POST /api/v1/generate` (one-shot).

Differences from chat.petals.dev, all in the client's favour: errors carry a status (HTTP) or a close code
(WebSocket: 1008 bad request, 1013 busy, 1011 failure); BOS is added to the first input of a session only;
a reply also ends at EOS; text is decoded with the tokens before it (no lost leading spaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse

from gateway.conversation import Conversation, GenerationParams, LengthExceeded
from gateway.registry import ModelEntry
from gateway.service import Gateway, describe, http_status
from gateway.text import check_stops, generate_text
from swarm.errors import InvalidRequest

log = logging.getLogger(__name__)
router = APIRouter()

MAX_QUEUED_FRAMES = 16  # messages a client may send ahead of the replies


def _field(fields: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """A typed request field: JSON values as they are, form and query strings converted."""
    value = fields.get(name)
    if value is None or value == "":
        return default
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        pass
    raise InvalidRequest(f"field {name!r} must be {'a boolean' if kind is bool else f'of type {kind.__name__}'}")


def _params(fields: Mapping[str, Any], entry: ModelEntry, max_new_tokens: int) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        do_sample=_field(fields, "do_sample", bool, False),
        temperature=_field(fields, "temperature", float, 1.0),
        top_k=_field(fields, "top_k", int, 0),
        top_p=_field(fields, "top_p", float, 1.0),
        repetition_penalty=_field(fields, "repetition_penalty", float, 1.0),
        eos_token_ids=entry.eos_token_ids,
    )


def _wanted_tokens(fields: Mapping[str, Any], used: int, default: int) -> int:
    """max_new_tokens, or what max_length (total tokens of the session after this call) leaves after the `used`
    ones, or `default`."""
    new = _field(fields, "max_new_tokens", int)
    total = _field(fields, "max_length", int)
    if new is not None:
        if new < 0:
            raise InvalidRequest(f"max_new_tokens must be >= 0, got {new}")
        return new
    if total is not None:
        if total <= used:
            raise LengthExceeded(f"Maximum length exceeded: max_length {total} leaves no room after {used} tokens")
        return total - used
    return default


# ---- HTTP: POST /api/v1/generate ------------------------------------------------------------------------


async def _form_fields(request: Request) -> dict[str, Any]:
    """Query fields, overridden by form fields or a JSON object body."""
    fields: dict[str, Any] = dict(request.query_params)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        fields.update(body)
    elif ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        fields.update({k: v for k, v in form.items() if isinstance(v, str)})
    return fields


@router.post("/api/v1/generate")
async def http_generate(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    t0 = time.perf_counter()
    try:
        fields = await _form_fields(request)
        entry = gw.model(_field(fields, "model", str))
        inputs = _field(fields, "inputs", str)
        if not inputs:
            raise InvalidRequest("field 'inputs' (the prompt text) is required")
        if _field(fields, "max_new_tokens", int) is None and _field(fields, "max_length", int) is None:
            raise InvalidRequest("give max_new_tokens or max_length")
        ids = entry.tokenizer.encode(inputs)
        new = _wanted_tokens(fields, len(ids), 0)
        params = _params(fields, entry, new)
        with gw.slot():
            async with gw.conversation(entry, len(ids) + new) as conv:
                conv.append(ids)
                text, count = [], 0
                pieces = generate_text(conv, params, entry.tokenizer, skip_special_tokens=False)
                async with contextlib.aclosing(pieces):
                    async for piece in pieces:
                        if count == 0:
                            gw.metrics.ttft.labels(entry.name).observe(time.perf_counter() - t0)
                        text.append(piece.text)
                        count += piece.tokens
        gw.metrics.prompt_tokens.labels(entry.name).inc(len(ids))
        gw.metrics.generated_tokens.labels(entry.name).inc(count)
        gw.metrics.requests.labels("petals_http", "ok").inc()
        return JSONResponse({"ok": True, "outputs": "".join(text)})
    except Exception as e:  # noqa: BLE001 — every failure becomes the protocol's error reply
        status, _ = http_status(e)
        gw.metrics.requests.labels("petals_http", str(status)).inc()
        (log.warning if status >= 500 else log.info)("POST /api/v1/generate failed: %s", describe(e))
        return JSONResponse({"ok": False, "traceback": describe(e)}, status_code=status)
    finally:
        gw.metrics.duration.labels("petals_http").observe(time.perf_counter() - t0)


# ---- WebSocket: /api/v2/generate ------------------------------------------------------------------------


class FrameReader:
    """Reads the client's frames in the background, so a disconnect is noticed mid-generation (and the
    generation stopped) instead of at the next send. At most MAX_QUEUED_FRAMES wait unanswered."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        self.closed = False  # the client disconnected (or the connection broke)
        self.task = asyncio.create_task(self._run(), name="ws-reader")

    async def _run(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.closed = True
                    break
                if self.queue.qsize() >= MAX_QUEUED_FRAMES:
                    self.queue.put_nowait(InvalidRequest(f"more than {MAX_QUEUED_FRAMES} messages sent ahead"))
                    return
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                try:
                    frame = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self.queue.put_nowait(InvalidRequest(f"a message is not valid JSON: {e}"))
                    return
                if not isinstance(frame, dict):
                    self.queue.put_nowait(InvalidRequest("a message must be a JSON object"))
                    return
                self.queue.put_nowait(frame)
        except Exception as e:  # noqa: BLE001 — a broken connection ends the session like a disconnect
            log.debug("websocket read failed: %s", e)
            self.closed = True
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message; None once the client has gone. Raises InvalidRequest for garbage or idleness."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            raise InvalidRequest(f"Session expired: no message in {timeout_s:.0f} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _full(conv: Conversation) -> LengthExceeded:
    return LengthExceeded(f"Maximum length exceeded: the session holds {len(conv.ids)} of {conv.max_length} tokens")


def _expect(frame: Mapping[str, Any], kind: str) -> None:
    if frame.get("type") != kind:
        raise InvalidRequest(f"expected a message of type {kind!r}, got {frame.get('type')!r}")


@router.websocket("/api/v2/generate")
async def ws_generate(ws: WebSocket) -> None:
    gw: Gateway = ws.app.state.gateway
    await ws.accept()
    reader = FrameReader(ws)
    code = 1000
    try:
        frame = await reader.next(gw.config.ws_idle_timeout_s)
        if frame is None:
            return
        _expect(frame, "open_inference_session")
        entry = gw.model(_field(frame, "model", str))
        max_length = _field(frame, "max_length", int)
        if max_length is None:
            raise InvalidRequest("open_inference_session needs max_length (tokens the session may hold)")
        with gw.slot():
            async with gw.conversation(entry, max_length) as conv:
                await conv.open()
                await ws.send_json({"ok": True})
                while True:
                    frame = await reader.next(gw.config.ws_idle_timeout_s)
                    if frame is None:
                        return
                    _expect(frame, "generate")
                    if not await _ws_turn(gw, ws, reader, entry, conv, frame):
                        return
    except Exception as e:  # noqa: BLE001 — every failure becomes the protocol's error reply, then the close
        status, _ = http_status(e)
        code = 1013 if status in (429, 503) else 1008 if status < 500 else 1011
        (log.warning if status >= 500 else log.info)("websocket session failed: %s", describe(e))
        if not reader.closed:
            try:
                await ws.send_json({"ok": False, "traceback": describe(e)})
            except Exception:  # noqa: BLE001 — the client may be gone already
                pass
    finally:
        await reader.stop()
        if not reader.closed:
            try:
                await ws.close(code)
            except Exception:  # noqa: BLE001
                pass


async def _ws_turn(
    gw: Gateway, ws: WebSocket, reader: FrameReader, entry: ModelEntry, conv: Conversation, frame: Mapping[str, Any]
) -> bool:
    """One `generate` message: replies until the turn ends. False if the client went away meanwhile."""
    t0 = time.perf_counter()
    tok = entry.tokenizer
    inputs = _field(frame, "inputs", str, "")
    if inputs:
        ids = tok.encode(inputs, add_special_tokens=not conv.ids)  # BOS (if any) opens the session only
        conv.append(ids)
        gw.metrics.prompt_tokens.labels(entry.name).inc(len(ids))
    stop_sequence = _field(frame, "stop_sequence", str)
    extra = frame.get("extra_stop_sequences") or []
    if not isinstance(extra, list):
        raise InvalidRequest("extra_stop_sequences must be a list of strings")
    stops = check_stops(([stop_sequence] if stop_sequence else []) + extra)
    if stop_sequence:  # a reply every max_new_tokens tokens (1 by default) until a stop sequence or EOS
        step = _field(frame, "max_new_tokens", int, 1)
        if step < 1:
            raise InvalidRequest(f"max_new_tokens must be >= 1 with a stop_sequence, got {step}")
        total = _field(frame, "max_length", int)
        budget = min(conv.room, total - len(conv.ids)) if total is not None else conv.room
        if budget <= 0:
            raise LengthExceeded(
                f"Maximum length exceeded: the session holds {len(conv.ids)} of {conv.max_length} tokens"
            )
    else:  # one reply with the whole output
        step = budget = _wanted_tokens(frame, len(conv.ids), conv.room)
        if conv.room <= 0:
            raise LengthExceeded(
                f"Maximum length exceeded: the session holds {len(conv.ids)} of {conv.max_length} tokens"
            )
    params = _params(frame, entry, budget)
    text, tokens, first = "", 0, True
    pieces = generate_text(conv, params, tok, stops, keep_stop=True, skip_special_tokens=False)
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if reader.closed:
                return False  # the client left: stop generating for it (aclosing ends the turn cleanly)
            if first:
                gw.metrics.ttft.labels(entry.name).observe(time.perf_counter() - t0)
                first = False
            gw.metrics.generated_tokens.labels(entry.name).inc(piece.tokens)
            text, tokens = text + piece.text, tokens + piece.tokens
            if piece.finish is not None or (stop_sequence and tokens >= step):
                reply = {"ok": True, "outputs": text, "stop": piece.finish is not None, "token_count": tokens}
                await ws.send_json(reply)
                text, tokens = "", 0
            if piece.stop is not None and piece.stop != stop_sequence and stop_sequence:
                # chat.petals.dev: a turn ended by an extra stop sequence continues as if the regular one ended it
                conv.replace_pending(tok.encode(stop_sequence, add_special_tokens=False))
    gw.metrics.requests.labels("petals_ws", "ok").inc()
    gw.metrics.duration.labels("petals_ws").observe(time.perf_counter() - t0)
    return True
