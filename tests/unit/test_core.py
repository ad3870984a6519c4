"""swarm core: block ranges, tensor wire format, records, error mapping, model files."""

import json

import grpc
import pytest
import torch

from swarm.blocks import BlockRange, block_key
from swarm.errors import (
    BlocksNotServed,
    CacheExhausted,
    InvalidRequest,
    PollenError,
    SessionNotFound,
    from_rpc_error,
)
from swarm.model_files import Checkpoint, ModelNotFound, config_fingerprint, default_model_id, resolve_model_path
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
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


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
