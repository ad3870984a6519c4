"""`--quant` end to end: a shard-server quantizes its blocks at load time and announces it; clients pick servers
with `min_precision` and choose the wire dtype of hidden states with `wire_dtype`; a server that cannot
quantize exits at start-up with one clear line.

Swarm: one dht-node, a float32 server and an nf4 server (--dtype bfloat16) each holding all 4 blocks of the
tiny random Llama. The nf4 server announces a much higher throughput, so an unrestricted client routes there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from client_sdk import SwarmClient
from swarm import tensors
from swarm.errors import MissingBlocks
from tests.launcher import BIN, Proc, SwarmProcesses
from tests.reference import pre_norm_hidden

pytestmark = pytest.mark.e2e
pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'pollen-swarm[quant]')")

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
NEW_TOKENS = 10


@dataclass
class Swarm:
    dht: Proc
    fp32: Proc
    nf4: Proc
    model: Path


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        dht = procs.start_dht()
        common = ("--num-threads", "1")
        fp32 = procs.start_server(tiny_llama, "0:4", [dht.address], *common, "--throughput", "1", wait=False)
        nf4 = procs.start_server(tiny_llama, "0:4", [dht.address], *common, "--throughput", "1000",
                                 "--quant", "nf4", "--dtype", "bfloat16", wait=False)  # fmt: skip
        procs.wait_ready(fp32)
        procs.wait_ready(nf4)
        yield Swarm(dht, fp32, nf4, tiny_llama)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


def emulate(model: Path, wire: torch.dtype) -> list[int]:
    """Greedy tokens of the float32 transformers model when hidden states are rounded to `wire` on every hop, as
    the client (embeddings out), the server (reply) and the client again (logits in, after converting back) do
    it. Rounding is per element, so recomputing the whole sequence each step equals the server's KV cache."""
    reference = LlamaForCausalLM.from_pretrained(model).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            embeds = reference.model.embed_tokens(ids).to(wire).float()  # client -> server in `wire`
            hidden = pre_norm_hidden(reference, embeds)[:, -1:].to(wire).float()  # server -> client in `wire`
            token = reference.lm_head(reference.model.norm(hidden)).argmax(-1)  # [1, 1]
            ids = torch.cat([ids, token], dim=1)
    return ids[0, len(PROMPT) :].tolist()


def test_announcements_carry_dtype_and_quant(swarm: Swarm) -> None:
    with SwarmClient([swarm.dht.address], swarm.model) as client:
        records = {(r.dtype, r.quant) for r in client.info().servers}
    assert records == {("float32", "none"), ("bfloat16", "nf4")}


def test_min_precision_excludes_quantized_servers(swarm: Swarm) -> None:
    with SwarmClient([swarm.dht.address], swarm.model, min_precision="bfloat16") as client:
        assert [(r.dtype, r.quant) for r in client.info().servers] == [("float32", "none")]
        # Only the float32 server is eligible: generation is exactly the float32 model's.
        out = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert out == emulate(swarm.model, torch.float32)
    with SwarmClient([swarm.dht.address], swarm.model, min_precision="nf4") as client:
        assert len(client.info().servers) == 2
        assert len(client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)) == NEW_TOKENS


def test_wire_dtype_bfloat16(swarm: Swarm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hidden states travel in bfloat16 both ways; the float32 server converts at its boundary."""
    import client_sdk.session
    import client_sdk.span_stream

    sent: list[torch.dtype] = []
    received: list[torch.dtype] = []

    def to_proto(t: torch.Tensor) -> Any:
        sent.append(t.dtype)
        return tensors.to_proto(t)

    def from_proto(msg: Any, name: str = "tensor", **kw: Any) -> torch.Tensor:
        t = tensors.from_proto(msg, name, **kw)
        received.append(t.dtype)
        return t

    monkeypatch.setattr(client_sdk.session, "to_proto", to_proto)  # the client's step messages
    monkeypatch.setattr(client_sdk.span_stream, "from_proto", from_proto)  # the servers' replies
    with SwarmClient([swarm.dht.address], swarm.model, min_precision="float32", wire_dtype="bfloat16") as client:
        out = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    assert out == emulate(swarm.model, torch.bfloat16)
    floats = {d for d in sent + received if d.is_floating_point}
    assert floats == {torch.bfloat16} and len(received) >= NEW_TOKENS


def test_no_server_with_enough_precision_fails_fast(tiny_llama: Path, tmp_path: Path) -> None:
    procs = SwarmProcesses()
    try:
        dht = procs.start_dht()
        procs.start_server(tiny_llama, "0:4", [dht.address], "--num-threads", "1", "--throughput", "1",
                           "--quant", "int8")  # fmt: skip
        with SwarmClient([dht.address], tiny_llama, min_precision="bfloat16") as client:
            with pytest.raises(MissingBlocks, match="precision below min_precision=bfloat16"):
                client.generate(PROMPT, max_new_tokens=2)
    finally:
        procs.close()


def test_missing_bitsandbytes_is_one_clear_line(tiny_llama: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: bitsandbytes is not installed')\n")
    env = {"PYTHONPATH": str(fake.parent), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(BIN / "shard-server"), "--model", str(tiny_llama), "--blocks", "0:2", "--quant", "int8",
         "--num-threads", "1", "--host", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("shard-server: error: --quant needs bitsandbytes"), result.stderr
    assert "Traceback" not in result.stderr
