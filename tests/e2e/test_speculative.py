"""Speculative decoding end to end: a dht-node and shard-servers (0:2 twice, 2:4) of a tiny random Llama, real
processes. Every greedy output, whatever the draft, must equal local transformers' greedy output token for token:
- a different random model with the same vocabulary (few drafts accepted: mostly the correction path),
- a noised copy of the target's weights (most drafts accepted, some rejected: partial acceptance and rollbacks),
- self-speculation ("self:N": the target's first N blocks + its head), also with N = all blocks (every draft
  accepted, so k grows),
- prompt lookup ("prompt-lookup", "lookup:N": no draft model, continuations of earlier n-grams),
- a local transformers model as the draft, and `generate(assistant_model=...)` on the distributed HF model
  (transformers' assisted generation crops our RemoteCache, which rolls the session back).
The last test kills (SIGKILL) the 0:2 server in use mid-generation: the failover replays the span's history, which
must hold the kept tokens only, so the output stays exact.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from client_sdk import AutoDistributedModelForCausalLM, SwarmClient
from client_sdk.model import RemoteCache
from client_sdk.speculative import SpeculationStats
from swarm.errors import InvalidRequest
from tests.launcher import Proc, SwarmProcesses
from tests.models import make_tiny_llama

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]
NEW = 40


@dataclass
class Swarm:
    procs: SwarmProcesses
    dht: Proc
    servers: list[Proc]


@pytest.fixture(scope="module")
def swarm(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        dht = procs.start_dht()
        args = ("--num-threads", "1", "--throughput", "100", "--ttl", "6")
        servers = procs.start_servers(tiny_llama, ("0:2", "0:2", "2:4"), [dht.address], *args)
        yield Swarm(procs, dht, servers)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


@pytest.fixture(scope="module")
def local(tiny_llama: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture(scope="module")
def reference(local: LlamaForCausalLM) -> list[int]:
    """Local transformers greedy: NEW tokens after PROMPT (EOS kept out, as min_new_tokens does)."""
    ids = torch.tensor([PROMPT])
    out = local.generate(ids, attention_mask=torch.ones_like(ids), **greedy(NEW))  # type: ignore[arg-type]
    return list(out[0, len(PROMPT) :].tolist())


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random Llama with the same vocabulary (2 blocks, other seed): a poor but valid draft."""
    return make_tiny_llama(tmp_path_factory.mktemp("other-llama"), num_layers=2, seed=1)


@pytest.fixture(scope="module")
def noised_model(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target's weights plus a little noise: agrees with the target on most tokens, not all."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    path = tmp_path_factory.mktemp("noised-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def client(swarm: Swarm, tiny_llama: Path) -> Iterator[SwarmClient]:
    with SwarmClient([swarm.dht.address], tiny_llama, ban_s=60.0) as c:
        yield c


def greedy(n: int) -> dict[str, Any]:
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}


def speculate(client: SwarmClient, draft: Any, **kw: Any) -> tuple[list[int], SpeculationStats]:
    out = client.generate(PROMPT, NEW, min_new_tokens=NEW, draft_model=draft, **kw)
    stats = client.async_client.last_speculation
    assert stats is not None
    name = draft if isinstance(draft, str | Path) else type(draft).__name__
    print(f"\n{name}: {stats.steps} trips for {stats.tokens} tokens, acceptance {stats.acceptance_rate:.0%}, "
          f"k per trip {stats.draft_lengths}")  # fmt: skip
    return out, stats


def test_plain_client_matches_transformers(client: SwarmClient, reference: list[int]) -> None:
    assert client.generate(PROMPT, NEW, min_new_tokens=NEW) == reference


def test_random_draft_with_the_same_vocabulary(client: SwarmClient, reference: list[int], other_model: Path) -> None:
    out, stats = speculate(client, str(other_model))
    assert out == reference
    assert stats.tokens == NEW and stats.drafted > 0


def test_noised_copy_partial_acceptance_and_rollbacks(
    client: SwarmClient, reference: list[int], noised_model: Path
) -> None:
    out, stats = speculate(client, noised_model)
    assert out == reference
    assert 0 < stats.accepted < stats.drafted  # some drafts kept, some rejected
    assert stats.rollbacks > 0 and stats.steps < NEW  # fewer round trips than tokens


def test_self_speculation(client: SwarmClient, reference: list[int]) -> None:
    out, stats = speculate(client, "self:2")
    assert out == reference
    # all blocks: the draft is the target computed locally, so every draft is kept and k grows at every trip
    out, stats = speculate(client, "self:4", num_draft_tokens=2)
    assert out == reference
    assert stats.accepted == stats.drafted and stats.rollbacks == 0
    assert stats.draft_lengths[:3] == [2, 4, 6]


def test_prompt_lookup(client: SwarmClient, local: LlamaForCausalLM) -> None:
    """No draft model: drafts are what followed an earlier occurrence of the last n-gram (transformers' prompt
    lookup). A prompt that repeats itself, and a random model's greedy output that falls into loops, give it
    matches; the output is plain greedy token for token, with fewer round trips than tokens."""
    prompt = [*PROMPT, 30, 31, 32, 33] * 3
    ids = torch.tensor([prompt])
    ref = local.generate(ids, attention_mask=torch.ones_like(ids), **greedy(NEW))[0, len(prompt) :].tolist()  # type: ignore[arg-type]
    assert client.generate(prompt, NEW, min_new_tokens=NEW) == ref
    for spec, k in (("prompt-lookup", 10), ("lookup:1", 10), ("lookup:3", 3)):
        kw = {} if k == 10 else {"num_draft_tokens": k}
        out = client.generate(prompt, NEW, min_new_tokens=NEW, draft_model=spec, **kw)
        stats = client.async_client.last_speculation
        assert stats is not None
        print(f"\n{spec}: {stats.steps} trips for {stats.tokens} tokens, acceptance {stats.acceptance_rate:.0%}, "
              f"drafts per trip {stats.draft_lengths}")  # fmt: skip
        assert out == ref
        assert stats.accepted > 0 and stats.steps < NEW
        assert max(stats.draft_lengths) <= k  # k is fixed: a lookup proposes what it finds, up to k
    # transformers' own prompt lookup on the same prompt: the same tokens as well
    hf = local.generate(ids, attention_mask=torch.ones_like(ids), prompt_lookup_num_tokens=10, **greedy(NEW))  # type: ignore[arg-type]
    assert hf[0, len(prompt) :].tolist() == ref
    with pytest.raises(InvalidRequest, match="lookup:N"):
        client.generate(prompt, 4, draft_model="lookup:x")


def test_fixed_k(client: SwarmClient, reference: list[int]) -> None:
    out, stats = speculate(client, "self:3", num_draft_tokens=3, adaptive_draft=False)
    assert out == reference
    assert set(stats.draft_lengths[:-1]) == {3}  # the last trip may be cut short by max_new_tokens


def test_transformers_model_as_draft(client: SwarmClient, reference: list[int], noised_model: Path) -> None:
    out, _ = speculate(client, LlamaForCausalLM.from_pretrained(noised_model).eval())
    assert out == reference


def test_eos_stops_at_the_same_token(client: SwarmClient, reference: list[int]) -> None:
    eos = reference[NEW // 2]
    first = reference.index(eos)
    plain = client.generate(PROMPT, NEW, eos_token_id=eos)
    assert plain == reference[: first + 1]
    assert client.generate(PROMPT, NEW, eos_token_id=eos, draft_model="self:4") == plain
    assert client.generate(PROMPT, NEW, eos_token_id=eos, draft_model="self:2") == plain


def test_short_generations(client: SwarmClient, reference: list[int]) -> None:
    for n in (1, 2, 3):  # no room for drafts at first, then one, then two
        assert client.generate(PROMPT, n, min_new_tokens=n, draft_model="self:4") == reference[:n]
    assert client.generate(PROMPT, 0, draft_model="self:4") == []


def test_stream_with_a_draft(client: SwarmClient, reference: list[int]) -> None:
    tokens = list(client.stream(PROMPT, NEW, eos_token_id=None, draft_model="self:2"))
    assert tokens == reference


def test_refused_clearly(client: SwarmClient) -> None:
    with pytest.raises(InvalidRequest, match="one sequence at a time"):
        client.generate(torch.tensor([PROMPT, PROMPT]), 4, draft_model="self:2")
    with pytest.raises(InvalidRequest, match="N must be in 1..4"):
        client.generate(PROMPT, 4, draft_model="self:9")
    with pytest.raises(InvalidRequest, match="num_draft_tokens"):
        client.generate(PROMPT, 4, draft_model="self:2", num_draft_tokens=0)


def test_speculative_sampling_runs_seeded(client: SwarmClient) -> None:
    """Sampling accepts drafts by the speculative-sampling rule (its distribution is checked in
    tests/unit/test_speculative_rules.py): here, the same seed gives the same tokens, and a draft equal to the target
    has every draft accepted (p == q)."""
    kw = {"do_sample": True, "temperature": 0.8, "top_k": 40, "seed": 5, "eos_token_id": None}
    a = client.generate(PROMPT, 16, draft_model="self:4", **kw)
    stats = client.async_client.last_speculation
    assert stats is not None and stats.accepted == stats.drafted
    assert client.generate(PROMPT, 16, draft_model="self:4", **kw) == a
    assert len(client.generate(PROMPT, 16, draft_model="self:2", **kw)) == 16


def test_hf_assisted_generation(
    swarm: Swarm, tiny_llama: Path, local: LlamaForCausalLM, noised_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crops: list[int] = []
    crop = RemoteCache.crop

    def counting_crop(self: RemoteCache, tokens_to_remove: int) -> None:
        crops.append(tokens_to_remove)
        crop(self, tokens_to_remove)

    monkeypatch.setattr(RemoteCache, "crop", counting_crop)
    assistant = LlamaForCausalLM.from_pretrained(noised_model).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[swarm.dht.address])
    try:
        ids = torch.tensor([PROMPT])
        ref = local.generate(ids, attention_mask=torch.ones_like(ids), **greedy(NEW))  # type: ignore[arg-type]
        out = model.generate(ids, assistant_model=assistant, **greedy(NEW))
        assert out.tolist() == ref.tolist()
        assert any(c < 0 for c in crops)  # drafts were rejected and the servers rolled back
        # prompt lookup (drafts copied from earlier n-grams, no draft model) is assisted generation too
        out = model.generate(ids, prompt_lookup_num_tokens=3, **greedy(NEW))
        assert out.tolist() == ref.tolist()
    finally:
        model.client.close()


def test_hf_assisted_sampling_and_self_speculation(
    swarm: Swarm, tiny_llama: Path, local: LlamaForCausalLM, noised_model: Path
) -> None:
    """Seeded assisted sampling draws exactly what local transformers draws with the same assistant (the target
    logits are the same, so transformers' speculative sampling consumes the same random numbers); and the target's
    first blocks as a transformers assistant (`num_hidden_layers=N`: self-speculation in transformers' terms)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[swarm.dht.address])
    try:
        ids = torch.tensor([PROMPT])
        assistant = LlamaForCausalLM.from_pretrained(noised_model).eval()
        kw = {**greedy(16), "do_sample": True, "temperature": 0.7, "top_k": 30}
        torch.manual_seed(11)
        ref = local.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, **kw)  # type: ignore[arg-type]
        torch.manual_seed(11)
        assert model.generate(ids, assistant_model=assistant, **kw).tolist() == ref.tolist()

        shallow = LlamaForCausalLM.from_pretrained(tiny_llama, num_hidden_layers=2).eval()
        ref = local.generate(ids, attention_mask=torch.ones_like(ids), **greedy(NEW))  # type: ignore[arg-type]
        assert model.generate(ids, assistant_model=shallow, **greedy(NEW)).tolist() == ref.tolist()
    finally:
        model.client.close()


def test_failover_during_speculative_generation(
    client: SwarmClient, swarm: Swarm, reference: list[int], noised_model: Path
) -> None:
    """Runs last: SIGKILL the 0:2 server the session uses after 12 tokens; the output must stay exact."""
    by_address = {p.address: p for p in swarm.servers}
    killed: list[str] = []
    tokens: list[int] = []
    for token in client.stream(PROMPT, NEW, eos_token_id=None, draft_model=noised_model):
        tokens.append(token)
        if len(tokens) >= 12 and not killed:
            session = client.async_client.active_session
            assert session is not None
            killed.append(str(session.spans[0]))
            address = killed[0].split("@")[1]
            swarm.procs.stop(by_address[address], signal.SIGKILL)  # the generator waits at a yield meanwhile
    assert tokens == reference
    failovers = client.async_client.last_failovers
    stats = client.async_client.last_speculation
    print(f"\nkilled {killed[0]}: failovers {failovers}; {stats}")
    assert failovers and failovers[0].span == killed[0]
    assert stats is not None and stats.rollbacks > 0
