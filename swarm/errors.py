"""Pollen's error tree, classified by what the caller should do, and its mapping to gRPC status codes.

Servers raise these; one decorator in each servicer turns them into a status with a clear message.
Clients turn `grpc.aio.AioRpcError` back into the same classes with `from_rpc_error`.
"""

from __future__ import annotations

import grpc


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


class CacheExhausted(PollenError):
    """No room for the KV cache or the request is over a server limit."""

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


def from_rpc_error(err: grpc.RpcError, peer: str = "") -> PollenError:
    """Turn a gRPC error from a peer into the matching PollenError (INTERNAL → retryable PollenError)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    where = f" from {peer}" if peer else ""
    cls = _BY_CODE.get(code)
    if cls is None:
        exc = PollenError(f"{code.name}{where}: {details}")
        exc.retryable = True  # INTERNAL/UNKNOWN: retry once elsewhere
        return exc
    return cls(f"{code.name}{where}: {details}")
