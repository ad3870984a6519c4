"""swarm.handlers: a servicer registered with add_servicer answers bytes that are not its request message with
INVALID_ARGUMENT (through map_errors: metadata, status hook, one log line); map_errors maps a DecodeError raised
inside a handler to INVALID_ARGUMENT too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from swarm.errors import ERROR_CLASS_KEY, map_errors
from swarm.handlers import add_servicer
from swarm.net import format_address, open_channel, server_options
from swarm.pb import dht_pb2, dht_pb2_grpc

DHT = dht_pb2.DESCRIPTOR.services_by_name["Dht"]


class FakeDht(dht_pb2_grpc.DhtServicer):
    def __init__(self) -> None:
        self.statuses: list[tuple[str, str]] = []

    def on_rpc_status(self, rpc: str, code: str) -> None:
        self.statuses.append((rpc, code))

    @map_errors
    async def Get(self, request: dht_pb2.GetRequest, context: grpc.aio.ServicerContext) -> dht_pb2.GetResponse:
        return dht_pb2.GetResponse(record=dht_pb2.Record(key=request.key))

    @map_errors
    async def Ping(self, request: dht_pb2.PingRequest, context: grpc.aio.ServicerContext) -> dht_pb2.PingResponse:
        dht_pb2.Record.FromString(b"\xff\xff")  # a nested payload that does not parse: DecodeError in the handler
        return dht_pb2.PingResponse()


@pytest.fixture
async def dht() -> AsyncIterator[tuple[FakeDht, grpc.aio.Channel]]:
    servicer = FakeDht()
    server = grpc.aio.server(options=server_options())
    add_servicer(server, servicer, DHT)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(format_address("127.0.0.1", port))
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await server.stop(None)


async def _raw(channel: grpc.aio.Channel, rpc: str, payload: bytes) -> Any:
    return await channel.unary_unary(f"/pollen.v1.Dht/{rpc}")(payload, timeout=30)


async def test_garbage_is_invalid_argument_then_good_calls_work(dht, caplog):
    servicer, channel = dht
    with caplog.at_level(logging.INFO, logger="swarm.errors"), pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw(channel, "Get", b"\x0a\x40short")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid pollen.v1.GetRequest message (7 bytes)" in (info.value.details() or "")
    assert (ERROR_CLASS_KEY, "InvalidRequest") in tuple(info.value.trailing_metadata() or ())
    assert servicer.statuses == [("Get", "INVALID_ARGUMENT")]
    lines = [r for r in caplog.records if "Get rejected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None

    reply = dht_pb2.GetResponse.FromString(await _raw(channel, "Get", dht_pb2.GetRequest(key="k").SerializeToString()))
    assert reply.record.key == "k"


async def test_decode_error_inside_a_handler_is_invalid_argument(dht):
    servicer, channel = dht
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await dht_pb2_grpc.DhtStub(channel).Ping(dht_pb2.PingRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid protobuf message" in (info.value.details() or "")
    assert servicer.statuses == [("Ping", "INVALID_ARGUMENT")]
