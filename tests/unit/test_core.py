"""swarm core: block ranges, tensor wire format, records, error mapping over a real gRPC server, addresses,
model files."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch

from swarm import errors
from swarm.blocks import BlockRange, block_key
from swarm.errors import (
    BlocksNotServed,
    CacheExhausted,
    InvalidRequest,
    ModelMismatch,
    Overloaded,
    PollenError,
    SessionNotFound,
    from_rpc_error,
    map_errors,
)
from swarm.model_files import Checkpoint, ModelNotFound, config_fingerprint, default_model_id, resolve_model_path
from swarm.net import (
    channel_options,
    format_address,
    open_channel,
    parse_address,
    parse_addresses,
    server_options,
)
from swarm.pb import common_pb2
from swarm.records import MAX_RECORD_BYTES, ServerRecord, ServerState
from swarm.tensors import from_proto, to_proto


def test_block_range_parse_and_relations():
    r = BlockRange.parse("10:22")
    assert (r.start, r.end, len(r), str(r)) == (10, 22, 12, "10:22")
    assert 10 in r and 21 in r and 22 not in r
    assert r.covers(BlockRange(12, 20)) and not r.covers(BlockRange(0, 11))
    assert r.overlaps(BlockRange(21, 30)) and not r.overlaps(BlockRange(22, 30))
    for bad in ("4", "4:4", "5:2", "a:b", "-1:3", "1:2:3"):
        with pytest.raises(ValueError):
            BlockRange.parse(bad)
    assert block_key("llama", 3) == "llama.block.3"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_tensor_round_trip_every_dtype(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(dtype)
    back = from_proto(common_pb2.Tensor.FromString(to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    back.add_(1) if dtype not in (torch.bool,) else None  # writable: no shared read-only buffer


def test_tensor_empty_and_noncontiguous():
    assert from_proto(to_proto(torch.empty(0, 4))).shape == (0, 4)
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(from_proto(to_proto(t)), t)


def test_tensor_validation_names_the_problem():
    good = to_proto(torch.zeros(2, 3))
    truncated = common_pb2.Tensor(data=good.data[:-3], shape=good.shape, dtype=good.dtype)
    with pytest.raises(InvalidRequest, match="needs 24 bytes, got 21"):
        from_proto(truncated, "hidden")
    with pytest.raises(InvalidRequest, match="dtype"):
        from_proto(common_pb2.Tensor(data=good.data, shape=good.shape, dtype=0))
    with pytest.raises(InvalidRequest, match="negative"):
        from_proto(common_pb2.Tensor(data=b"", shape=[-1, 0], dtype=good.dtype))
    with pytest.raises(InvalidRequest, match="over the limit"):
        from_proto(common_pb2.Tensor(data=b"", shape=[1 << 20, 1 << 20], dtype=good.dtype))
    # empty, yet torch's strides for it would overflow int64 (found by the soak's fuzzer: INTERNAL before)
    with pytest.raises(InvalidRequest, match="over the limit"):
        from_proto(common_pb2.Tensor(data=b"", shape=[0, 1 << 40, 1 << 40], dtype=good.dtype))


def make_record(**kw):
    base = dict(peer_id="p1", address="127.0.0.1:5000", model_id="m", start=0, end=4)
    return ServerRecord(**{**base, **kw})


def test_record_round_trip_and_unknown_fields_ignored():
    rec = make_record(throughput_tps=12.5, state=ServerState.ONLINE)
    assert ServerRecord.decode(rec.encode()) == rec
    newer = json.loads(rec.encode())
    newer["field_from_the_future"] = {"x": 1}
    assert ServerRecord.decode(json.dumps(newer).encode()) == rec
    assert rec.blocks == BlockRange(0, 4)


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"{}",
        b'{"peer_id": "p", "address": "a:1", "model_id": "m", "start": 5, "end": 2}',
        b'{"peer_id": "p", "address": "a:1", "model_id": "m", "start": 0, "end": 2, "throughput_tps": -1}',
        b"x" * (MAX_RECORD_BYTES + 1),
    ],
)
def test_record_decode_rejects_garbage(data):
    assert ServerRecord.decode(data) is None


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(
    "exc", [InvalidRequest("bad shape"), BlocksNotServed("holds 0:2"), SessionNotFound("no s"), CacheExhausted("full")]
)
def test_error_mapping_round_trip(exc):
    back = from_rpc_error(FakeRpcError(exc.code, str(exc)), "127.0.0.1:1")
    assert type(back) is type(exc) and str(exc) in str(back) and "127.0.0.1:1" in str(back)
    assert back.retryable == exc.retryable


def test_unknown_status_is_retryable_pollen_error():
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(err) is PollenError and err.retryable


def test_error_class_metadata_is_trusted_only_with_its_own_status():
    forged = FakeRpcError(grpc.StatusCode.NOT_FOUND, "x", ((errors.ERROR_CLASS_KEY, "InvalidRequest"),))
    assert type(from_rpc_error(forged)) is SessionNotFound  # the status wins over a lying class name
    unknown = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", ((errors.ERROR_CLASS_KEY, "NoSuchError"),))
    assert type(from_rpc_error(unknown)) is CacheExhausted


# ---- map_errors on a real grpc.aio server: every error class crosses the wire as itself ----

ALL_ERRORS = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, PollenError) and cls is not PollenError
]
UNARY, STREAM = "/test.Errors/Unary", "/test.Errors/Stream"


class ErrorServicer:
    """Raw-bytes handlers: the request names what to do ("ok", "abort", "boom", "hang" or an error class)."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str]] = []
        self.hanging = asyncio.Event()

    def on_rpc_status(self, rpc: str, code: str) -> None:
        self.statuses.append((rpc, code))

    async def _act(self, what: str, context: grpc.aio.ServicerContext) -> None:
        if what == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the handler")
        if what == "boom":
            raise ValueError("a bug")
        if what == "hang":
            self.hanging.set()
            await asyncio.Event().wait()
        if what != "ok":
            raise getattr(errors, what)(f"raised {what}")

    @map_errors
    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._act(request.decode(), context)
        return b"fine"

    @map_errors
    async def Stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"  # an error after a reply has been streamed must still arrive as its class
        await self._act(request.decode(), context)
        yield b"second"


@pytest.fixture
async def error_server() -> AsyncIterator[tuple[ErrorServicer, grpc.aio.Channel]]:
    servicer = ErrorServicer()
    server = grpc.aio.server(options=server_options())
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.Unary),
        "Stream": grpc.unary_stream_rpc_method_handler(servicer.Stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Errors", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(format_address("127.0.0.1", port))
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await server.stop(None)


async def _unary(channel: grpc.aio.Channel, what: str) -> Any:
    return await channel.unary_unary(UNARY)(what.encode(), timeout=30)


async def _stream(channel: grpc.aio.Channel, what: str) -> list[bytes]:
    return [reply async for reply in channel.unary_stream(STREAM)(what.encode(), timeout=30)]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
async def test_every_error_class_crosses_the_wire(error_server, cls):
    servicer, channel = error_server
    for call in (_unary, _stream):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(channel, cls.__name__)
        back = from_rpc_error(info.value, "peer:1")
        assert info.value.code() == cls.code
        assert type(back) is cls, f"{cls.__name__} arrived as {type(back).__name__}"
        assert f"raised {cls.__name__}" in str(back) and back.retryable == cls.retryable
    assert servicer.statuses == [("Unary", cls.code.name), ("Stream", cls.code.name)]


async def test_model_mismatch_and_overloaded_keep_their_class(error_server):
    """They share a status with BlocksNotServed and CacheExhausted: only the metadata tells them apart."""
    _, channel = error_server
    for cls, twin in ((ModelMismatch, BlocksNotServed), (Overloaded, CacheExhausted)):
        assert cls.code == twin.code
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _unary(channel, cls.__name__)
        assert type(from_rpc_error(info.value)) is cls


async def test_ok_abort_and_unexpected_errors(error_server, caplog):
    servicer, channel = error_server
    assert await _unary(channel, "ok") == b"fine"
    assert await _stream(channel, "ok") == [b"first", b"second"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _unary(channel, "abort")  # the handler's own abort passes through untouched
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and info.value.details() == "aborted by the handler"
    with caplog.at_level(logging.ERROR, logger="swarm.errors"), pytest.raises(grpc.aio.AioRpcError) as info:
        await _stream(channel, "boom")
    assert info.value.code() == grpc.StatusCode.INTERNAL and "ValueError: a bug" in info.value.details()
    assert any(r.exc_info and "Stream failed" in r.getMessage() for r in caplog.records)  # traceback logged
    back = from_rpc_error(info.value)
    assert type(back) is PollenError and back.retryable
    assert servicer.statuses == [
        ("Unary", "OK"),
        ("Stream", "OK"),
        ("Unary", "PERMISSION_DENIED"),
        ("Stream", "INTERNAL"),
    ]


async def test_cancelled_stream_is_reported_and_not_turned_into_an_error(error_server):
    servicer, channel = error_server
    call = channel.unary_stream(STREAM)(b"hang", timeout=60)
    assert await call.read() == b"first"
    await servicer.hanging.wait()
    call.cancel()
    async with asyncio.timeout(60):  # a bound for a hung test, not a speed requirement
        while ("Stream", "CANCELLED") not in servicer.statuses:
            await asyncio.sleep(0.01)
    assert servicer.statuses == [("Stream", "CANCELLED")]


def test_map_errors_refuses_a_sync_handler():
    with pytest.raises(TypeError, match="async"):
        map_errors(lambda self, request, context: None)


# ---- addresses and channel options ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:31337", ("127.0.0.1", 31337)),
        ("localhost:1", ("localhost", 1)),
        ("dht-1.example.org:65535", ("dht-1.example.org", 65535)),
        ("[::1]:5000", ("::1", 5000)),
        (" [2001:db8::7]:80 ", ("2001:db8::7", 80)),
    ],
)
def test_parse_address_round_trip(text, expected):
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected
    assert format_address(*expected) == text.strip()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("::1:5000", "brackets"),
        ("2001:db8::7:80", "brackets"),
        ("host", "HOST:PORT"),
        (":5000", "HOST:PORT"),
        ("host:0", "1..65535"),
        ("host:70000", "1..65535"),
        ("host:http", "1..65535"),
        ("[::1]5000", "IPV6"),
        ("[not-v6]:5", "IPv6"),
        ("a b:5", "host name"),
        ("http://x:5", "host name"),
    ],
)
def test_parse_address_rejects_garbage_clearly(text, match):
    with pytest.raises(ValueError, match=match):
        parse_address(text)


def test_parse_addresses_lists_and_commas():
    assert parse_addresses("a:1, [::1]:2,,") == ["a:1", "[::1]:2"]
    assert parse_addresses(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    with pytest.raises(ValueError, match="b:x"):
        parse_addresses("a:1,b:x")


def test_client_and_server_agree_on_limits_and_pings():
    client, server = dict(channel_options(1 << 20)), dict(server_options(1 << 20))
    for key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert client[key] == server[key] == 1 << 20
    # the server must accept the client's keepalive pings, or it answers GOAWAY "too_many_pings"
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.enable_http_proxy"] == 0 and server["grpc.so_reuseport"] == 0


def test_model_files(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ModelNotFound, match="Hugging Face cache"):
        resolve_model_path("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model_path(tmp_path / "empty")
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": "x", "hidden_size": 8}))
    assert resolve_model_path(model) == model.resolve()
    assert default_model_id(model) == "my-model"
    assert default_model_id("org/name") == "org/name"
    fp = config_fingerprint(model)
    (model / "config.json").write_text(json.dumps({"hidden_size": 8, "model_type": "llama", "_name_or_path": "y"}))
    assert config_fingerprint(model) == fp  # volatile keys and key order do not matter
    with pytest.raises(ModelNotFound, match="safetensors"):
        Checkpoint(model)
