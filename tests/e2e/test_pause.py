"""Pause and resume without leaving the swarm (issue 14 part 1), with real processes: a dht-node and two
shard-servers holding the same blocks, driven by `pollen server pause|resume|status` as subprocesses.

A generation is paused mid-way on the server holding its session: the client finishes on the other server with
exactly the tokens of transformers' greedy decoding; the paused server says so, holds no weights and less
memory, and stays announced (PAUSED, same peer id) without being routed to; after `resume` it is ONLINE with
the same peer id and, once the other server is paused, serves a generation again, token-exact.

Prints the closing note's figures: pause → last session gone (ms, the server's measure), and resume → ONLINE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from client_sdk import AsyncSwarmClient
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.model_files import default_model_id
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord, ServerState
from tests.launcher import Proc, SwarmProcesses
from tests.models import make_tiny_model
from tests.reference import greedy_references

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
NEW_TOKENS = 32
PAUSE_AFTER = 8  # tokens generated before the pause
HIDDEN = 768  # ~85 MB of fp32 weights per server: big enough for the RSS drop to stand out of the noise
NUM_BLOCKS = 4
POLLEN = str(Path(sys.executable).parent / "pollen")
WAIT_S = 60.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("pause-llama"), NUM_BLOCKS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def reference(model: Path) -> list[int]:
    """Greedy tokens of plain transformers on the same weights."""
    return greedy_references(model, [PROMPT], NEW_TOKENS)[0]


def pollen_server(action: str, sock: Path, *extra: str) -> dict[str, Any]:
    """`pollen server ACTION --admin-socket SOCK --json` as a subprocess; its AdminStatus as a dict."""
    run = subprocess.run([POLLEN, "server", action, "--admin-socket", str(sock), "--json", *extra],
                         capture_output=True, text=True, timeout=WAIT_S * 2)  # fmt: skip
    assert run.returncode == 0, f"pollen server {action}: exit {run.returncode}\n{run.stderr}"
    status: dict[str, Any] = json.loads(run.stdout)
    for key in ("rss_bytes", "weights_bytes", "kv_reserved_bytes", "device_allocated_bytes"):
        status[key] = int(status[key])  # uint64 fields are strings in protobuf's JSON
    return status


async def info_state(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        info = await shard_pb2_grpc.ShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=10)
    return str(info.state)


async def announced(dht_address: str, model: Path, peer_id: str, state: ServerState) -> None:
    """Wait until every block's DHT record of `peer_id` says `state`."""
    dht = DhtClient([dht_address])
    keys = [block_key(default_model_id(model), i) for i in range(NUM_BLOCKS)]
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            blocks = await asyncio.wait_for(dht.batch_get(keys), timeout=10)
            states = [
                r.state
                for block in blocks
                for entry in block.values()
                if (r := ServerRecord.decode(entry.value)) is not None and r.peer_id == peer_id
            ]
            if states == [state] * NUM_BLOCKS:
                return
            assert time.monotonic() < deadline, f"peer {peer_id} announces {states}, not {state.value}"
            await asyncio.sleep(0.1)
    finally:
        await dht.close()


def opened_sessions(server: Proc) -> int:
    return server.log().count(" opened: blocks ")


async def generate(dht_address: str, model: Path) -> tuple[list[int], list[str]]:
    """A whole generation with a new client; also the peer ids of the servers the client saw as live."""
    async with AsyncSwarmClient([dht_address], model) as client:
        live = [r.peer_id for r in (await client.info()).servers]
        tokens = await client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    return list(tokens), live


async def test_pause_moves_the_generation_and_resume_brings_the_server_back(model: Path, reference: list[int]) -> None:
    with SwarmProcesses() as procs:
        try:
            await scenario(procs, model, reference)
        except BaseException:
            print(procs.logs())
            raise


async def scenario(procs: SwarmProcesses, model: Path, reference: list[int]) -> None:
    dht = await asyncio.to_thread(procs.start_dht)
    # server-0 is given its socket; server-1 takes the default one (under $XDG_CACHE_HOME, which the launcher
    # points at its work dir, unless $XDG_RUNTIME_DIR is set) and logs it.
    flags = [["--admin-socket", str(procs.workdir / "admin" / "server-0.sock")], []]
    servers = [
        procs.start_server(
            model,
            f"0:{NUM_BLOCKS}",
            [dht.address],
            "--throughput",
            "100",
            "--network-mbps",
            "1000",
            *extra,
            name=f"server-{i}",
            wait=False,
        )
        for i, extra in enumerate(flags)
    ]
    for server in servers:
        await asyncio.to_thread(procs.wait_ready, server)
    socks = [Path(m.group(1)) for server in servers if (m := re.search(r"admin socket (\S+) ", server.log()))]
    assert socks[0] == procs.workdir / "admin" / "server-0.sock"
    port = servers[1].address.rsplit(":", 1)[1]
    assert socks[1].name == f"shard-{port}.sock" and socks[1].parent.name in ("pollen", "run"), socks
    before = [await asyncio.to_thread(pollen_server, "status", sock) for sock in socks]
    peers = [s["peer_id"] for s in before]
    assert [s["state"] for s in before] == ["online", "online"]

    # 1. Pause the server holding the session, mid-generation (the client waits between two tokens).
    tokens: list[int] = []
    async with AsyncSwarmClient([dht.address], model) as client:
        stream = client.stream(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        async with contextlib.aclosing(stream):
            async for token in stream:
                tokens.append(token)
                if len(tokens) != PAUSE_AFTER:
                    continue
                holding = [await asyncio.to_thread(pollen_server, "status", sock) for sock in socks]
                assert sorted(s["active_sessions"] for s in holding) == [0, 1], holding
                p = 0 if holding[0]["active_sessions"] == 1 else 1
                t0 = time.perf_counter()
                paused = await asyncio.to_thread(pollen_server, "pause", socks[p], "--grace", "0")
                pause_call_ms = (time.perf_counter() - t0) * 1000
    assert tokens == reference, "the generation paused mid-way must finish exactly as transformers' greedy"
    q = 1 - p
    assert (paused["changed"], paused["state"], paused["sessions_closed"]) == (True, "paused", 1)
    assert paused["peer_id"] == peers[p]
    gone_ms, took_ms = paused["sessions_gone_ms"], paused["transition_ms"]
    print(
        f"\npause --grace 0 with 1 open session: last session gone after {gone_ms:.0f} ms (server), pause took "
        f"{took_ms:.0f} ms, pause call {pause_call_ms:.0f} ms (CLI)"
    )

    # 2. Paused: no weights, less memory, same peer id, still announced (as PAUSED), Info says so.
    status = await asyncio.to_thread(pollen_server, "status", socks[p])
    assert (status["state"], status["peer_id"], status["active_sessions"]) == ("paused", peers[p], 0)
    assert status["weights_bytes"] == 0 and status["kv_reserved_bytes"] == 0
    weights, rss_online = before[p]["weights_bytes"], holding[p]["rss_bytes"]
    print(f"RSS {rss_online / 2**20:.0f} MiB online (generating) -> {status['rss_bytes'] / 2**20:.0f} MiB paused "
          f"(weights {weights / 2**20:.0f} MiB; {before[p]['rss_bytes'] / 2**20:.0f} MiB at start)")  # fmt: skip
    assert weights > 50 << 20
    assert status["rss_bytes"] < rss_online - weights // 2
    assert await info_state(servers[p].address) == "paused"
    await announced(dht.address, model, peers[p], ServerState.PAUSED)

    # 3. A new generation is routed around the paused server (never even tried there).
    refused_before = servers[p].log().count("rejected: UNAVAILABLE")
    got, live = await generate(dht.address, model)
    assert got == reference
    assert peers[p] not in live and peers[q] in live
    assert servers[p].log().count("rejected: UNAVAILABLE") == refused_before

    # 4. Resume: ONLINE, same peer id, weights back; routed to again (the other one paused now).
    t0 = time.perf_counter()
    resumed = await asyncio.to_thread(pollen_server, "resume", socks[p])
    resume_call_ms = (time.perf_counter() - t0) * 1000
    assert (resumed["changed"], resumed["state"], resumed["peer_id"]) == (True, "online", peers[p])
    assert resumed["weights_bytes"] == weights
    print(f"resume -> ONLINE announced after {resumed['transition_ms']:.0f} ms (server), "
          f"resume call {resume_call_ms:.0f} ms (CLI)")  # fmt: skip
    assert await info_state(servers[p].address) == "online"
    await announced(dht.address, model, peers[p], ServerState.ONLINE)
    other = await asyncio.to_thread(pollen_server, "pause", socks[q], "--grace", "0")
    assert other["state"] == "paused"
    await announced(dht.address, model, peers[q], ServerState.PAUSED)
    opened = opened_sessions(servers[p])
    got, live = await generate(dht.address, model)
    assert got == reference
    assert live == [peers[p]]
    assert opened_sessions(servers[p]) == opened + 1
    # Both back for whatever comes next; a resume when online is a no-op.
    assert (await asyncio.to_thread(pollen_server, "resume", socks[q]))["state"] == "online"
    again = await asyncio.to_thread(pollen_server, "resume", socks[q])
    assert (again["changed"], again["state"]) == (False, "online")
    # A paused server that stops leaves the swarm like an online one: OFFLINE announced, exit 0, socket gone.
    assert (await asyncio.to_thread(pollen_server, "pause", socks[q], "--grace", "0"))["state"] == "paused"
    for server in servers:
        assert procs.stop(server) == 0
    await announced(dht.address, model, peers[q], ServerState.OFFLINE)
    assert not any(sock.exists() for sock in socks), "admin sockets are removed at stop"
