"""The cost of verified outputs: ms/token with verify_fraction 0, 0.05 and 1.0 on one honest swarm (two servers
per span), printed as a table. Every setting must give transformers' tokens; no timing is asserted.

Run with `-s` to see the table: `pytest -s tests/e2e/test_verify_overhead.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from client_sdk import SwarmClient
from tests.launcher import SwarmProcesses

pytestmark = pytest.mark.e2e

PROMPT = [1, 39, 20, 99, 15, 82, 105, 35, 119]
NEW_TOKENS = 32
REPEATS = 3


def test_verify_fraction_overhead(tiny_llama: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
    expected = out[0, len(PROMPT) :].tolist()
    rows = []
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        servers = [procs.start_server(tiny_llama, b, [dht.address], wait=False) for b in ("0:2", "0:2", "2:4", "2:4")]
        for s in servers:
            procs.wait_ready(s)
        for fraction in (0.0, 0.05, 1.0):
            with SwarmClient([dht.address], tiny_llama, verify_fraction=fraction, refresh_period_s=0) as client:
                client.generate(PROMPT, max_new_tokens=2, eos_token_id=None)  # warm up channels
                times = []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    assert client.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS) == expected
                    times.append((time.perf_counter() - t0) * 1000 / NEW_TOKENS)
                verifier = client.async_client.verifier
                checks = verifier.checks if verifier is not None else 0
                assert verifier is None or verifier.disagreements == 0  # honest servers never disagree
            rows.append((fraction, min(times), sorted(times)[len(times) // 2], checks))
    print("\nverify_fraction  ms/token (best)  ms/token (median)  span checks")
    for fraction, best, median, checks in rows:
        print(f"{fraction:>15.2f}  {best:>15.2f}  {median:>17.2f}  {checks:>11d}")
