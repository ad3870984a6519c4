"""Typed DHT records. Servers write them, dht-nodes store them as opaque bytes, clients read them.

Every record is a pydantic model with bounds; unknown fields are ignored so that older clients can read
records written by newer servers. Values are JSON bytes (small, human-readable in grpcurl).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.blocks import BlockRange
from swarm.identity import looks_like_peer_id, verify

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 4096  # one announcement; the whole Kademlia datagram must stay below 8 KiB


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    # Lent back to its owner for a while (`pollen server pause`): holds no weights, takes no sessions, keeps its
    # peer id and announcements so that `resume` brings the same server back.
    PAUSED = "paused"
    OFFLINE = "offline"


class ServerRecord(BaseModel):
    """What a shard server announces under the DHT key of every block it holds."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    address: str = Field(min_length=3, max_length=256, description="HOST:PORT of the gRPC server")
    model_id: str = Field(min_length=1, max_length=256)
    model_hash: str = Field(default="", max_length=64, description="fingerprint of the model's config")
    start: int = Field(ge=0, le=100_000)
    end: int = Field(ge=1, le=100_000)
    state: ServerState = ServerState.ONLINE
    throughput_tps: float = Field(default=1.0, ge=0.0, le=1e9, description="inference tokens/s for the span")
    forward_tps: float = Field(default=0.0, ge=0.0, le=1e12, description="forward tokens/s for the span")
    network_tps: float = Field(default=0.0, ge=0.0, le=1e12, description="tokens/s the server's link carries")
    active_sessions: int = Field(default=0, ge=0, le=1_000_000)
    queued_requests: int = Field(default=0, ge=0, le=1_000_000_000)
    cache_tokens_left: int = Field(default=0, ge=0, le=1 << 40)
    inference_max_length: int = Field(default=2048, ge=1, le=1 << 24)
    dtype: str = Field(default="float32", max_length=16)
    quant: str = Field(default="none", max_length=16)
    version: str = Field(default="", max_length=32)
    next_rtts_ms: dict[str, float] = Field(default_factory=dict, max_length=64)
    reachable: bool = Field(
        default=True, description="a dht-node could dial the server's own address (False: reached via `relay`)"
    )
    relay: str = Field(
        default="", max_length=256, description="HOST:PORT of the relay peer `address` belongs to ('' = direct)"
    )
    adapters: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32, description="LoRA adapters held for these blocks, by name"
    )
    updated_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _check_range(self) -> ServerRecord:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self

    @property
    def blocks(self) -> BlockRange:
        return BlockRange(self.start, self.end)

    def encode(self) -> bytes:
        data = self.model_dump_json().encode()
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError(f"server record is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        return data

    @classmethod
    def decode(cls, data: bytes) -> ServerRecord | None:
        """Parse a record read from the DHT; returns None for garbage (peers may write anything)."""
        if len(data) > MAX_RECORD_BYTES:
            return None
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            return None


# ---- model info, and the schema check dht-nodes run on every value they accept ----

# Key of the swarm-wide index of served models: every server writes its ModelRecord here under its own peer
# id, so a probe can list the models without knowing their names.
MODELS_KEY = "pollen.models"
MODEL_KEY_SUFFIX = ".model"


def model_key(model_id: str) -> str:
    """DHT key of one model's info records (sub-key = the writing server's peer id)."""
    return f"{model_id}{MODEL_KEY_SUFFIX}"


class ModelRecord(BaseModel):
    """What a server says about the model it serves: enough for a client to know how many blocks to find."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_id: str = Field(min_length=1, max_length=256)
    name: str = Field(default="", max_length=256, description="human-readable name, e.g. the family")
    num_blocks: int = Field(ge=1, le=100_000)
    model_hash: str = Field(default="", max_length=64, description="fingerprint of the model's config")
    updated_at: float = Field(default_factory=time.time)

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes) -> ModelRecord | None:
        if len(data) > MAX_RECORD_BYTES:
            return None
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            return None


def _split_block_key(key: str) -> tuple[str, int] | None:
    model_id, sep, block = key.rpartition(".block.")
    if not sep or not model_id or not block.isdigit() or len(block) > 6:
        return None
    return model_id, int(block)


def is_known_key(key: str) -> bool:
    """Whether `key` belongs to one of the record schemas below (the rest is refused by strict nodes)."""
    return key == MODELS_KEY or key.endswith(MODEL_KEY_SUFFIX) or _split_block_key(key) is not None


def validate_value(key: str, subkey: str, value: bytes, owned: bool) -> str | None:
    """None if `value` fits the schema of `key`, else why not. `owned`: the sub-key is a signed peer id,
    so the record must also name that peer (nobody announces on another server's behalf).
    Keys outside the known schemas pass here; strict dht-nodes refuse them separately (is_known_key)."""
    if len(value) > MAX_RECORD_BYTES:
        return f"value is {len(value)} bytes, over the {MAX_RECORD_BYTES}-byte record limit"
    block = _split_block_key(key)
    if block is not None:
        try:
            record = ServerRecord.model_validate_json(value)
        except ValidationError as e:
            return f"not a ServerRecord: {_first_error(e)}"
        if record.model_id != block[0] or not record.start <= block[1] < record.end:
            return f"ServerRecord for {record.model_id} blocks {record.blocks} stored under {key!r}"
        if owned and record.peer_id != subkey:
            return f"ServerRecord names peer {record.peer_id[:16]!r}, not its signer {subkey[:16]!r}"
        return None
    if key == MODELS_KEY or key.endswith(MODEL_KEY_SUFFIX):
        try:
            info = ModelRecord.model_validate_json(value)
        except ValidationError as e:
            return f"not a ModelRecord: {_first_error(e)}"
        if key != MODELS_KEY and info.model_id != key[: -len(MODEL_KEY_SUFFIX)]:
            return f"ModelRecord for {info.model_id!r} stored under {key!r}"
        return None
    return None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"[:200]


# ---- reading what the DHT returned: the one verifier and decoder of server records ----


@dataclass(frozen=True)
class SubkeyEntry:
    """One sub-key of a DHT record as a reader receives it (expiration: absolute unix time)."""

    value: bytes
    expiration: float
    public_key: bytes = b""
    signature: bytes = b""


Record = dict[str, SubkeyEntry]  # sub-key → entry


class EntryLike(Protocol):
    """SubkeyEntry, or a dht-node's own storage Entry: anything with these four fields."""

    @property
    def value(self) -> bytes: ...
    @property
    def expiration(self) -> float: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...


def signature_problem(key: str, subkey: str, entry: EntryLike, require_signed: bool = True) -> str | None:
    """None if a reader may trust this sub-key, else why not. Readers check this themselves: the dht-node a
    client asks may be the one lying. By default every sub-key must be signed by the owner its name says
    (sub-key == peer id of the public key). `require_signed=False` is for plain sub-keys on private test swarms
    (dht-node --allow-unsigned): an unsigned sub-key then passes only if it does not pose as a peer id."""
    if not entry.public_key and not entry.signature and not require_signed and not looks_like_peer_id(subkey):
        return None
    return verify(key, subkey, entry.value, entry.expiration, entry.public_key, entry.signature)


E = TypeVar("E", bound=EntryLike)


def verified(key: str, record: Mapping[str, E], require_signed: bool = True) -> dict[str, E]:
    """The sub-keys of `record` whose signatures a reader may trust (see signature_problem)."""
    out = {}
    for subkey, entry in record.items():
        reason = signature_problem(key, subkey, entry, require_signed)
        if reason is None:
            out[subkey] = entry
        else:
            log.debug("ignored sub-key %s of %s: %s", subkey[:16], key, reason)
    return out


def decode_server_records(
    key: str,
    entries: Mapping[str, EntryLike],
    now: float | None = None,
    *,
    skipped: Counter[str] | None = None,
) -> dict[str, ServerRecord]:
    """The trustworthy, well-formed, unexpired ServerRecords of one block key ("<model>.block.<i>"), by peer
    id. A server record is always signed: its sub-key must be the peer id of the key that signed it, and the
    record must name that same peer, so whoever answers a lookup cannot announce (or redirect) any server.
    Skips (and counts in `skipped` by reason) sub-keys that are unsigned or fail their signature, are not a
    ServerRecord, have expired by `now` (default: time.time()), name another model or a span without that
    block, or name a peer other than their signer. Peers can write anything, so none of this is an error.
    State (ONLINE/DRAINING), model hash and precision are the caller's policy, not checked here."""
    now = time.time() if now is None else now
    block = _split_block_key(key)
    out: dict[str, ServerRecord] = {}
    for subkey, entry in entries.items():
        result = _decode_one(key, block, subkey, entry, now)
        if isinstance(result, ServerRecord):
            out[result.peer_id] = result
            continue
        reason, detail = result
        if skipped is not None:
            skipped[reason] += 1
        log.debug("skip sub-key %s of %s: %s %s", subkey[:16], key, reason, detail)
    return out


def _decode_one(
    key: str, block: tuple[str, int] | None, subkey: str, entry: EntryLike, now: float
) -> ServerRecord | tuple[str, str]:
    """The record, or (reason to count, detail to log) why it is unusable."""
    if block is None:
        return "not a block key", repr(key[:64])
    problem = signature_problem(key, subkey, entry, require_signed=True)
    if problem is not None:
        return ("unsigned" if not entry.public_key and not entry.signature else "bad signature"), problem
    record = ServerRecord.decode(entry.value)
    if record is None:
        return "garbage", ""
    if entry.expiration < now:
        return "expired", f"at {entry.expiration:.0f}"
    if record.model_id != block[0]:
        return "other model_id", repr(record.model_id[:64])
    if block[1] not in record.blocks:
        return "wrong block", f"announces {record.blocks} under block {block[1]}"
    if record.peer_id != subkey:  # subkey == the signer's peer id (checked above)
        return "not its signer", f"record names {record.peer_id[:16]!r}"
    return record
