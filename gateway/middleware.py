"""Cross-cutting HTTP/WebSocket concerns as plain ASGI middleware: the access log, the request size limit and
API keys. Errors come back in the format of the API the path belongs to (OpenAI's under /v1, chat.petals.dev's
`{"ok": false, "traceback": ...}` elsewhere).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("gateway.access")

# Paths that generate text (and so need an API key when keys are configured); dashboards and metrics stay open.
PROTECTED_PREFIXES = ("/v1/", "/api/v1/generate", "/api/v2/generate")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The error body of the API `path` belongs to."""
    if is_openai_path(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 429:
            kind = "rate_limit_exceeded"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"ok": False, "traceback": message}
    return json.dumps(body).encode()


async def send_error(
    scope: Scope, send: Send, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> None:
    """An HTTP error response, or for a WebSocket handshake a denial response (close 1008 if the server
    cannot send one)."""
    body = error_body(scope["path"], status, message, code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        await send({"type": "websocket.http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One line per request: client, method, path (without the query: it may carry secrets), status, bytes
    sent, duration. WebSockets log when they close, with the close code and the frames each way."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.enabled:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 0, "bytes": 0, "frames_in": 0, "frames_out": 0, "close": 0}

        async def logged_send(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                state["status"] = message["status"]
            elif kind in ("http.response.body", "websocket.http.response.body"):
                state["bytes"] += len(message.get("body", b""))
            elif kind == "websocket.accept":
                state["status"] = 101
            elif kind == "websocket.send":
                state["frames_out"] += 1
                state["bytes"] += len(message.get("text") or message.get("bytes") or "")
            elif kind == "websocket.close":
                state["close"] = message.get("code", 1000)
                state["status"] = state["status"] or 403
            await send(message)

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                state["frames_in"] += 1
            elif message["type"] == "websocket.disconnect" and not state["close"]:
                state["close"] = message.get("code", 1000)
            return message

        try:
            await self.app(scope, counted_receive, logged_send)
        except BaseException:
            state["status"] = state["status"] or 500
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - t0) * 1000
            if scope["type"] == "http":
                access_log.info(
                    '%s "%s %s" %d %d %.1fms', client[0], scope["method"], scope["path"], state["status"],
                    state["bytes"], ms,
                )  # fmt: skip
            else:
                access_log.info(
                    '%s "WS %s" %d close=%d in=%d out=%d %d %.1fms', client[0], scope["path"], state["status"],
                    state["close"], state["frames_in"], state["frames_out"], state["bytes"], ms,
                )  # fmt: skip


class BodyLimit:
    """Refuse HTTP bodies over `max_bytes` with 413, before any handler parses them: a declared
    Content-Length is checked at once, a chunked body while it arrives (then replayed to the app)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = f"request body is over the {self.max_bytes}-byte limit"
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_error(scope, send, 400, "malformed Content-Length")
                    return
                if declared > self.max_bytes:
                    await send_error(scope, send, 413, too_big, "request_too_large")
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(scope, send, 413, too_big, "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the disconnect, as the server's receive does

        await self.app(scope, replay, send)


class ApiKeys:
    """`Authorization: Bearer KEY` on the generating endpoints, when keys are configured (401 otherwise)."""

    def __init__(self, app: ASGIApp, keys: frozenset[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.keys
            or scope["type"] not in ("http", "websocket")
            or not scope["path"].startswith(PROTECTED_PREFIXES)
            or (scope["type"] == "http" and scope["method"] == "OPTIONS")  # CORS preflights carry no credentials
        ):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        # compare with every key, in constant time per key, so timing tells nothing about a near miss
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            message = "invalid API key" if given else "missing API key: send the header 'Authorization: Bearer KEY'"
            await send_error(scope, send, 401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)
