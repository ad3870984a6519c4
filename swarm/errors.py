"""Pollen's error tree, classified by what the caller should do, and its mapping to gRPC status codes.

Servers raise these; `map_errors` on every servicer method turns them into a status with a clear message and
the class name in the trailing metadata key `pollen-error`. Clients turn `grpc.aio.AioRpcError` back into the
same class with `from_rpc_error` (ModelMismatch stays ModelMismatch though it shares its status code).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

ERROR_CLASS_KEY = "pollen-error"  # trailing metadata key naming the PollenError subclass


class PollenError(Exception):
    """Base class. `retryable` tells a client whether another attempt (maybe elsewhere) can succeed."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    retryable: bool = False


class InvalidRequest(PollenError):
    """Wrong shape, dtype, size or position: the request itself is bad; never retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BlocksNotServed(PollenError):
    """The server does not hold the requested blocks (a stale route): refresh and reroute."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    retryable = True


class ModelMismatch(PollenError):
    """The server serves another model than the one asked for."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    retryable = True


class SessionNotFound(PollenError):
    """Unknown, closed or evicted inference session: reopen and replay history."""

    code = grpc.StatusCode.NOT_FOUND
    retryable = True


class SessionEvicted(SessionNotFound):
    """The server freed this idle session's cache for a newcomer: not the server's fault (do not avoid it);
    reopen (there or elsewhere) and replay history. NOT_FOUND like SessionNotFound, so a client that does not
    know this class still reopens and replays."""


class CacheExhausted(PollenError):
    """No room for the KV cache or the request is over a server limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Overloaded(PollenError):
    """The server's queue is full right now (not its memory): try another server or back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class ServerDraining(PollenError):
    """The server is shutting down or otherwise unavailable: reroute now."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class StepTimeout(PollenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Unsupported(PollenError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(PollenError):
    code = grpc.StatusCode.UNAUTHENTICATED


class MissingBlocks(PollenError):
    """Client side: no live server holds some blocks of the model."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DhtUnavailable(PollenError):
    """Client side: none of the given dht-nodes answered."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


_BY_CODE: dict[grpc.StatusCode, type[PollenError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: BlocksNotServed,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CacheExhausted,
    grpc.StatusCode.UNAVAILABLE: ServerDraining,
    grpc.StatusCode.CANCELLED: ServerDraining,
    grpc.StatusCode.DEADLINE_EXCEEDED: StepTimeout,
    grpc.StatusCode.UNIMPLEMENTED: Unsupported,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def _subclasses(cls: type[PollenError]) -> dict[str, type[PollenError]]:
    """Every PollenError subclass by name, including those defined outside this module."""
    out: dict[str, type[PollenError]] = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        out.update(_subclasses(sub))
    return out


def _metadata_value(err: grpc.RpcError, key: str) -> str | None:
    trailing = getattr(err, "trailing_metadata", None)
    try:
        pairs = trailing() if callable(trailing) else None
    except Exception:  # noqa: BLE001 - a call without metadata (e.g. failed before it started)
        return None
    for k, v in pairs or ():
        if k == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return None


def error_class(code: grpc.StatusCode, name: str | None) -> type[PollenError] | None:
    """The PollenError class a status stands for: the named one if it exists and has this status (metadata
    from a peer is not trusted beyond that), else the default class of the code; None for INTERNAL & co."""
    if name:
        cls = _subclasses(PollenError).get(name)
        if cls is not None and cls.code == code:
            return cls
    return _BY_CODE.get(code)


def from_rpc_error(err: grpc.RpcError, peer: str = "") -> PollenError:
    """Turn a gRPC error from a peer into the matching PollenError (INTERNAL → retryable PollenError)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    where = f" from {peer}" if peer else ""
    message = f"{code.name}{where}: {details}"
    cls = error_class(code, _metadata_value(err, ERROR_CLASS_KEY))
    if cls is None:
        exc = PollenError(message)
        exc.retryable = True  # INTERNAL/UNKNOWN: retry once elsewhere
        return exc
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a subclass with another constructor: keep its status semantics
        return _BY_CODE.get(code, PollenError)(message)


# ---- the servicer side ----

H = TypeVar("H", bound=Callable[..., Any])


def map_errors(handler: H) -> H:
    """Wrap a grpc.aio servicer method (coroutine or async generator) so that every exception leaves as a
    clear status: PollenError → its code, its message and its class name in trailing metadata; an abort
    done by the handler itself passes through; cancellation is re-raised; anything else → INTERNAL with the
    traceback in this process's log. Calls `self.on_rpc_status(rpc_name, code_name)` after every call when
    the servicer defines it (metrics)."""
    rpc = handler.__name__

    def report(servicer: Any, code: str) -> None:
        hook = getattr(servicer, "on_rpc_status", None)
        if hook is not None:
            try:
                hook(rpc, code)
            except Exception:  # noqa: BLE001 - metrics must never turn a good reply into an error
                log.exception("on_rpc_status hook failed for %s", rpc)

    async def abort(servicer: Any, context: grpc.aio.ServicerContext, e: BaseException) -> None:
        if isinstance(e, grpc.aio.AbortError):
            report(servicer, _aborted_code(context))
            raise e  # the handler aborted on purpose: the status is already set
        if isinstance(e, DecodeError):  # a request that is not valid protobuf (swarm.handlers catches most first)
            e = InvalidRequest(f"request is not a valid protobuf message: {str(e)[:200]}")
        if isinstance(e, PollenError):
            report(servicer, e.code.name)
            log.info("%s rejected: %s %s", rpc, e.code.name, e)
            context.set_trailing_metadata(((ERROR_CLASS_KEY, type(e).__name__),))
            await context.abort(e.code, str(e))
        report(servicer, "INTERNAL")
        log.error("%s failed with an unexpected error", rpc, exc_info=e)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(e).__name__}: {e}"[:1000])

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in handler(self, request, context):
                    yield response
            except asyncio.CancelledError:
                report(self, "CANCELLED")
                raise
            except Exception as e:  # noqa: BLE001 - this is the one place errors become statuses
                await abort(self, context, e)
            else:
                report(self, "OK")

        return gen_wrapper  # type: ignore[return-value]

    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"map_errors wraps async servicer methods; {rpc} is neither a coroutine nor a generator")

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = await handler(self, request, context)
        except asyncio.CancelledError:
            report(self, "CANCELLED")
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place errors become statuses
            await abort(self, context, e)
            raise AssertionError("unreachable: context.abort raises") from e
        report(self, "OK")
        return result

    return wrapper  # type: ignore[return-value]


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: the code is not readable back
        return "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
