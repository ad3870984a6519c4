"""Swarm plumbing for the soak suite: start the processes, read a server's Info and /metrics, wait until the
swarm's records show what we need, and the greedy references from plain transformers."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from swarm.pb import dht_pb2, shard_pb2
from tests.launcher import Proc, SwarmProcesses

SERVER_FLAGS = ("--num-threads", "1", "--throughput", "100", "--ttl", "6", "--metrics-port", "0")
# The fuzzed dht-node must parse what it gets rather than drop it at its per-IP rate limit.
FUZZ_DHT_FLAGS = ("--grpc-rate-per-ip", "1000000", "--udp-rate-per-ip", "1000000")
NEW_TOKENS = 12
PROMPTS = [[1, 17, 42, 99, 5, 64, 23, 7], [3, 9, 27, 81], [5, 4, 3, 2, 1, 0, 11], [100, 2, 77]]


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = 120.0, period_s: float = 0.2) -> None:
    """Poll `condition` until it holds; TimeoutError naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s:.0f} s")
        time.sleep(period_s)


def metrics_port(proc: Proc) -> int | None:
    """The /metrics port a shard-server printed in its ready line (None without --metrics-port)."""
    found = re.search(r"metrics port (\d+)", proc.log())
    return int(found.group(1)) if found else None


def read_metrics(port: int, timeout_s: float = 5.0) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, by name."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://127.0.0.1:{port}/metrics", timeout=timeout_s
    ) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


async def _info(address: str, timeout_s: float) -> shard_pb2.InfoResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/pollen.v1.Shard/Info", response_deserializer=shard_pb2.InfoResponse.FromString)
        return await call(shard_pb2.InfoRequest().SerializeToString(), timeout=timeout_s)  # type: ignore[no-any-return]


def server_info(address: str, timeout_s: float = 10.0) -> shard_pb2.InfoResponse:
    return asyncio.run(_info(address, timeout_s))


async def _ping(address: str, timeout_s: float) -> dht_pb2.PingResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/pollen.v1.Dht/Ping", response_deserializer=dht_pb2.PingResponse.FromString)
        return await call(dht_pb2.PingRequest().SerializeToString(), timeout=timeout_s)  # type: ignore[no-any-return]


def dht_ping(address: str, timeout_s: float = 10.0) -> dht_pb2.PingResponse:
    return asyncio.run(_ping(address, timeout_s))


def answers(proc: Proc) -> bool:
    """The process is alive and answers its cheapest RPC."""
    if not proc.alive():
        return False
    try:
        if proc.name.startswith("dht"):
            dht_ping(proc.address)
        else:
            server_info(proc.address)
    except grpc.aio.AioRpcError:
        return False
    return True


def start_servers(procs: SwarmProcesses, model: Path, plan: list[tuple[str, str]], peers: list[str]) -> list[Proc]:
    """Start (name, blocks) servers concurrently and wait for all of them."""
    servers = [procs.start_server(model, blocks, peers, *SERVER_FLAGS, name=name, wait=False) for name, blocks in plan]
    for server in servers:
        procs.wait_ready(server)
    return servers
