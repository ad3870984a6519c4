from swarm.pb import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PauseRequest(_message.Message):
    __slots__ = ("grace_s",)
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    def __init__(self, grace_s: _Optional[float] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminStatus(_message.Message):
    __slots__ = ("state", "peer_id", "model_id", "blocks", "address", "active_sessions", "rss_bytes", "weights_bytes", "kv_reserved_bytes", "device_allocated_bytes", "throughput_tps", "state_since_s", "changed", "message", "sessions_finished", "sessions_closed", "sessions_gone_ms", "transition_ms")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TPS_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_S_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_GONE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_MS_FIELD_NUMBER: _ClassVar[int]
    state: str
    peer_id: str
    model_id: str
    blocks: _common_pb2.BlockRange
    address: str
    active_sessions: int
    rss_bytes: int
    weights_bytes: int
    kv_reserved_bytes: int
    device_allocated_bytes: int
    throughput_tps: float
    state_since_s: float
    changed: bool
    message: str
    sessions_finished: int
    sessions_closed: int
    sessions_gone_ms: float
    transition_ms: float
    def __init__(self, state: _Optional[str] = ..., peer_id: _Optional[str] = ..., model_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.BlockRange, _Mapping]] = ..., address: _Optional[str] = ..., active_sessions: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., weights_bytes: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ..., device_allocated_bytes: _Optional[int] = ..., throughput_tps: _Optional[float] = ..., state_since_s: _Optional[float] = ..., changed: _Optional[bool] = ..., message: _Optional[str] = ..., sessions_finished: _Optional[int] = ..., sessions_closed: _Optional[int] = ..., sessions_gone_ms: _Optional[float] = ..., transition_ms: _Optional[float] = ...) -> None: ...
