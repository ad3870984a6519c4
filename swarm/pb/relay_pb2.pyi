from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayHello(_message.Message):
    __slots__ = ("peer_id",)
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    def __init__(self, peer_id: _Optional[str] = ...) -> None: ...

class RelayAttached(_message.Message):
    __slots__ = ("address", "max_connections", "max_bytes_per_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    max_connections: int
    max_bytes_per_s: int
    def __init__(self, address: _Optional[str] = ..., max_connections: _Optional[int] = ..., max_bytes_per_s: _Optional[int] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("conn_id", "hello", "attached", "open", "data", "ack", "close")
    CONN_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    conn_id: int
    hello: RelayHello
    attached: RelayAttached
    open: bool
    data: bytes
    ack: int
    close: bool
    def __init__(self, conn_id: _Optional[int] = ..., hello: _Optional[_Union[RelayHello, _Mapping]] = ..., attached: _Optional[_Union[RelayAttached, _Mapping]] = ..., open: _Optional[bool] = ..., data: _Optional[bytes] = ..., ack: _Optional[int] = ..., close: _Optional[bool] = ...) -> None: ...
