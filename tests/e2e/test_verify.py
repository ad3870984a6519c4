"""Verified outputs: a server serving wrong weights is caught, banned, and the generation stays exact.

Blocks 0:2 are held by two honest servers and by a cheater that loads a copy of the checkpoint with noise on
block 1 under the same --model-id (its records look exactly like the others') and announces itself as very
fast, so every route prefers it. With verify_fraction=1.0 every step of every span is recomputed on another
server holding it: the cheater is outvoted at its first step, distrusted for the client's lifetime, its steps
are redone on an honest server, and the tokens equal transformers'.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client_sdk import SwarmClient
from swarm.model_files import default_model_id
from tests.launcher import Proc, SwarmProcesses
from tests.reference import greedy_references

pytestmark = pytest.mark.e2e

PROMPT = [1, 39, 20, 99, 15, 82, 105, 35, 119]  # a prompt whose greedy tokens the noise changes
NEW_TOKENS = 12


def noisy_copy(src: Path, dst: Path, block: int) -> Path:
    """The checkpoint with Gaussian noise (std 0.05) on every weight of one block."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    prefix = f"model.layers.{block}."
    touched = [name for name in weights if name.startswith(prefix)]
    assert touched, sorted(weights)[:8]
    for name in touched:
        w = weights[name]
        weights[name] = w + 0.05 * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@dataclass
class Swarm:
    procs: SwarmProcesses
    dht: Proc
    cheater: Proc
    model: Path
    bad_model: Path


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    bad = noisy_copy(tiny_llama, tmp_path_factory.mktemp("bad") / "weights", block=1)
    model_id = default_model_id(tiny_llama)
    procs = SwarmProcesses()
    try:
        dht = procs.start_dht()
        # honest 0:2 servers announce themselves as slow: routes always prefer the cheater
        honest = [procs.start_server(tiny_llama, "0:2", [dht.address], "--throughput", "1", wait=False) for _ in "ab"]
        honest.append(procs.start_server(tiny_llama, "2:4", [dht.address], wait=False))
        cheater = procs.start_server(bad, "0:2", [dht.address], "--model-id", model_id, "--throughput", "1000000",
                                     name="cheater", wait=False)  # fmt: skip
        for p in [*honest, cheater]:
            procs.wait_ready(p)
        yield Swarm(procs, dht, cheater, tiny_llama, bad)
    finally:
        procs.close()


def reference(model_path: Path, prompt: list[int]) -> list[int]:
    return greedy_references(model_path, [prompt], NEW_TOKENS)[0]


def cheater_peer(client: SwarmClient, swarm: Swarm) -> str:
    return next(r.peer_id for r in client.info().servers if r.address == swarm.cheater.address)


def test_without_verification_the_cheater_corrupts_the_output(swarm: Swarm) -> None:
    # The premise: the fast cheater is on the route, and the tokens are those of its noisy weights.
    with SwarmClient([swarm.dht.address], swarm.model, refresh_period_s=0) as client:
        out = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert out == reference(swarm.bad_model, PROMPT) != reference(swarm.model, PROMPT)


def test_verification_catches_the_cheater_and_stays_exact(swarm: Swarm) -> None:
    expected = reference(swarm.model, PROMPT)
    with SwarmClient([swarm.dht.address], swarm.model, verify_fraction=1.0, refresh_period_s=0) as client:
        bad = cheater_peer(client, swarm)
        assert bad in {s.peer_id for s in client.async_client.view.route()}  # the fast cheater is on the route
        assert client.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS) == expected
        view, verifier = client.async_client.view, client.async_client.verifier
        assert verifier is not None and verifier.disagreements >= 1
        assert set(view.distrusted) == {bad}  # the honest servers were never blamed
        # banned for the client's lifetime: later sessions never route through it
        assert client.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS) == expected
        assert all(s.peer_id != bad for s in client.async_client.view.route())
