"""The shard server's one frozen configuration object, built by `cli.py` (or by tests) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.blocks import BlockRange

MIB = 1 << 20


@dataclass(frozen=True)
class ShardServerConfig:
    # Local model folder or an org/name already in the local Hugging Face cache.
    model: str
    # Blocks [start, end) this server loads and serves.
    blocks: BlockRange
    # dht-node gRPC addresses (HOST:PORT); empty = standalone, nothing is announced.
    initial_peers: tuple[str, ...] = ()
    # Interface to bind; also the host part of the announced address.
    host: str = "127.0.0.1"
    # TCP port; 0 picks a free one (read it back from ShardServer.port).
    port: int = 0
    # torch device of the blocks: "cpu", "cuda" or "cuda:N".
    device: str = "cpu"
    # Compute/storage dtype of the blocks: float32, float16 or bfloat16.
    dtype: str = "float32"
    # File that receives "HOST:PORT" once the server is serving and announced (launchers poll it).
    ready_file: str | None = None
    # DHT namespace of the model; None = derived from --model (hub name or folder name).
    model_id: str | None = None
    # torch intra-op threads; None keeps torch's default.
    num_threads: int | None = None
    # Longest session (prompt + generated tokens) one inference stream may reserve.
    inference_max_length: int = 2048
    # Server-wide KV-cache budget in tokens (sum over sessions of max_length × batch_size).
    cache_tokens: int = 32768
    # gRPC send/receive message limit; hidden states travel in one message per step.
    max_message_bytes: int = 64 * MIB
    # Largest Forward/Backward request in tokens (batch × seq), bounding one request's activations.
    max_batch_size: int = 8192
    # Record lifetime in the DHT; a crashed server disappears from routing after at most this long.
    ttl_s: float = 30.0
    # Re-announce interval; None = ttl/3 so two refreshes can fail before the record expires.
    announce_period_s: float | None = None
    # Grace for running sessions after SIGTERM before streams are cancelled.
    drain_timeout_s: float = 5.0
    # Announced tokens/s; None = measured at start-up.
    throughput_tps: float | None = None
    # Log level name for the CLI (tests configure logging themselves).
    log_level: str | None = None

    def __post_init__(self) -> None:
        # Checked here as well as in argparse so in-process users (tests, embedders) get the same errors.
        if self.inference_max_length < 1:
            raise ValueError("inference_max_length must be at least 1")
        if self.cache_tokens < 1:
            raise ValueError("cache_tokens must be at least 1")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if self.announce_period_s is not None and not 0 < self.announce_period_s < self.ttl_s:
            raise ValueError(f"announce period ({self.announce_period_s} s) must be in (0, ttl={self.ttl_s} s)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be at least 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")

    @property
    def announce_every_s(self) -> float:
        return self.announce_period_s if self.announce_period_s is not None else self.ttl_s / 3
