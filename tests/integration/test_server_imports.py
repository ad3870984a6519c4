"""A shard server stays light: a fresh interpreter that starts one (in-process, on the tiny Llama) and runs a
Forward and an inference step never imports transformers, peft, bitsandbytes (no --quant), prometheus_client
(no --metrics-port), huggingface_hub (a local folder) or torch._dynamo. Each of them costs ~0.1-4.5 s of start-up
and tens of MiB; one stray import on the server's path would silently bring that back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, json, sys
import torch
from shard_server import ShardServer, ShardServerConfig
from shard_server.backend import KvHandle, StepItem
from swarm.blocks import BlockRange

async def main() -> None:
    server = ShardServer(ShardServerConfig(model=sys.argv[1], blocks=BlockRange(0, 2), throughput_tps=1.0))
    await server.start()
    backend = server.servicer.backend
    await server.scheduler.run(backend.forward, backend.blocks, torch.randn(1, 3, 64))
    kv = KvHandle(backend.blocks, 1, 8)
    await server.scheduler.submit(backend, StepItem(kv, 0, torch.randn(1, 3, 64))).result()
    await server.stop()

asyncio.run(main())
heavy = ("transformers", "peft", "bitsandbytes", "prometheus_client", "huggingface_hub", "torch._dynamo")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m.startswith("torch._dynamo"))))
"""


def test_a_running_server_imports_nothing_heavy(tiny_llama: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
