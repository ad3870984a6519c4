"""`shard-server`: parse flags into a ShardServerConfig and run one ShardServer until SIGINT/SIGTERM.

Exit codes: 0 after a graceful stop, 2 for a usage/configuration error (one line on stderr, no
traceback), 1 if the server could not start for another reason (e.g. no dht-node took its announcement).

The process ends with os._exit once the server has stopped and the logs are flushed: nothing is left to do,
and interpreter finalization with native threads still parked (gRPC's poller, torch's OpenMP pool) is where
a process can abort instead of exiting 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence

from shard_server.config import MIB, ShardServerConfig
from swarm.blocks import BlockRange
from swarm.logs import setup_logging

log = logging.getLogger("shard_server")

# Literal (not swarm.tensors.DTYPE_NAMES) so `--help` and flag errors answer before torch is imported.
DTYPES = ("float32", "float16", "bfloat16")
QUANTS = ("none", "int8", "nf4")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _block_range(text: str) -> BlockRange:
    try:
        return BlockRange.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shard-server",
        description="Serve a contiguous range of transformer blocks of a model to a Pollen swarm over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # fmt: off
    p.add_argument("--model", required=True,
                   help="local model folder (config.json + *.safetensors) or an org/name in the local HF cache")
    p.add_argument("--blocks", default=None, type=_block_range,
                   help="pin the half-open block range START:END, e.g. 0:12 means blocks 0..11 (no rebalancing); "
                        "without it the server chooses its blocks from the swarm (see --num-blocks)")
    p.add_argument("--num-blocks", type=_positive_int, default=None,
                   help="serve this many consecutive blocks, chosen where the swarm's announced throughput is "
                        "lowest (unserved blocks first); default: as many as fit the memory budget")
    p.add_argument("--balance-period", type=float, default=120.0,
                   help="seconds (jittered +-50%%) between checks whether moving to other blocks would raise the "
                        "swarm's bottleneck throughput; 0 disables rebalancing")
    p.add_argument("--balance-quality", type=float, default=0.75,
                   help="move only if the swarm's bottleneck throughput now is below this share of what it "
                        "would be after the move (Petals' rule; 0 never moves, >1 moves whenever it helps)")
    p.add_argument("--initial-peers", default="",
                   help="comma-separated dht-node HOST:PORT addresses; empty runs standalone (not announced)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on; also the announced host")
    p.add_argument("--port", type=int, default=0, help="TCP port to listen on; 0 picks a free port")
    p.add_argument("--public-address", default=None,
                   help="HOST:PORT to announce instead of --host:port (port forwarding, a proxy in front, NAT)")
    p.add_argument("--device", default="cpu", help="torch device for the blocks: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the blocks")
    p.add_argument("--quant", default="none", choices=QUANTS,
                   help="quantize the blocks' linear layers with bitsandbytes while loading: int8 (LLM.int8()) or "
                        "nf4 (4-bit, computes in --dtype); norms, biases and Mixtral's experts stay in --dtype")
    p.add_argument("--int8-threshold", type=float, default=6.0,
                   help="--quant int8 outlier threshold: activation columns above it are computed in float16")
    p.add_argument("--ready-file", default=None,
                   help="write HOST:PORT to this file once serving and announced (for launchers)")
    p.add_argument("--model-id", default=None,
                   help="DHT name of the model (default: the hub name, or the model folder's name)")
    p.add_argument("--num-threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's own default)")
    p.add_argument("--inference-max-length", type=_positive_int, default=2048,
                   help="longest inference session (prompt + generated tokens) a client may open")
    p.add_argument("--cache-tokens", type=_positive_int, default=None,
                   help="server-wide KV-cache budget in tokens through all held blocks; a session reserves "
                        "max_length x batch_size when it opens (default: half of the memory free after loading)")
    p.add_argument("--cache-bytes", type=_positive_int, default=None,
                   help="server-wide KV-cache budget in bytes (instead of --cache-tokens)")
    p.add_argument("--alloc-timeout", type=float, default=10.0,
                   help="seconds a session open waits for cache room or a session slot before RESOURCE_EXHAUSTED")
    p.add_argument("--session-timeout", type=_positive_float, default=300.0,
                   help="seconds without a step after which a session is closed and its cache freed")
    p.add_argument("--evict-idle-after", type=_non_negative_float, default=60.0, metavar="SECONDS",
                   help="when a new session does not fit the cache, evict sessions idle at least this long (longest "
                        "idle first) instead of making it wait; their clients replay their history on their next "
                        "step, output unchanged. Steps of a generating client come well under a second apart, so "
                        "a minute of silence is a user between chat turns or a client gone, and costs them one "
                        "replayed prefill later, while a newcomer would be refused now. 0 = never evict")
    p.add_argument("--max-sessions", type=_positive_int, default=256,
                   help="open inference sessions at most (further opens wait like a full cache)")
    p.add_argument("--max-queued-requests", type=_positive_int, default=64,
                   help="Forward/Backward requests waiting for the worker at most; more get RESOURCE_EXHAUSTED")
    p.add_argument("--batching", default="auto", choices=("auto", "on", "off"),
                   help="run single-token steps of different sessions as one batched forward: auto = when "
                        "measured faster at start-up")
    p.add_argument("--max-message-bytes", type=_positive_int, default=64 * MIB,
                   help="largest gRPC message sent or received, in bytes")
    p.add_argument("--max-receive-bytes", type=_positive_int, default=None,
                   help="largest gRPC message received, in bytes; a larger one is refused from its length prefix, "
                        "before its body is read (default: --max-message-bytes)")
    p.add_argument("--max-inbox-bytes", type=_positive_int, default=16 * MIB,
                   help="bytes of steps one inference session may have waiting (pushed by the previous server or "
                        "sent ahead by its client); a push beyond is refused, the client's stream is not read")
    p.add_argument("--max-queued-bytes", type=_positive_int, default=256 * MIB,
                   help="input bytes of the Forward/Backward requests waiting for the worker at most; more get "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--rate-per-ip", type=_positive_float, default=2000.0,
                   help="gRPC calls one IP may make per second, burst 5 s worth (pushes from a busy previous "
                        "server count); more get RESOURCE_EXHAUSTED")
    p.add_argument("--calls-in-flight-per-ip", type=_positive_int, default=256,
                   help="unary calls (Info, Push) one IP may have in flight")
    p.add_argument("--max-sessions-per-ip", type=_positive_int, default=64,
                   help="inference sessions plus Forward/Backward streams one IP may have open at once")
    p.add_argument("--max-batch-size", type=_positive_int, default=8192,
                   help="largest request in tokens (batch x new tokens) for Forward, Backward and inference "
                        "steps; also the most rows of one batched decode step")
    p.add_argument("--throughput", type=_positive_float, default=None,
                   help="announced tokens/s; skips the measurement at start-up")
    p.add_argument("--throughput-cache", default=None,
                   help="JSON file caching throughput measurements per model/device/dtype/blocks "
                        "(default: ~/.cache/pollen/throughput.json)")
    p.add_argument("--network-mbps", type=_positive_float, default=None,
                   help="link speed in Mbit/s for the network part of the announced throughput (default: measured "
                        "to the dht-node at start; 100 without one)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on --host at this port (0 = a free port, logged); off if unset")
    p.add_argument("--announce-period", type=_positive_float, default=None,
                   help="seconds between re-announcements (default: ttl / 3)")
    p.add_argument("--ttl", type=_positive_float, default=30.0,
                   help="seconds an announcement stays valid in the DHT without a refresh")
    p.add_argument("--identity", metavar="PATH", default=None,
                   help="Ed25519 identity file that signs the announcements, created (mode 0600) on first start; "
                        "the peer id derives from it (default: a fresh ephemeral identity per start)")
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds open sessions may keep running after SIGTERM before being cancelled")
    p.add_argument("--adapters", default="",
                   help="comma-separated PEFT LoRA adapter folders to serve (adapter_config.json + "
                        "adapter_model.safetensors), each NAME=PATH or PATH (named after the folder); only the "
                        "held blocks' weights are read; clients pick one by name")
    p.add_argument("--max-lora-rank", type=_positive_int, default=64,
                   help="largest rank of the LoRA weights a fine-tuning client may send with its requests")
    p.add_argument("--max-backward-tokens", type=_positive_int, default=None,
                   help="largest Backward request in tokens (batch x seq); default: as many as fit a quarter of "
                        "the memory free after loading, at most 2048")
    p.add_argument("--admin-socket", metavar="PATH", default="auto",
                   help="Unix socket of the local admin endpoint (`pollen server pause|resume|status`), mode 0600 "
                        "in a directory of yours that only you can enter (created 0700); auto = "
                        "$XDG_RUNTIME_DIR/pollen/shard-PORT.sock, else "
                        "${XDG_CACHE_HOME:-~/.cache}/pollen/run/shard-PORT.sock; off = no admin endpoint")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default: $POLLEN_LOG_LEVEL or INFO)")
    # fmt: on
    from swarm.net import add_security_args  # the same --swarm-key/--tls-* flags as every Pollen command
    from swarm.relay import add_relay_args  # the same --relay flags as dht-node

    add_security_args(p)
    add_relay_args(p)
    p.add_argument("--use-relay", default="auto", choices=("auto", "never", "always"),
                   help="auto: at start a dht-node dials us back; if it cannot (NAT), keep an outbound stream to a "
                        "relaying peer and announce the address it lends us. never: skip the check. always: use a "
                        "relay even when reachable")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> ShardServerConfig:
    """Raises ValueError with a one-line message when flags are inconsistent."""
    from swarm.net import parse_addresses, security_from_args
    from swarm.relay import relay_limits_from_args

    return ShardServerConfig(
        model=args.model,
        blocks=args.blocks,
        initial_peers=tuple(parse_addresses(args.initial_peers)),
        host=args.host,
        port=args.port,
        public_address=args.public_address,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        int8_threshold=args.int8_threshold,
        ready_file=args.ready_file,
        model_id=args.model_id,
        num_threads=args.num_threads,
        inference_max_length=args.inference_max_length,
        cache_tokens=args.cache_tokens,
        max_message_bytes=args.max_message_bytes,
        max_batch_size=args.max_batch_size,
        ttl_s=args.ttl,
        identity_path=args.identity,
        announce_period_s=args.announce_period,
        drain_timeout_s=max(0.0, args.drain_timeout),
        throughput_tps=args.throughput,
        log_level=args.log_level,
        num_blocks=args.num_blocks,
        balance_period_s=args.balance_period,
        balance_quality=args.balance_quality,
        cache_bytes=args.cache_bytes,
        alloc_timeout_s=args.alloc_timeout,
        session_timeout_s=args.session_timeout,
        evict_idle_after_s=args.evict_idle_after,
        max_sessions=args.max_sessions,
        max_queued_requests=args.max_queued_requests,
        batching=args.batching,
        throughput_cache=args.throughput_cache,
        network_mbps=args.network_mbps,
        metrics_port=args.metrics_port,
        adapters=tuple(item.strip() for item in args.adapters.split(",") if item.strip()),
        max_lora_rank=args.max_lora_rank,
        max_backward_tokens=args.max_backward_tokens,
        security=security_from_args(args),
        max_receive_bytes=args.max_receive_bytes,
        max_inbox_bytes=args.max_inbox_bytes,
        max_queued_bytes=args.max_queued_bytes,
        calls_per_ip_s=args.rate_per_ip,
        max_calls_in_flight_per_ip=args.calls_in_flight_per_ip,
        max_streams_per_ip=args.max_sessions_per_ip,
        admin_socket=args.admin_socket,
        use_relay=args.use_relay,
        relay=relay_limits_from_args(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up creates ~200k long-lived objects (torch, protobuf descriptors) that the cyclic collector would walk
    # again and again while they are imported (~0.2 s here). It resumes once the server is ready, with everything
    # allocated until then frozen out of its way (ShardServer.run), which also keeps full collections short.
    gc.disable()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # exits 2 with usage
    setup_logging(config.log_level)
    if config.num_threads is not None:
        # Before torch is imported: OpenMP and MKL read these once, for every thread (torch.set_num_threads binds
        # only the thread that calls it; the scheduler's worker sets its own too).
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(config.num_threads)
    # Heavy imports only once the flags are usable.
    from swarm.model_files import ModelNotFound, resolve_model_path

    try:
        resolve_model_path(config.model)
    except ModelNotFound as e:
        sys.stderr.write(f"shard-server: error: {e}\n")
        return 2
    from shard_server.loader import LoadError
    from shard_server.server import ShardServer
    from shard_server.startup import ConfigError

    code = 0
    try:
        asyncio.run(ShardServer(config).run())
    except (ModelNotFound, LoadError, ConfigError) as e:
        sys.stderr.write(f"shard-server: error: {e}\n")
        code = 2
    except TimeoutError as e:
        sys.stderr.write(f"shard-server: error: {e}\n")
        code = 1
    except KeyboardInterrupt:
        code = 130  # only if the signal arrived before the handlers were installed
    _exit_now(code)
    return code  # not reached


def _exit_now(code: int) -> None:
    """End the process without interpreter finalization (see the module docstring), output flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
