"""The real `shard-server` process: grpcurl can list/describe/health-check it, errors are one clear line,
SIGTERM exits 0 quickly, and with a dht-node its records appear ONLINE and turn OFFLINE on shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shard_server.cli import build_parser
from shard_server.throughput import network_tps
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.records import ServerRecord, ServerState
from tests.launcher import BIN, SwarmProcesses

pytestmark = pytest.mark.e2e


@pytest.fixture
def procs() -> Iterator[SwarmProcesses]:
    with SwarmProcesses() as swarm:
        try:
            yield swarm
        except BaseException:
            print(swarm.logs())
            raise


def grpcurl(*args: str) -> str:
    result = subprocess.run([str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_health_and_sigterm(procs: SwarmProcesses, tiny_llama: Path) -> None:
    t0 = time.monotonic()
    server = procs.start_server(tiny_llama, "0:4", [], "--num-threads", "1", "--model-id", "tiny")
    ready_s = time.monotonic() - t0
    address = server.address
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
    assert f"shard-server ready at {address} blocks 0:4" in server.log()

    services = grpcurl(address, "list").split()
    assert "pollen.v1.Shard" in services and "grpc.health.v1.Health" in services
    described = grpcurl(address, "describe", "pollen.v1.Shard")
    for rpc in ("Info", "Forward", "Backward", "InferenceStep"):
        assert f"rpc {rpc}" in described
    assert json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))["status"] == "SERVING"
    info = json.loads(grpcurl(address, "pollen.v1.Shard/Info"))
    assert info["model_id"] == "tiny" and info["state"] == "online" and info["blocks"]["end"] == 4

    t1 = time.monotonic()
    # SIGTERM ends it by itself, with exit code 0 (stop() waits for the process; it never needs to kill it).
    assert procs.stop(server, signal.SIGTERM, timeout_s=60) == 0, server.log()
    assert "stopped (peer" in server.log()
    print(f"start-to-ready {ready_s:.2f} s, SIGTERM-to-exit {time.monotonic() - t1:.2f} s")


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [str(BIN / "shard-server"), "--model", str(missing), "--blocks", "0:2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_help_documents_every_flag() -> None:
    result = subprocess.run([str(BIN / "shard-server"), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    flags = [opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")]
    assert {"--model", "--blocks", "--initial-peers", "--device", "--dtype", "--cache-tokens", "--ttl"} <= set(flags)
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    for flag in flags:
        assert flag in result.stdout


async def test_announces_online_then_offline(procs: SwarmProcesses, tiny_llama: Path) -> None:
    dht = await asyncio.to_thread(procs.start_dht)
    server = await asyncio.to_thread(
        procs.start_server, tiny_llama, "1:3", [dht.address], "--num-threads", "1", "--model-id", "tiny", "--ttl", "20"
    )
    client = DhtClient([dht.address])
    try:
        for block in (1, 2):
            records = [ServerRecord.decode(e.value) for e in (await client.get(block_key("tiny", block))).values()]
            assert len(records) == 1 and records[0] is not None
            assert (records[0].state, records[0].address, records[0].start, records[0].end) == (
                ServerState.ONLINE,
                server.address,
                1,
                3,
            )
            # Network speed was measured against the dht-node (loopback: far above the 100 Mbit/s fallback).
            assert records[0].network_tps > network_tps(64, 100.0)
        assert not await client.get(block_key("tiny", 0))  # blocks it does not hold are not announced

        assert await asyncio.to_thread(procs.stop, server, signal.SIGTERM, 10) == 0, server.log()
        for block in (1, 2):
            entries = (await client.get(block_key("tiny", block))).values()
            states = {r.state for r in (ServerRecord.decode(e.value) for e in entries) if r is not None}
            assert states <= {ServerState.OFFLINE}, states
    finally:
        await client.close()
