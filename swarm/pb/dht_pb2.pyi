from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubkeyValue(_message.Message):
    __slots__ = ("subkey", "value", "expiration", "public_key", "signature")
    SUBKEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    subkey: str
    value: bytes
    expiration: float
    public_key: bytes
    signature: bytes
    def __init__(self, subkey: _Optional[str] = ..., value: _Optional[bytes] = ..., expiration: _Optional[float] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("key", "items")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    key: str
    items: _containers.RepeatedCompositeFieldContainer[SubkeyValue]
    def __init__(self, key: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SubkeyValue, _Mapping]]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "replicas")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    replicas: int
    def __init__(self, stored: _Optional[bool] = ..., replicas: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("key", "items")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    key: str
    items: _containers.RepeatedCompositeFieldContainer[SubkeyValue]
    def __init__(self, key: _Optional[str] = ..., items: _Optional[_Iterable[_Union[SubkeyValue, _Mapping]]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: Record
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("node_id", "address", "peers", "version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    peers: int
    version: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., peers: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class SpeedTestRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class SpeedTestResponse(_message.Message):
    __slots__ = ("received_bytes", "payload")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    payload: bytes
    def __init__(self, received_bytes: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class CheckReachableRequest(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class CheckReachableResponse(_message.Message):
    __slots__ = ("reachable", "observed_address", "error")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    observed_address: str
    error: str
    def __init__(self, reachable: _Optional[bool] = ..., observed_address: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
