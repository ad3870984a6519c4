"""The dht-node's one frozen configuration object, built by `cli.py` (or by tests) and passed explicitly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dht_node.storage import MAX_VALUE_BYTES_LIMIT, StorageLimits
from swarm.net import PLAINTEXT, Security, parse_addresses
from swarm.relay import RelayLimits

DEFAULT_PORT = 31337


def parse_peers(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "h:p,h:p" or a list of them → ("h:p", ...); raises ValueError on a malformed address (swarm.net)."""
    return tuple(parse_addresses(text))


@dataclass(frozen=True)
class DhtNodeConfig:
    # Interface to bind (UDP and gRPC); also the host part of the announced HOST:PORT. Never 0.0.0.0 by default.
    host: str = "127.0.0.1"
    # Host others should use to reach us (NAT, port-forward, or binding 0.0.0.0); None = `host`.
    announce_host: str | None = None
    # Persistent Ed25519 identity file (created with mode 0600); the Kademlia node id derives from it, so a
    # restarted node keeps its place in the id space. None = a fresh random id every start.
    identity_path: str | None = None
    # Client mode: query and store through the overlay, but never enter routing tables or hold records.
    client_mode: bool = False
    # Strict (public swarm): every sub-key must be signed by its owner and keys must be Pollen record keys.
    # False accepts unsigned sub-keys under any key (private test swarms); peer-id sub-keys stay owner-only.
    require_signatures: bool = True
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
    # Most bytes (packed upper bound) of all records this node holds: bounds memory under a store flood.
    max_total_bytes: int = 64 << 20
    # File that receives "HOST:PORT" once the node serves (launchers poll it).
    ready_file: str | None = None
    # Log level name for the CLI (tests configure logging themselves).
    log_level: str | None = None
    # `dht-node --probe`: join as a client, print the swarm's models and blocks, exit.
    probe: bool = False
    # Private swarm: the swarm key (a MAC on every datagram, a proof on every gRPC call) and optional TLS.
    security: Security = PLAINTEXT
    # UDP requests one IP may send per second (burst: 5 s worth); many nodes can share an IP (NAT, loopback).
    udp_requests_per_ip_s: float = 2000.0
    # gRPC calls one IP may make per second (burst: 5 s worth), and unary calls it may have in flight.
    grpc_calls_per_ip_s: float = 500.0
    # A shard server announces every block at once (one Store per block key): 256 covers the largest models.
    grpc_max_in_flight_per_ip: int = 256
    # `--relay`: lend ports on `host` to shard servers nobody can dial (swarm.relay), within these limits.
    relay: RelayLimits | None = None

    def __post_init__(self) -> None:
        # Checked here as well as in argparse so in-process users (tests, embedders) get the same errors.
        # accept "h:p,h:p" as well as a list of addresses; validates HOST:PORT either way
        object.__setattr__(self, "initial_peers", parse_peers(self.initial_peers))
        if not self.host:
            raise ValueError("host must not be empty")
        if self.host in ("0.0.0.0", "::", "") and not self.announce_host:
            raise ValueError(f"--host {self.host} binds every interface; give --announce-host (the address peers use)")
        if self.announce_host is not None and (not self.announce_host or self.announce_host in ("0.0.0.0", "::")):
            raise ValueError("announce_host must be a reachable host name or IP")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        # A find_value reply carries a record and 2k contacts in one datagram: k stays small enough for both.
        if not 1 <= self.ksize <= 64 or not 1 <= self.alpha <= 64:
            raise ValueError("ksize and alpha must be in [1, 64]")
        if not 0 < self.rpc_timeout_s <= 60:
            raise ValueError("rpc_timeout_s must be in (0, 60]")
        if self.republish_period_s <= 0:
            raise ValueError("republish_period_s must be positive")
        if not 1 <= self.max_value_bytes <= MAX_VALUE_BYTES_LIMIT:
            raise ValueError(f"max_value_bytes must be in [1, {MAX_VALUE_BYTES_LIMIT}] (8 KiB UDP request limit)")
        if self.udp_requests_per_ip_s <= 0 or self.grpc_calls_per_ip_s <= 0 or self.grpc_max_in_flight_per_ip < 1:
            raise ValueError("per-IP request rates must be positive and grpc_max_in_flight_per_ip at least 1")
        if self.security.tls is not None and not self.security.tls.serves:
            raise ValueError("a dht-node serving TLS needs --tls-cert and --tls-key (--tls-ca alone is for clients)")
        _ = self.limits  # validates the storage caps now rather than at start()

    @property
    def limits(self) -> StorageLimits:
        return StorageLimits(
            max_value_bytes=self.max_value_bytes,
            max_subkeys_per_key=self.max_subkeys_per_key,
            max_keys=self.max_keys,
            max_total_bytes=self.max_total_bytes,
        )
