"""A server behind NAT, for real: two network namespaces joined by a veth (tests/netns.py).

"pub" runs the dht-node (--relay) and a server holding blocks [0, 2); "nat" runs a server holding [2, 4) that
binds 127.0.0.1 only, so nobody can dial it but it can dial out. The dht-node's dial-back fails, the server
attaches to the dht-node's relay and announces the lent address; a client in "pub" generates through both
servers (push on) and must get exactly the tokens plain transformers computes here. A direct dial from "pub"
to the nat server must fail (the setup really hides it). When that relay (a dht-node) stops, the server attaches
to the second dht-node's relay, re-announces, and generation works again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.launcher import BIN, Proc
from tests.netns import NetnsPair, NetnsProcesses, unavailable_reason
from tests.reference import greedy_references

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
NEW_TOKENS = 16

# Runs inside "pub": generate through the swarm, read the nat server's record, try to dial it directly.
CLIENT = """
import asyncio, json, socket, sys
from client_sdk import SwarmClient
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.model_files import default_model_id
from swarm.records import decode_server_records

dht, model, nat_ip, nat_port, prompt, n = sys.argv[1:7]
try:
    socket.create_connection((nat_ip, int(nat_port)), timeout=3).close()
    direct = "connected"
except OSError as e:
    direct = type(e).__name__

async def records():
    client = DhtClient([dht])
    key = block_key(default_model_id(model), 2)
    found = decode_server_records(key, await client.get(key))
    await client.close()
    return [r.model_dump(mode="json") for r in found.values()]

with SwarmClient(initial_peers=[dht], model=model) as c:
    tokens = c.generate(json.loads(prompt), max_new_tokens=int(n), eos_token_id=None)
print(json.dumps({"tokens": tokens, "direct": direct, "records": asyncio.run(records())}))
"""


@pytest.fixture(scope="module")
def netns() -> Iterator[NetnsPair]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pair = NetnsPair()
    try:
        yield pair.create()
    finally:
        pair.close()


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> list[int]:
    return greedy_references(tiny_llama, [PROMPT], NEW_TOKENS)[0]


@dataclass
class Swarm:
    procs: NetnsProcesses
    relays: list[Proc]  # dht-nodes with --relay, in "pub"
    public: Proc  # blocks 0:2, in "pub"
    hidden: Proc  # blocks 2:4, in "nat", bound to 127.0.0.1


@pytest.fixture(scope="module")
def swarm(netns: NetnsPair, tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    procs = NetnsProcesses()
    failed_before = request.session.testsfailed
    try:
        first = procs.spawn_in(netns.pub, "dht0", [str(BIN / "dht-node"), "--bootstrap", "--relay"], netns.pub_ip)
        procs.wait_ready(first)
        second = procs.spawn_in(netns.pub, "dht1", [str(BIN / "dht-node"), "--initial-peers", first.address,
                                                    "--relay"], netns.pub_ip)  # fmt: skip
        procs.wait_ready(second)
        server = [str(BIN / "shard-server"), "--model", str(tiny_llama), "--throughput", "100", "--network-mbps",
                  "1000", "--initial-peers", f"{first.address},{second.address}"]  # fmt: skip
        public = procs.spawn_in(netns.pub, "server-pub", [*server, "--blocks", "0:2"], netns.pub_ip)
        # Binds 127.0.0.1 in its namespace: dialling 10.x.y.2 reaches nothing, as behind a NAT.
        hidden = procs.spawn_in(netns.nat, "server-nat", [*server, "--blocks", "2:4"], "127.0.0.1")
        procs.wait_ready(public)
        procs.wait_ready(hidden)
        yield Swarm(procs, [first, second], public, hidden)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


def generate_in_pub(swarm: Swarm, netns: NetnsPair, model: Path, dht: str) -> dict[str, Any]:
    port = swarm.hidden.address.rpartition(":")[2]
    argv = [sys.executable, "-c", CLIENT, dht, str(model), netns.nat_ip, port, json.dumps(PROMPT), str(NEW_TOKENS)]
    done = swarm.procs.run_in(netns.pub, argv)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_server_behind_nat_is_reached_through_the_relay(
    swarm: Swarm, netns: NetnsPair, tiny_llama: Path, reference: list[int]
) -> None:
    relay = swarm.relays[0]
    result = generate_in_pub(swarm, netns, tiny_llama, relay.address)
    assert result["direct"] in ("ConnectionRefusedError", "TimeoutError"), result["direct"]  # really hidden
    (record,) = result["records"]
    assert record["reachable"] is False and record["relay"] == relay.address
    host, _, port = record["address"].rpartition(":")
    assert host == netns.pub_ip and port != swarm.hidden.address.rpartition(":")[2]
    log = swarm.hidden.log()
    assert "NOT reachable from the swarm" in log and f"attached to relay {relay.address}" in log
    assert "reachable: a dht-node dialled us" in swarm.public.log()
    assert "push of step" not in swarm.public.log()  # pushes to the relayed address went through
    assert result["tokens"] == reference
    assert "relaying server" in relay.log()


def test_server_moves_to_another_relay_when_its_relay_goes_away(
    swarm: Swarm, netns: NetnsPair, tiny_llama: Path, reference: list[int]
) -> None:
    first, second = swarm.relays
    swarm.procs.stop(first)
    deadline = time.monotonic() + 60
    while f"attached to relay {second.address}" not in swarm.hidden.log():
        assert time.monotonic() < deadline, "the server did not attach to the second relay"
        time.sleep(0.1)
    result = generate_in_pub(swarm, netns, tiny_llama, second.address)
    (record,) = result["records"]
    assert record["relay"] == second.address and record["address"].startswith(f"{netns.pub_ip}:")
    assert result["tokens"] == reference
