"""`dht-node`: argparse → DhtNodeConfig → run a DhtNode until SIGINT/SIGTERM; or `--probe HOST:PORT`.

Prints exactly one line to stdout, `dht-node ready at HOST:PORT`, once the node serves (scripts parse it);
everything else goes to the log on stderr. `--probe` prints a table of announced models and blocks instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from dht_node.config import DEFAULT_PORT, DhtNodeConfig, parse_peers
from dht_node.node import DhtNode
from dht_node.probe import run_probe
from dht_node.storage import MAX_VALUE_BYTES_LIMIT
from swarm.aio import install_signal_handlers, write_ready_file
from swarm.logs import setup_logging
from swarm.net import add_security_args, security_from_args
from swarm.relay import add_relay_args, relay_limits_from_args

log = logging.getLogger(__name__)
STOP_GRACE_S = 1.0  # in-flight gRPC calls get this long after SIGTERM


def build_parser() -> argparse.ArgumentParser:
    defaults = DhtNodeConfig()
    p = argparse.ArgumentParser(
        prog="dht-node",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a Pollen DHT node: a Kademlia overlay member (UDP) with the pollen.v1.Dht gRPC service "
        "(TCP) on the same port number. Shard servers and clients talk to it over gRPC.",
        epilog="""records and churn:
  Sub-keys are owner-only: each carries its writer's Ed25519 public key and a signature over
  (key, subkey, value, expiration), and the sub-key must be the writer's peer id. Values must
  fit the swarm.records schemas (<model>.block.<i>: ServerRecord; <model>.model and
  pollen.models: ModelRecord). A sub-key lives until its expiration, which its writer sets:
  shard servers re-announce every --announce-every seconds with --ttl (default 30 s), so a
  server that dies silently disappears from lookups within its TTL. Dead contacts leave the
  routing table after one unanswered request (--rpc-timeout); the keys they helped hold are
  re-stored on the new k closest nodes at the next upkeep tick, and every held record is
  re-stored every --republish-period seconds. No node is special: join through any live one.

memory caps (all per node): one value --max-value-bytes; one key --max-subkeys-per-key
  sub-keys and 56,000 bytes; --max-keys keys; --max-total-bytes in all; stores from one
  IP beyond 200/s (burst 1000) are dropped. Malformed datagrams are logged and dropped.

abuse limits: UDP requests per IP (--udp-rate-per-ip), gRPC calls per IP (--grpc-rate-per-ip,
  RESOURCE_EXHAUSTED beyond) and 256 unary calls in flight per IP; UDP requests over 8 KiB
  and gRPC requests over 2 MiB are refused unread. A reply to an address that has not yet
  answered us is at most 3x its request (larger ones ask the sender to repeat with a token),
  so a forged source address cannot be used to amplify traffic.

private swarms: --swarm-key FILE (or $POLLEN_SWARM_KEY=FILE): every datagram carries a MAC
  and every gRPC call a proof of the key; nodes without it can neither read nor write, and
  get UNAUTHENTICATED on gRPC (the health service stays open for probes). --tls-cert and
  --tls-key serve gRPC over TLS. Every process of the swarm must use the same key file.

examples:
  dht-node --bootstrap --identity ~/.cache/pollen/dht.key
  dht-node --initial-peers 10.0.0.5:31337 --host 0.0.0.0 --announce-host 203.0.113.7
  dht-node --probe 127.0.0.1:31337
  dht-node --bootstrap --swarm-key /run/secrets/swarm.key --tls-cert node.pem --tls-key node.key
  dht-node --bootstrap --host 0.0.0.0 --announce-host 203.0.113.7 --relay --relay-ports 40000-40099

servers behind NAT: every shard server asks a dht-node to dial it back (Dht.CheckReachable; only the
  caller's own IP is dialled, one check at a time per IP). One that cannot be dialled attaches to a
  node started with --relay, which lends it a TCP port from --relay-ports on this host.""",
    )
    join = p.add_mutually_exclusive_group(required=True)
    join.add_argument("--bootstrap", action="store_true", help="start a new swarm (the first node)")
    join.add_argument(
        "--initial-peers",
        metavar="HOST:PORT[,HOST:PORT]",
        help="join the swarm through these dht-nodes (any live ones; none is special); hostnames are resolved",
    )
    join.add_argument(
        "--probe",
        metavar="HOST:PORT",
        help="join the swarm through this node as a DHT client, print a table of the models and blocks it "
        "announces, and exit",
    )
    p.add_argument(
        "--host",
        default=defaults.host,
        help="interface to bind for UDP and gRPC, also the announced host (default: %(default)s; "
        "0.0.0.0 only if you mean it)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port number for both UDP (Kademlia) and TCP (gRPC); 0 picks a free one (default: %(default)s)",
    )
    p.add_argument(
        "--announce-host",
        help="host or IP that peers, servers and clients should use to reach this node, when it differs from "
        "--host (NAT, port-forward, --host 0.0.0.0) (default: --host)",
    )
    p.add_argument(
        "--identity",
        metavar="PATH",
        help="Ed25519 identity file, created (mode 0600) on first start; the node id derives from it so a "
        "restart keeps the node's place in the swarm (default: a fresh random id each start)",
    )
    p.add_argument(
        "--client",
        action="store_true",
        help="client mode: query and store through the swarm, but never enter routing tables or hold records",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept unsigned sub-keys under any key (private/test swarms); sub-keys named like a peer id stay "
        "owner-only. Default: strict, every sub-key signed by its owner and keys must be Pollen record keys",
    )
    p.add_argument("--ready-file", help="write HOST:PORT to this file once the node serves (for launchers)")
    p.add_argument(
        "--ksize",
        type=int,
        default=defaults.ksize,
        help="Kademlia k: bucket size and replicas per record, at most 64 (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=int,
        default=defaults.alpha,
        help="Kademlia alpha: parallel requests per lookup round (default: %(default)s)",
    )
    p.add_argument(
        "--rpc-timeout",
        type=float,
        default=defaults.rpc_timeout_s,
        help="seconds to wait for a UDP reply before a contact counts as dead (default: %(default)s)",
    )
    p.add_argument(
        "--republish-period",
        type=float,
        default=defaults.republish_period_s,
        help="seconds between re-storing held records on the current k closest nodes, so records survive "
        "churn (default: %(default)s)",
    )
    p.add_argument(
        "--max-value-bytes",
        type=int,
        default=defaults.max_value_bytes,
        help=f"largest value of one sub-key in bytes, at most {MAX_VALUE_BYTES_LIMIT} (one store must fit an "
        "8 KiB datagram) (default: %(default)s)",
    )
    p.add_argument(
        "--max-subkeys-per-key",
        type=int,
        default=defaults.max_subkeys_per_key,
        help="most sub-keys this node holds under one key (default: %(default)s)",
    )
    p.add_argument(
        "--max-keys", type=int, default=defaults.max_keys, help="most keys this node holds (default: %(default)s)"
    )
    p.add_argument(
        "--max-total-bytes",
        type=int,
        default=defaults.max_total_bytes,
        help="most bytes of records this node holds in all (default: %(default)s)",
    )
    p.add_argument(
        "--udp-rate-per-ip",
        type=float,
        default=defaults.udp_requests_per_ip_s,
        help="UDP requests one IP may send per second, burst 5 s worth; more are dropped (default: %(default)s)",
    )
    p.add_argument(
        "--grpc-rate-per-ip",
        type=float,
        default=defaults.grpc_calls_per_ip_s,
        help="gRPC calls one IP may make per second, burst 5 s worth; more get RESOURCE_EXHAUSTED "
        "(default: %(default)s)",
    )
    add_security_args(p)
    add_relay_args(p)
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (default: $POLLEN_LOG_LEVEL or INFO)",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> DhtNodeConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        joining = args.probe if args.probe is not None else args.initial_peers
        peers = parse_peers(joining) if joining else ()
        if joining is not None and not peers:
            raise ValueError("--initial-peers/--probe needs at least one HOST:PORT")
        probe = args.probe is not None
        return DhtNodeConfig(
            host=args.host,
            port=0 if probe else args.port,
            announce_host=args.announce_host,
            identity_path=None if probe else args.identity,
            client_mode=probe or args.client,
            require_signatures=not args.allow_unsigned,
            max_total_bytes=args.max_total_bytes,
            initial_peers=peers,
            ksize=args.ksize,
            alpha=args.alpha,
            rpc_timeout_s=args.rpc_timeout,
            republish_period_s=args.republish_period,
            max_value_bytes=args.max_value_bytes,
            max_subkeys_per_key=args.max_subkeys_per_key,
            max_keys=args.max_keys,
            ready_file=args.ready_file,
            log_level=args.log_level,
            probe=probe,
            security=security_from_args(args),
            udp_requests_per_ip_s=args.udp_rate_per_ip,
            grpc_calls_per_ip_s=args.grpc_rate_per_ip,
            relay=None if probe else relay_limits_from_args(args),
        )
    except ValueError as e:
        parser.error(str(e))


async def run(config: DhtNodeConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)  # before start: a SIGTERM while joining still shuts down cleanly
    node = DhtNode(config)
    try:
        await node.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        await node.stop(grace_s=0)
        return 1
    try:
        sys.stdout.write(f"dht-node ready at {node.address}\n")
        sys.stdout.flush()
        write_ready_file(config.ready_file, node.address)
        await stop.wait()
    finally:
        await node.stop(grace_s=STOP_GRACE_S)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    setup_logging(config.log_level or ("WARNING" if config.probe else None))
    sys.exit(asyncio.run(run_probe(config) if config.probe else run(config)))


if __name__ == "__main__":
    main()
