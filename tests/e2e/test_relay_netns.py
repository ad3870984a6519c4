"""A server behind NAT, for real: two network namespaces joined by a veth (tests/netns.py).

"pub" runs the dht-node (--relay) and a server holding blocks [0, 2); "nat" runs a server holding [2, 4) that
binds 127.0.0.1 only, so nobody can dial it but it can dial out. The dht-node's dial-back fails, the server
attaches to the dht-node's relay and announces the lent address; a client in "pub" generates through both
servers (push on) and must get exactly the tokens plain transformers computes here. A direct dial from "pub"
to the nat server must fail (the setup really hides it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.launcher import BIN
from tests.netns import NetnsPair, NetnsProcesses, unavailable_reason

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
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
    return out[0, len(PROMPT) :].tolist()


def test_server_behind_nat_is_reached_through_the_relay(
    netns: NetnsPair, tiny_llama: Path, reference: list[int], request: pytest.FixtureRequest
) -> None:
    procs = NetnsProcesses()
    failed = True
    try:
        dht = procs.spawn_in(netns.pub, "dht", [str(BIN / "dht-node"), "--bootstrap", "--relay"], netns.pub_ip)
        procs.wait_ready(dht)
        server = [str(BIN / "shard-server"), "--model", str(tiny_llama), "--initial-peers", dht.address,
                  "--throughput", "100", "--network-mbps", "1000"]  # fmt: skip
        public = procs.spawn_in(netns.pub, "server-pub", [*server, "--blocks", "0:2"], netns.pub_ip)
        # Binds 127.0.0.1 in its namespace: dialling 10.x.y.2 reaches nothing, as behind a NAT.
        hidden = procs.spawn_in(netns.nat, "server-nat", [*server, "--blocks", "2:4"], "127.0.0.1")
        procs.wait_ready(public)
        procs.wait_ready(hidden)
        hidden_port = hidden.address.rpartition(":")[2]

        done = procs.run_in(netns.pub, [sys.executable, "-c", CLIENT, dht.address, str(tiny_llama), netns.nat_ip,
                                        hidden_port, json.dumps(PROMPT), str(NEW_TOKENS)])  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])

        assert result["direct"] in ("ConnectionRefusedError", "TimeoutError"), result["direct"]
        (record,) = result["records"]
        assert record["reachable"] is False and record["relay"] == dht.address
        relay_host, _, relay_port = record["address"].rpartition(":")
        assert relay_host == netns.pub_ip and relay_port != hidden_port
        assert "NOT reachable from the swarm" in hidden.log() and "attached to relay" in hidden.log()
        assert result["tokens"] == reference
        assert "relaying server" in dht.log()
        failed = False
    finally:
        if failed or request.session.testsfailed:
            print(procs.logs())
        procs.close()
