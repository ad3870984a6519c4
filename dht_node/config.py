"""The dht-node's one frozen configuration object, built by `cli.py` (or by tests) and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from dht_node.storage import MAX_VALUE_BYTES_LIMIT, StorageLimits
from swarm.dht_client import parse_peers

DEFAULT_PORT = 31337


@dataclass(frozen=True)
class DhtNodeConfig:
    # Interface to bind (UDP and gRPC); also the host part of the announced HOST:PORT. Never 0.0.0.0 by default.
    host: str = "127.0.0.1"
    # Port number of both the gRPC server (TCP) and the Kademlia overlay (UDP); 0 picks a free one.
    port: int = DEFAULT_PORT
    # HOST:PORT of dht-nodes to join; empty starts a new swarm.
    initial_peers: tuple[str, ...] = ()
    # Kademlia k: bucket size and replication factor of every record.
    ksize: int = 20
    # Kademlia alpha: parallel requests per lookup round.
    alpha: int = 3
    # Wait for one UDP reply before a contact counts as dead (kademlia's fixed 5 s makes churn slow).
    rpc_timeout_s: float = 1.5
    # Records this node holds and nobody refreshed for this long are re-stored on the k closest nodes.
    republish_period_s: float = 60.0
    # Largest value of one sub-key (bytes); a store request must fit one 8 KiB datagram.
    max_value_bytes: int = 4096
    # Most sub-keys one key may hold on this node (e.g. servers announcing one block).
    max_subkeys_per_key: int = 128
    # Most keys this node holds.
    max_keys: int = 10_000
    # File that receives "HOST:PORT" once the node serves (launchers poll it).
    ready_file: str | None = None
    # Log level name for the CLI (tests configure logging themselves).
    log_level: str | None = None

    def __post_init__(self) -> None:
        # Checked here as well as in argparse so in-process users (tests, embedders) get the same errors.
        peers = self.initial_peers
        # accept "h:p,h:p" as well as a list of addresses; validates HOST:PORT either way
        object.__setattr__(self, "initial_peers", tuple(parse_peers(peers if isinstance(peers, str) else list(peers))))
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.ksize < 1 or self.alpha < 1:
            raise ValueError("ksize and alpha must be at least 1")
        if not 0 < self.rpc_timeout_s <= 60:
            raise ValueError("rpc_timeout_s must be in (0, 60]")
        if self.republish_period_s <= 0:
            raise ValueError("republish_period_s must be positive")
        if not 1 <= self.max_value_bytes <= MAX_VALUE_BYTES_LIMIT:
            raise ValueError(f"max_value_bytes must be in [1, {MAX_VALUE_BYTES_LIMIT}] (8 KiB UDP request limit)")
        _ = self.limits  # validates the storage caps now rather than at start()

    @property
    def limits(self) -> StorageLimits:
        return StorageLimits(
            max_value_bytes=self.max_value_bytes, max_subkeys_per_key=self.max_subkeys_per_key, max_keys=self.max_keys
        )
