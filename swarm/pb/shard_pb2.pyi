from swarm.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("peer_id", "model_id", "blocks", "version", "dtype", "quant", "throughput_tps", "active_sessions", "cache_tokens_left", "inference_max_length", "state", "record_json", "adapters")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TPS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_LEFT_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    model_id: str
    blocks: _common_pb2.BlockRange
    version: str
    dtype: str
    quant: str
    throughput_tps: float
    active_sessions: int
    cache_tokens_left: int
    inference_max_length: int
    state: str
    record_json: bytes
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., model_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.BlockRange, _Mapping]] = ..., version: _Optional[str] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., throughput_tps: _Optional[float] = ..., active_sessions: _Optional[int] = ..., cache_tokens_left: _Optional[int] = ..., inference_max_length: _Optional[int] = ..., state: _Optional[str] = ..., record_json: _Optional[bytes] = ..., adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class LoraTensors(_message.Message):
    __slots__ = ("block", "module", "a", "b", "scaling")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    block: int
    module: str
    a: _common_pb2.Tensor
    b: _common_pb2.Tensor
    scaling: float
    def __init__(self, block: _Optional[int] = ..., module: _Optional[str] = ..., a: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., b: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scaling: _Optional[float] = ...) -> None: ...

class Tuning(_message.Message):
    __slots__ = ("prompts", "lora", "adapter")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    prompts: _common_pb2.Tensor
    lora: _containers.RepeatedCompositeFieldContainer[LoraTensors]
    adapter: str
    def __init__(self, prompts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., lora: _Optional[_Iterable[_Union[LoraTensors, _Mapping]]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "blocks", "hidden", "attention_mask", "request_id", "tuning")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TUNING_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    blocks: _common_pb2.BlockRange
    hidden: _common_pb2.Tensor
    attention_mask: _common_pb2.Tensor
    request_id: str
    tuning: Tuning
    def __init__(self, model_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.BlockRange, _Mapping]] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., tuning: _Optional[_Union[Tuning, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("request_id", "hidden")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    hidden: _common_pb2.Tensor
    def __init__(self, request_id: _Optional[str] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model_id", "blocks", "hidden", "grad_output", "attention_mask", "request_id", "tuning")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TUNING_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    blocks: _common_pb2.BlockRange
    hidden: _common_pb2.Tensor
    grad_output: _common_pb2.Tensor
    attention_mask: _common_pb2.Tensor
    request_id: str
    tuning: Tuning
    def __init__(self, model_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.BlockRange, _Mapping]] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., tuning: _Optional[_Union[Tuning, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("request_id", "grad_input", "grad_prompts", "grad_lora")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LORA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    grad_input: _common_pb2.Tensor
    grad_prompts: _common_pb2.Tensor
    grad_lora: _containers.RepeatedCompositeFieldContainer[LoraTensors]
    def __init__(self, request_id: _Optional[str] = ..., grad_input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grad_prompts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., grad_lora: _Optional[_Iterable[_Union[LoraTensors, _Mapping]]] = ...) -> None: ...

class InferenceOpen(_message.Message):
    __slots__ = ("model_id", "blocks", "max_length", "session_id", "batch_size", "tuning", "push_token")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TUNING_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    blocks: _common_pb2.BlockRange
    max_length: int
    session_id: str
    batch_size: int
    tuning: Tuning
    push_token: bytes
    def __init__(self, model_id: _Optional[str] = ..., blocks: _Optional[_Union[_common_pb2.BlockRange, _Mapping]] = ..., max_length: _Optional[int] = ..., session_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., tuning: _Optional[_Union[Tuning, _Mapping]] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class InferenceStepInput(_message.Message):
    __slots__ = ("step_id", "position", "hidden", "attention_mask", "hypo_ids", "next_servers", "prompts")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    HYPO_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SERVERS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    position: int
    hidden: _common_pb2.Tensor
    attention_mask: _common_pb2.Tensor
    hypo_ids: _common_pb2.Tensor
    next_servers: _containers.RepeatedCompositeFieldContainer[NextHop]
    prompts: _common_pb2.Tensor
    def __init__(self, step_id: _Optional[str] = ..., position: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., hypo_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., next_servers: _Optional[_Iterable[_Union[NextHop, _Mapping]]] = ..., prompts: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class NextHop(_message.Message):
    __slots__ = ("address", "session_id", "push_token")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    push_token: bytes
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("session_id", "step", "push_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: InferenceStepInput
    push_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[_Union[InferenceStepInput, _Mapping]] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushFailed(_message.Message):
    __slots__ = ("step_id", "error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    error: str
    def __init__(self, step_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: InferenceOpen
    step: InferenceStepInput
    def __init__(self, open: _Optional[_Union[InferenceOpen, _Mapping]] = ..., step: _Optional[_Union[InferenceStepInput, _Mapping]] = ...) -> None: ...

class InferenceOpened(_message.Message):
    __slots__ = ("session_id", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class InferenceStepOutput(_message.Message):
    __slots__ = ("step_id", "hidden", "position")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    hidden: _common_pb2.Tensor
    position: int
    def __init__(self, step_id: _Optional[str] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., position: _Optional[int] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "step", "push_failed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_FAILED_FIELD_NUMBER: _ClassVar[int]
    opened: InferenceOpened
    step: InferenceStepOutput
    push_failed: PushFailed
    def __init__(self, opened: _Optional[_Union[InferenceOpened, _Mapping]] = ..., step: _Optional[_Union[InferenceStepOutput, _Mapping]] = ..., push_failed: _Optional[_Union[PushFailed, _Mapping]] = ...) -> None: ...
