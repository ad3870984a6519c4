"""Server-held PEFT adapters through a real swarm: one dht-node and two `shard-server --adapters` processes holding
blocks 0:2 and 2:4 of a tiny random model (Llama, and BLOOM for ALiBi), each serving two adapters made here with
peft (random non-zero A and B). Against a local `peft.PeftModel` with the same adapter, in float32:
* Forward along the chain with `tuning.adapter` gives its logits (max |diff| <= 1e-5), for either adapter, and no
  adapter gives the base model's;
* greedy decoding through two inference sessions opened with the adapter gives `PeftModel.generate`'s tokens,
  while a session without adapter runs on the same servers at the same time;
* both servers announce the adapters (Info and DHT record).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from swarm.model_files import Checkpoint, default_model_id
from swarm.models import ClientHead, load_family
from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
from swarm.tensors import from_proto, to_proto
from tests.launcher import BIN, Proc, SwarmProcesses
from tests.models import make_tiny_model

pytestmark = pytest.mark.e2e

RANGES = ((0, 2), (2, 4))
PROMPT = [3, 17, 42, 99, 5, 64, 23, 7]
NEW_TOKENS = 10
EXACT = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bloom": ["query_key_value", "dense_4h_to_h"]}
TIMEOUT_S = 60


@dataclass
class Swarm:
    family: str
    servers: list[Proc]
    model_id: str
    base: PreTrainedModel
    adapters: dict[str, PeftModel]
    head: ClientHead


def make_adapter(model: Path, family: str, path: Path, seed: int, **config: Any) -> PeftModel:
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[family], init_lora_weights=False, **config)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model), lora)
    peft_model.save_pretrained(path)
    # loaded back as a user would load the adapter folder
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), path).eval()


@pytest.fixture(scope="module", params=["llama", "bloom"])
def swarm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    family = request.param
    root = tmp_path_factory.mktemp(f"adapters-{family}")
    model = make_tiny_model(family, root / "model", num_layers=4)
    adapters = {
        "ad1": make_adapter(model, family, root / "ad1", seed=1),
        "rs": make_adapter(model, family, root / "rslora", seed=2, use_rslora=True),
    }
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        dht = procs.start_dht()
        flags = ("--num-threads", "1", "--throughput", "100", "--adapters", f"{root / 'ad1'},rs={root / 'rslora'}")
        servers = [procs.start_server(model, f"{a}:{b}", [dht.address], *flags, wait=False) for a, b in RANGES]
        for server in servers:
            procs.wait_ready(server)
        base = AutoModelForCausalLM.from_pretrained(model).eval()
        head = load_family(model).load_head(Checkpoint(model))
        yield Swarm(family, servers, default_model_id(model), base, adapters, head)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


async def forward_chain(swarm: Swarm, hidden: torch.Tensor, adapter: str) -> torch.Tensor:
    for server, (a, b) in zip(swarm.servers, RANGES, strict=True):
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = shard_pb2_grpc.ShardStub(channel).Forward()
            request = shard_pb2.ForwardRequest(
                model_id=swarm.model_id, blocks=common_pb2.BlockRange(start=a, end=b), hidden=to_proto(hidden),
                tuning=shard_pb2.Tuning(adapter=adapter),
            )  # fmt: skip
            await call.write(request)
            hidden = from_proto((await asyncio.wait_for(call.read(), TIMEOUT_S)).hidden)
            await call.done_writing()
    return hidden


def test_forward_with_an_adapter_equals_peft(swarm: Swarm) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embedded = swarm.head.embed(ids)
    for name, reference in [*swarm.adapters.items(), ("", swarm.base)]:
        hidden = asyncio.run(forward_chain(swarm, embedded, name))
        with torch.inference_mode():
            logits = swarm.head.logits(hidden)
            expected = reference(ids, use_cache=False).logits
        diff = (logits - expected).abs().max().item()
        assert diff <= EXACT, f"{swarm.family} adapter {name!r}: max |swarm - peft| = {diff:.2e}"
    with torch.inference_mode():
        gap = (swarm.adapters["ad1"](ids).logits - swarm.base(ids).logits).abs().max().item()
    assert gap > 0.1  # the adapter matters


class Chain:
    """One inference session per server, opened with the same adapter (or none)."""

    def __init__(self, swarm: Swarm, adapter: str) -> None:
        self.swarm, self.adapter = swarm, adapter
        self.channels = [grpc.aio.insecure_channel(s.address) for s in swarm.servers]
        self.calls = [shard_pb2_grpc.ShardStub(c).InferenceStep() for c in self.channels]
        self.position = 0

    async def open(self, max_length: int) -> None:
        for call, (a, b) in zip(self.calls, RANGES, strict=True):
            msg = shard_pb2.InferenceOpen(
                model_id=self.swarm.model_id, blocks=common_pb2.BlockRange(start=a, end=b), max_length=max_length,
                session_id=uuid.uuid4().hex, tuning=shard_pb2.Tuning(adapter=self.adapter),
            )  # fmt: skip
            await call.write(shard_pb2.InferenceRequest(open=msg))
            assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).HasField("opened")

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        for call in self.calls:
            step = shard_pb2.InferenceStepInput(
                step_id=uuid.uuid4().hex, position=self.position, hidden=to_proto(hidden)
            )
            await call.write(shard_pb2.InferenceRequest(step=step))
            hidden = from_proto((await asyncio.wait_for(call.read(), TIMEOUT_S)).step.hidden)
        self.position += hidden.shape[1]
        return hidden

    async def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        await self.open(len(prompt) + new_tokens)
        x = torch.tensor([prompt])
        out: list[int] = []
        for _ in range(new_tokens):
            # Never hold inference_mode across an await: grad mode is per thread, and the other chains' coroutines
            # entering and leaving it in between would leave it switched on for the rest of the test session.
            with torch.inference_mode():
                embedded = self.swarm.head.embed(x)
            hidden = await self.step(embedded)
            with torch.inference_mode():
                x = self.swarm.head.logits(hidden)[:, -1:].argmax(-1)
            out.append(int(x))
        return out

    async def close(self) -> None:
        for call in self.calls:
            await call.done_writing()
            assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.OK
        for channel in self.channels:
            await channel.close()


def reference_tokens(model: PreTrainedModel) -> list[int]:
    """Greedy decoding by the local model, recomputing the whole sequence each token (no cache, no generation
    config: `generate` would forbid EOS below min_new_tokens, which the swarm client here does not)."""
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(PROMPT) :].tolist()


def test_sessions_with_and_without_adapter_at_once_equal_peft_generate(swarm: Swarm) -> None:
    async def run() -> list[list[int]]:
        chains = [Chain(swarm, "ad1"), Chain(swarm, ""), Chain(swarm, "rs")]
        try:
            return list(await asyncio.gather(*(c.greedy(PROMPT, NEW_TOKENS) for c in chains)))
        finally:
            await asyncio.gather(*(c.close() for c in chains), return_exceptions=True)

    with_ad1, plain, with_rs = asyncio.run(run())
    assert with_ad1 == reference_tokens(swarm.adapters["ad1"])
    assert plain == reference_tokens(swarm.base)
    assert with_rs == reference_tokens(swarm.adapters["rs"])


def test_servers_announce_their_adapters(swarm: Swarm) -> None:
    async def info(address: str) -> shard_pb2.InfoResponse:
        async with grpc.aio.insecure_channel(address) as channel:
            return await shard_pb2_grpc.ShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=TIMEOUT_S)

    for server in swarm.servers:
        reply = asyncio.run(info(server.address))
        assert list(reply.adapters) == ["ad1", "rs"]
        assert json.loads(reply.record_json)["adapters"] == ["ad1", "rs"]


def test_an_unusable_adapter_stops_the_cli_before_serving(tmp_path: Path) -> None:
    """Exit code 2 and a one-line reason, before any port is bound or weight read."""
    model = make_tiny_model("llama", tmp_path / "model", num_layers=2)
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    for adapters, words in [(str(tmp_path / "missing"), "no adapter_config.json"), (f"x={tmp_path / 'dora'}", "DoRA")]:
        result = subprocess.run(
            [str(BIN / "shard-server"), "--model", str(model), "--blocks", "0:2", "--adapters", adapters],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
