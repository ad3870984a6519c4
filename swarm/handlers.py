"""Registering a Pollen servicer on a gRPC server so that a request which is not valid protobuf gets a clear
INVALID_ARGUMENT, like any other bad request, instead of UNKNOWN or INTERNAL with a traceback in the log.

grpcio deserializes a unary request before the handler runs, and raises the DecodeError in grpc's own code: the
caller gets UNKNOWN and the server logs a traceback. For a request stream the DecodeError comes out of
`context.read()` inside the handler and map_errors reports it as an unexpected error (INTERNAL). So the
deserializers registered here never raise: bytes that do not parse become an `Undecodable` marker, and the
handler wrapper turns the marker into `InvalidRequest` ("request is not a valid pollen.v1.X message: ...") where
the servicer would have seen it: before a unary method runs, or from `context.read()` / the request iterator of a
stream, which then ends with INVALID_ARGUMENT. The rejection goes through `map_errors` (one log line, the
`pollen-error` metadata, the servicer's `on_rpc_status` hook); the process and other calls are untouched.

Use `add_servicer(server, servicer, pb2_module.DESCRIPTOR.services_by_name["Name"])` instead of the generated
`add_NameServicer_to_server`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from swarm.errors import InvalidRequest, map_errors

MAX_DETAIL_CHARS = 200  # of the parser's message in the status: enough to say what is wrong, never the payload


@dataclass(frozen=True)
class Undecodable:
    """What a lenient deserializer returns for bytes that are not a valid `type_name` message."""

    type_name: str  # e.g. "pollen.v1.ForwardRequest"
    size: int  # bytes received
    reason: str  # the parser's message

    def error(self) -> InvalidRequest:
        return InvalidRequest(
            f"request is not a valid {self.type_name} message ({self.size} bytes): {self.reason[:MAX_DETAIL_CHARS]}"
        )


def lenient_deserializer(message: Descriptor) -> Callable[[bytes], Message | Undecodable]:
    """`Type.FromString`, except that bytes that do not parse give an `Undecodable` instead of raising."""
    cls = message_factory.GetMessageClass(message)
    type_name = message.full_name

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)  # type: ignore[no-any-return]
        except DecodeError as e:
            return Undecodable(type_name, len(data), str(e))

    return deserialize


class _CheckedContext:
    """The servicer's view of a streaming call's context: `read()` raises InvalidRequest on a message that did
    not parse; everything else is the real context's."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def read(self) -> Any:
        request = await self._context.read()
        if isinstance(request, Undecodable):
            raise request.error()
        return request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error()
        yield request


def _rejecter(rpc: str) -> Callable[[Any, Undecodable, grpc.aio.ServicerContext], Any]:
    """A map_errors-wrapped method named like the RPC that only raises the marker's InvalidRequest: the same
    log line, metadata and status hook as every other rejected request."""

    async def reject(self: Any, request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        raise request.error()

    reject.__name__ = reject.__qualname__ = rpc
    return map_errors(reject)


def _method_handler(servicer: object, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    behavior = getattr(servicer, method.name)
    reject = _rejecter(method.name)
    deserialize = lenient_deserializer(method.input_type)
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString

    if not method.client_streaming:
        if method.server_streaming and inspect.isasyncgenfunction(behavior):

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await reject(servicer, request, context)
                async for response in behavior(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await reject(servicer, request, context)  # raises: map_errors aborts the call
            return await behavior(request, context)

        if method.server_streaming:  # a coroutine writing its responses with context.write
            return grpc.unary_stream_rpc_method_handler(unary, deserialize, serialize)
        return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)

    handler = _request_stream_behavior(behavior)
    if method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(handler, deserialize, serialize)
    return grpc.stream_unary_rpc_method_handler(handler, deserialize, serialize)


def _request_stream_behavior(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """`behavior` with its request stream checked, of the same kind (grpc.aio runs a coroutine function, an
    async generator function and a plain function differently)."""
    if inspect.isasyncgenfunction(behavior):

        async def generate(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(_checked(requests), _CheckedContext(context)):
                yield response

        return generate

    async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_checked(requests), _CheckedContext(context))

    return run


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register `servicer` (an instance of the generated `NameServicer` with async methods wrapped in map_errors)
    for `service` with non-raising request deserializers (see the module docstring)."""
    handlers = {method.name: _method_handler(servicer, method) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
