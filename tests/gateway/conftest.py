"""One swarm and one gateway for all gateway tests (package scope): a dht-node, two tiny chat models "tiny-chat-a"
and "tiny-chat-b" served by two shard-servers each (blocks 0:2 and 2:4), and `pollen gateway` serving both, with an
API key, one CORS origin, a concurrency limit of 4 and a 1 s state update period. Real processes on 127.0.0.1.

The dashboard test stops one server of model B (to see the hole), so every other test uses model A only.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.gateway.chat_model import make_chat_model
from tests.launcher import BIN, Proc, SwarmProcesses

API_KEY = "test-key-0123456789"
ALLOWED_ORIGIN = "http://allowed.example"
MAX_CONCURRENCY = 4
MAX_LENGTH = 192
SERVER_ARGS = ("--throughput", "100", "--network-mbps", "1000", "--inference-max-length", "256")


@dataclass
class GatewaySwarm:
    procs: SwarmProcesses
    dht: Proc
    model_a: Path
    model_b: Path
    servers_b: list[Proc]

    @property
    def peers(self) -> str:
        return self.dht.address


@dataclass
class GatewayProcess:
    popen: subprocess.Popen[bytes]
    url: str
    out_path: Path
    err_path: Path
    headers: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def start_gateway(workdir: Path, peers: str, models: list[Path], *extra: str, name: str = "gateway") -> GatewayProcess:
    """`pollen gateway ... --port 0` as a real process; returns once it printed its ready line."""
    out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
    argv = [str(BIN / "pollen"), "gateway", "--initial-peers", peers, "--host", "127.0.0.1", "--port", "0"]
    for model in models:
        argv += ["--model", str(model)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        popen = subprocess.Popen(
            argv + list(extra), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    proc = GatewayProcess(popen, "", out_path, err_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"ready at (http://\S+)", out_path.read_text())
        if match:
            proc.url = match.group(1)
            return proc
        if popen.poll() is not None:
            raise RuntimeError(f"gateway exited with {popen.returncode}:\n{proc.log()}")
        time.sleep(0.05)
    proc.stop(signal.SIGKILL)
    raise TimeoutError(f"gateway not ready after 120 s:\n{proc.log()}")


@pytest.fixture(scope="package")
def gateway_swarm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[GatewaySwarm]:
    root = tmp_path_factory.mktemp("gateway-models")
    model_a = make_chat_model(root / "tiny-chat-a", seed=0)
    model_b = make_chat_model(root / "tiny-chat-b", seed=1)
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        dht = procs.start_dht()
        starts = [(model, blocks) for model in (model_a, model_b) for blocks in ("0:2", "2:4")]
        servers = [
            procs.start_server(m, b, [dht.address], *SERVER_ARGS, name=f"{m.name}-{b.replace(':', '-')}", wait=False)
            for m, b in starts
        ]
        for server in servers:
            procs.wait_ready(server)
        yield GatewaySwarm(procs, dht, model_a, model_b, servers[2:])
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


@pytest.fixture(scope="package")
def gateway(
    gateway_swarm: GatewaySwarm, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("gateway")
    keys = workdir / "keys.txt"
    keys.write_text(f"# test keys\n{API_KEY}\n\nsecond-key-abcdef\n")
    proc = start_gateway(
        workdir, gateway_swarm.peers, [gateway_swarm.model_a, gateway_swarm.model_b],
        "--api-key-file", str(keys), "--cors-origin", ALLOWED_ORIGIN, "--max-concurrency", str(MAX_CONCURRENCY),
        "--max-length", str(MAX_LENGTH), "--update-period", "1", "--max-request-bytes", "65536",
    )  # fmt: skip
    proc.headers = {"Authorization": f"Bearer {API_KEY}"}
    failed_before = request.session.testsfailed
    try:
        yield proc
    finally:
        code = proc.stop()
        if request.session.testsfailed > failed_before:
            print(f"===== gateway (exit {code}) =====\n{proc.log()}")


@functools.lru_cache(maxsize=4)
def _reference_model(path: str) -> tuple[object, object]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    return AutoTokenizer.from_pretrained(path), LlamaForCausalLM.from_pretrained(path).eval()


def reference_tokenizer(path: Path) -> object:
    return _reference_model(str(path))[0]


def reference_greedy(path: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `ids` (stopping at EOS, as the gateway does by default)."""
    _, model = _reference_model(str(path))
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()
