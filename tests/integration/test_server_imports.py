"""A shard server stays light: a fresh interpreter that starts one (in-process, on the tiny Llama) and runs a
Forward (plain and with fine-tuning: deep prompts and client LoRA) and an inference step never imports
transformers, peft, bitsandbytes (no --quant), prometheus_client (no --metrics-port), huggingface_hub (a local
folder) or torch._dynamo. Each of them costs ~0.1-4.5 s of start-up and tens of MiB; one stray import on the
server's path would silently bring that back. With --adapters the server reads PEFT's files itself: still no peft.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

SCRIPT = """
import asyncio, json, sys
import torch
from shard_server import ShardServer, ShardServerConfig
from shard_server.backend import KvHandle, StepItem
from shard_server.tuning import RequestTuning
from swarm.blocks import BlockRange
from swarm.models.lora import LoraWeights

async def main() -> None:
    adapters = tuple(sys.argv[2:])
    config = ShardServerConfig(model=sys.argv[1], blocks=BlockRange(0, 2), throughput_tps=1.0, adapters=adapters)
    server = ShardServer(config)
    await server.start()
    backend = server.servicer.backend
    await server.scheduler.run(backend.forward, backend.blocks, torch.randn(1, 3, 64))
    lora = [((0, "self_attn.q_proj"), LoraWeights(torch.randn(2, 64), torch.randn(64, 2), 1.0))]
    tuning = RequestTuning(torch.randn(2, 1, 2, 64), lora, server.servicer.limits.adapters.get("ad"))
    await server.scheduler.run(backend.backward, backend.blocks, torch.randn(1, 3, 64), torch.randn(1, 3, 64),
                               None, tuning)
    kv = KvHandle(backend.blocks, 1, 8)
    await server.scheduler.submit(backend, StepItem(kv, 0, torch.randn(1, 3, 64))).result()
    await server.stop()

asyncio.run(main())
heavy = ("transformers", "peft", "bitsandbytes", "prometheus_client", "huggingface_hub", "torch._dynamo")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("torch._dynamo"))))
"""


def imports_of_a_running_server(model: Path, *adapters: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), *adapters], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_a_running_server_imports_nothing_heavy(tiny_llama: Path) -> None:
    assert imports_of_a_running_server(tiny_llama) == []


def test_a_server_with_adapters_does_not_import_peft(tiny_llama: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(tmp_path / "ad")
    assert imports_of_a_running_server(tiny_llama, f"ad={tmp_path / 'ad'}") == []
