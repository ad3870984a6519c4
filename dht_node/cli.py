"""`dht-node`: argparse → DhtNodeConfig → run a DhtNode until SIGINT/SIGTERM.

Prints exactly one line to stdout, `dht-node ready at HOST:PORT`, once the node serves (scripts parse it);
everything else goes to the log on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from dht_node.config import DEFAULT_PORT, DhtNodeConfig
from dht_node.node import DhtNode
from dht_node.storage import MAX_VALUE_BYTES_LIMIT
from swarm.aio import install_signal_handlers, write_ready_file
from swarm.dht_client import parse_peers
from swarm.logs import setup_logging

log = logging.getLogger(__name__)
STOP_GRACE_S = 1.0  # in-flight gRPC calls get this long after SIGTERM


def build_parser() -> argparse.ArgumentParser:
    defaults = DhtNodeConfig()
    p = argparse.ArgumentParser(
        prog="dht-node",
        description="Run a Pollen DHT node: a Kademlia overlay member (UDP) with the pollen.v1.Dht gRPC service "
        "(TCP) on the same port number. Shard servers and clients talk to it over gRPC.",
    )
    join = p.add_mutually_exclusive_group(required=True)
    join.add_argument("--bootstrap", action="store_true", help="start a new swarm (the first node)")
    join.add_argument(
        "--initial-peers",
        metavar="HOST:PORT[,HOST:PORT]",
        help="join the swarm through these dht-nodes; hostnames are resolved to IPs",
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
    p.add_argument("--ready-file", help="write HOST:PORT to this file once the node serves (for launchers)")
    p.add_argument(
        "--ksize",
        type=int,
        default=defaults.ksize,
        help="Kademlia k: bucket size and replicas per record (default: %(default)s)",
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
        peers = tuple(parse_peers(args.initial_peers)) if args.initial_peers else ()
        if args.initial_peers is not None and not peers:
            raise ValueError("--initial-peers needs at least one HOST:PORT")
        return DhtNodeConfig(
            host=args.host,
            port=args.port,
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
    setup_logging(config.log_level)
    sys.exit(asyncio.run(run(config)))


if __name__ == "__main__":
    main()
