"""The shard server's one frozen configuration object, built by `cli.py` (or by tests) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from swarm.blocks import BlockRange

if TYPE_CHECKING:  # swarm.net imports grpc: not needed to build a config (or for `shard-server --help`)
    from swarm.net import Security
    from swarm.relay import RelayLimits

MIB = 1 << 20


@dataclass(frozen=True)
class ShardServerConfig:
    # Local model folder or an org/name already in the local Hugging Face cache.
    model: str
    # Blocks [start, end) this server loads and serves; None = chosen from the swarm (see num_blocks).
    blocks: BlockRange | None = None
    # dht-node gRPC addresses (HOST:PORT); empty = standalone, nothing is announced.
    initial_peers: tuple[str, ...] = ()
    # Interface to bind; also the host part of the announced address.
    host: str = "127.0.0.1"
    # TCP port; 0 picks a free one (read it back from ShardServer.port).
    port: int = 0
    # HOST:PORT clients and other servers should dial, if not host:port (port forwarding, a proxy, NAT).
    public_address: str | None = None
    # torch device of the blocks: "cpu", "cuda" or "cuda:N".
    device: str = "cpu"
    # Compute/storage dtype of the blocks: float32, float16 or bfloat16.
    dtype: str = "float32"
    # Weight quantization of the blocks' linear layers (bitsandbytes): "none", "int8" or "nf4".
    quant: str = "none"
    # LLM.int8() outlier threshold for --quant int8 (activation columns above it run in float16; 0 = none).
    int8_threshold: float = 6.0
    # File that receives "HOST:PORT" once the server is serving and announced (launchers poll it).
    ready_file: str | None = None
    # DHT namespace of the model; None = derived from --model (hub name or folder name).
    model_id: str | None = None
    # torch intra-op threads; None keeps torch's default.
    num_threads: int | None = None
    # Longest session (prompt + generated tokens) one inference stream may reserve.
    inference_max_length: int = 2048
    # Server-wide KV-cache budget in tokens through all held blocks (sum over sessions of max_length × batch);
    # None (and no cache_bytes) = a share of the memory free after loading the weights.
    cache_tokens: int | None = None
    # gRPC send/receive message limit; hidden states travel in one message per step.
    max_message_bytes: int = 64 * MIB
    # Largest Forward/Backward request in tokens (batch × seq), bounding one request's activations.
    max_batch_size: int = 8192
    # Record lifetime in the DHT; a crashed server disappears from routing after at most this long.
    ttl_s: float = 30.0
    # Ed25519 identity file signing the announcements (created 0600 on first start); None = ephemeral key.
    identity_path: str | None = None
    # Re-announce interval; None = ttl/3 so two refreshes can fail before the record expires.
    announce_period_s: float | None = None
    # Grace for running sessions after SIGTERM before streams are cancelled.
    drain_timeout_s: float = 5.0
    # Announced tokens/s; None = measured at start-up.
    throughput_tps: float | None = None
    # Log level name for the CLI (tests configure logging themselves).
    log_level: str | None = None
    # ---- block choice and rebalancing (ignored when `blocks` pins a range) ----
    # Blocks to choose when `blocks` is None; None = as many as fit the memory budget.
    num_blocks: int | None = None
    # Seconds between checks whether moving to other blocks would help the swarm (jittered ±50%); 0 = never.
    balance_period_s: float = 120.0
    # Move only if the swarm's bottleneck throughput now is below this share of what it would be after the move.
    balance_quality: float = 0.75
    # ---- memory, sessions and load limits ----
    # Server-wide KV-cache budget in bytes (alternative to cache_tokens).
    cache_bytes: int | None = None
    # How long an `open` waits for cache room (or a session slot) before RESOURCE_EXHAUSTED.
    alloc_timeout_s: float = 10.0
    # A session with no step for this long is closed and its cache freed.
    session_timeout_s: float = 300.0
    # When a new session does not fit, evict sessions idle at least this long (longest idle first) instead of
    # making it wait; their clients replay on their next step. 0 = never evict. See cli.py's --evict-idle-after.
    evict_idle_after_s: float = 60.0
    # Open inference sessions at most (more wait like a full cache).
    max_sessions: int = 256
    # Forward/Backward requests waiting for the worker at most (each holds its input in memory).
    max_queued_requests: int = 64
    # Cross-session batched decode: "auto" (on when measured faster), "on" or "off".
    batching: str = "auto"
    # ---- throughput and observability ----
    # JSON file caching throughput measurements per model/device/dtype/blocks; None = ~/.cache/pollen/throughput.json
    throughput_cache: str | None = None
    # Link speed used for the network part of the announced throughput; None = 100 Mbit/s.
    network_mbps: float | None = None
    # Port of the Prometheus /metrics endpoint on `host`; None = off, 0 = a free port (logged).
    metrics_port: int | None = None
    # ---- fine-tuning ----
    # PEFT LoRA adapter folders to serve, "NAME=PATH" or "PATH" (named after the folder); read for held blocks only.
    adapters: tuple[str, ...] = ()
    # Largest rank of the LoRA weights a client may send with its requests.
    max_lora_rank: int = 64
    # Largest Backward request in tokens (batch x seq); None = as many as the activation budget allows (<= 2048).
    max_backward_tokens: int | None = None
    # ---- private swarms and abuse limits ----
    # Swarm key and TLS (swarm.net.Security) for this server's gRPC port and its own calls (DHT, pushes, RTT
    # probes); None = plaintext and no key.
    security: Security | None = None
    # Largest gRPC message received, in bytes (refused from its length prefix, unread); None = max_message_bytes.
    max_receive_bytes: int | None = None
    # Steps one inference session may have waiting (pushed or sent ahead by its client), in bytes; one step
    # always fits an empty inbox.
    max_inbox_bytes: int = 16 * MIB
    # Input bytes of the queued Forward/Backward requests at most (one request always fits an empty queue).
    max_queued_bytes: int = 256 * MIB
    # gRPC calls one IP may make per second (burst: 5 s worth); pushes from a busy upstream server count too.
    calls_per_ip_s: float = 2000.0
    # Unary calls (Info, Push) one IP may have in flight.
    max_calls_in_flight_per_ip: int = 256
    # Inference sessions plus Forward/Backward streams one IP may have open at once.
    max_streams_per_ip: int = 64
    # ---- reachability and relaying (shard_server/reachability.py, swarm/relay.py) ----
    # "auto": ask a dht-node to dial us back at start and attach to a relay if it cannot; "never": skip the
    # check (announced reachable); "always": attach to a relay even when reachable (tests, benchmarks).
    use_relay: str = "auto"
    # `--relay`: lend ports on `host` to servers nobody can dial, within these limits; None = do not relay.
    relay: RelayLimits | None = None
    # ---- local administration ----
    # Unix socket of the admin endpoint (pause/resume/status): a path, "auto" = $XDG_RUNTIME_DIR/pollen/
    # shard-<port>.sock (else ~/.cache/pollen/run/...), "" = none (the CLI's default is "auto").
    admin_socket: str = ""

    def __post_init__(self) -> None:
        # Checked here as well as in argparse so in-process users (tests, embedders) get the same errors.
        if self.inference_max_length < 1:
            raise ValueError("inference_max_length must be at least 1")
        if self.cache_tokens is not None and self.cache_tokens < 1:
            raise ValueError("cache_tokens must be at least 1")
        if self.cache_bytes is not None and self.cache_bytes < 1:
            raise ValueError("cache_bytes must be at least 1")
        if self.cache_tokens is not None and self.cache_bytes is not None:
            raise ValueError("give either cache_tokens or cache_bytes, not both")
        if self.blocks is not None and self.num_blocks is not None:
            raise ValueError("give either blocks (a pinned range) or num_blocks (chosen from the swarm), not both")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        if self.balance_period_s < 0 or self.balance_quality < 0:
            raise ValueError("balance_period_s and balance_quality must be >= 0")
        if self.max_sessions < 1 or self.max_queued_requests < 1:
            raise ValueError("max_sessions and max_queued_requests must be at least 1")
        if self.alloc_timeout_s < 0 or self.session_timeout_s <= 0:
            raise ValueError("alloc_timeout_s must be >= 0 and session_timeout_s > 0")
        if self.evict_idle_after_s < 0:
            raise ValueError("evict_idle_after_s must be >= 0 (0 = never evict idle sessions)")
        if self.batching not in ("auto", "on", "off"):
            raise ValueError(f"batching must be auto, on or off, not {self.batching!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics port {self.metrics_port} is out of range")
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
        if self.quant not in ("none", "int8", "nf4"):
            raise ValueError(f"unknown quantization {self.quant!r}; choose none, int8 or nf4")
        if self.int8_threshold < 0:
            raise ValueError("int8_threshold must be >= 0")
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be at least 1")
        if self.max_backward_tokens is not None and self.max_backward_tokens < 1:
            raise ValueError("max_backward_tokens must be at least 1")
        if self.max_receive_bytes is not None and self.max_receive_bytes < 1:
            raise ValueError("max_receive_bytes must be at least 1")
        if self.max_inbox_bytes < 1 or self.max_queued_bytes < 1:
            raise ValueError("max_inbox_bytes and max_queued_bytes must be at least 1")
        if self.calls_per_ip_s <= 0 or self.max_calls_in_flight_per_ip < 1 or self.max_streams_per_ip < 1:
            raise ValueError("per-IP limits must be positive")
        if self.use_relay not in ("auto", "never", "always"):
            raise ValueError(f"use_relay must be auto, never or always, not {self.use_relay!r}")
        if self.security is not None and self.security.tls is not None and not self.security.tls.serves:
            raise ValueError(
                "a shard-server serving TLS needs --tls-cert and --tls-key (--tls-ca alone is for clients)"
            )

    @property
    def announce_every_s(self) -> float:
        return self.announce_period_s if self.announce_period_s is not None else self.ttl_s / 3
