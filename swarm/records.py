"""Typed DHT records. Servers write them, dht-nodes store them as opaque bytes, clients read them.

Every record is a pydantic model with bounds; unknown fields are ignored so that older clients can read
records written by newer servers. Values are JSON bytes (small, human-readable in grpcurl).
"""

from __future__ import annotations

import enum
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.blocks import BlockRange

MAX_RECORD_BYTES = 4096  # one announcement; the whole Kademlia datagram must stay below 8 KiB


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
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
    active_sessions: int = Field(default=0, ge=0, le=1_000_000)
    queued_requests: int = Field(default=0, ge=0, le=1_000_000_000)
    cache_tokens_left: int = Field(default=0, ge=0, le=1 << 40)
    inference_max_length: int = Field(default=2048, ge=1, le=1 << 24)
    dtype: str = Field(default="float32", max_length=16)
    quant: str = Field(default="none", max_length=16)
    version: str = Field(default="", max_length=32)
    next_rtts_ms: dict[str, float] = Field(default_factory=dict, max_length=64)
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
