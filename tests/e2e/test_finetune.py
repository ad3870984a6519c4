"""Fine-tuning through real processes (issue 11): one dht-node and two chains of shard-servers over the same tiny
random Llama: a 2-server chain (0:2 twice, 2:4) and a 3-server chain (0:1, 1:3, 3:4, under another model id).

Through both chains, deep prompt tuning with client-owned LoRA and prompt-tuned classification give the logits
and gradients of a local transformers/peft model with the same frozen weights (fp32, relative error < 1e-5),
with and without padding; one AdamW step through the swarm equals one local step; after a few steps, the
adapter the client saves gives the swarm's logits in peft and serves from `shard-server --adapters`; generation
with deep prompts and client LoRA equals local greedy decoding; a server SIGKILLed between a training step's
Forward and Backward changes no gradient (the replica takes the hop). The kill test runs last.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from client_sdk import (
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
    DistributedModelForCausalLM,
)
from swarm.errors import MissingBlocks
from tests.launcher import Proc, SwarmProcesses
from tests.tuning_fakes import IDS, LEFT, PAD, RIGHT, TOL, causal_loss, make_tiny, padded
from tests.tuning_reference import deep_layout, pooled_index, prompted_hidden, rel_err

pytestmark = pytest.mark.e2e

CHAINS = {2: None, 3: "tiny-ft3"}  # servers in the chain -> model id (None: the folder's name)
ARGS = ("--num-threads", "1", "--throughput", "100", "--ttl", "6")


@dataclass
class Swarm:
    procs: SwarmProcesses
    dht: Proc
    servers: dict[str, Proc]  # by block range ("0:2a", "0:2b", "2:4", "0:1", "1:3", "3:4")
    path: Path


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Swarm]:
    path = make_tiny(tmp_path_factory.mktemp("tiny-ft"))
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        dht = procs.start_dht()
        plan = {"0:2a": ("0:2", ()), "0:2b": ("0:2", ()), "2:4": ("2:4", ())}
        plan |= {b: (b, ("--model-id", "tiny-ft3")) for b in ("0:1", "1:3", "3:4")}
        servers = {
            name: procs.start_server(path, blocks, [dht.address], *ARGS, *extra, name=name, wait=False)
            for name, (blocks, extra) in plan.items()
        }
        for server in servers.values():
            procs.wait_ready(server)
        yield Swarm(procs, dht, servers, path)
    finally:
        if request.session.testsfailed > failed_before:
            print(procs.logs())
        procs.close()


def connect(cls: Any, swarm: Swarm, chain: int, **kwargs: Any) -> Any:
    return cls.from_pretrained(swarm.path, initial_peers=[swarm.dht.address], model_id=CHAINS[chain], ban_s=60.0,
                               **kwargs)  # fmt: skip


def deep_lora_model(swarm: Swarm, chain: int) -> DistributedModelForCausalLM:
    """deep_ptune (2 prompt tokens) + LoRA on q/v/down with nonzero B, the same initial values every time."""
    from peft import LoraConfig

    torch.manual_seed(3)
    model: DistributedModelForCausalLM = connect(AutoDistributedModelForCausalLM, swarm, chain,
                                                 tuning_mode="deep_ptune", pre_seq_len=2)  # fmt: skip
    lora = model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


class LocalTuned:
    """The local reference of a deep_lora_model: peft with the saved adapter + the same prompts as leaves."""

    def __init__(self, model: DistributedModelForCausalLM, base: LlamaForCausalLM, folder: Path) -> None:
        from peft import PeftModel

        model.save_lora(folder)
        self.peft = PeftModel.from_pretrained(base, folder, is_trainable=True)
        self.shallow = torch.nn.Parameter(model.prompt_embeddings.weight.detach().clone())
        self.deep = torch.nn.Parameter(model.intermediate_prompt_embeddings.weight.detach().clone())

    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        base: Any = self.peft.base_model.model
        deep = deep_layout(self.deep, 4, ids.shape[0])
        return base.lm_head(prompted_hidden(base.model, ids, mask, self.shallow.unsqueeze(0), deep))

    def lora_param(self, block: int, module: str, side: str) -> torch.Tensor:
        params = dict(self.peft.named_parameters())
        return params[f"base_model.model.model.layers.{block}.{module}.lora_{side}.default.weight"]

    def parameters(self) -> list[torch.Tensor]:
        return [self.shallow, self.deep, *(p for p in self.peft.parameters() if p.requires_grad)]


def compare_grads(model: DistributedModelForCausalLM, ref: LocalTuned) -> None:
    assert rel_err(model.prompt_embeddings.weight.grad, ref.shallow.grad) < TOL  # type: ignore[arg-type]
    assert rel_err(model.intermediate_prompt_embeddings.weight.grad, ref.deep.grad) < TOL  # type: ignore[arg-type]
    assert model.lora is not None
    for block, module, _ in model.lora.targets:
        pair = model.lora.pair(block, module)
        for side, param in (("A", pair.lora_A.weight), ("B", pair.lora_B.weight)):
            assert rel_err(param.grad, ref.lora_param(block, module, side).grad) < TOL, (block, module, side)  # type: ignore[arg-type]


@pytest.mark.parametrize("chain", [2, 3])
@pytest.mark.parametrize("mask", [None, LEFT], ids=["nomask", "left"])
def test_deep_prompts_and_client_lora_gradients_equal_local(
    swarm: Swarm, tmp_path: Path, chain: int, mask: torch.Tensor | None
) -> None:
    model = deep_lora_model(swarm, chain)
    try:
        ref = LocalTuned(model, LlamaForCausalLM.from_pretrained(swarm.path), tmp_path / "ad")
        ids = padded(mask)
        out = model(ids, attention_mask=mask)
        causal_loss(out.logits, ids, mask).backward()
        ref_logits = ref.logits(ids, mask)
        causal_loss(ref_logits, ids, mask).backward()
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        assert rel_err(out.logits[real], ref_logits[real]) < TOL
        compare_grads(model, ref)
        hops = model.client.async_client.remote.last_trace.parts[0].hops  # type: ignore[union-attr]
        assert len(hops) == chain
    finally:
        model.client.close()


@pytest.mark.parametrize("chain", [2, 3])
@pytest.mark.parametrize("mask", [None, RIGHT, LEFT], ids=["nomask", "right", "left"])
def test_prompt_tuned_classification_equals_local(swarm: Swarm, chain: int, mask: torch.Tensor | None) -> None:
    model = connect(AutoDistributedModelForSequenceClassification, swarm, chain, num_labels=3, tuning_mode="ptune",
                    pre_seq_len=3)  # fmt: skip
    try:
        ref = LlamaForSequenceClassification.from_pretrained(swarm.path, num_labels=3)
        ref.score.weight.data.copy_(model.score.weight.data)
        shallow = torch.nn.Parameter(model.prompt_embeddings.weight.detach().clone())
        ids, labels = padded(mask), torch.tensor([2, 0, 1])
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        hidden = prompted_hidden(ref.model, ids, mask, shallow.unsqueeze(0))
        logits = ref.score(hidden)[torch.arange(3), pooled_index(ids, PAD)]
        ref.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=ref.config).backward()
        assert rel_err(out.logits, logits) < TOL
        assert rel_err(model.score.weight.grad, ref.score.weight.grad) < TOL
        assert rel_err(model.prompt_embeddings.weight.grad, shallow.grad) < TOL  # type: ignore[arg-type]
    finally:
        model.client.close()


def test_one_adamw_step_equals_a_local_step(swarm: Swarm, tmp_path: Path) -> None:
    model = deep_lora_model(swarm, 2)
    try:
        ref = LocalTuned(model, LlamaForCausalLM.from_pretrained(swarm.path), tmp_path / "ad")
        ours = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        ids = padded(RIGHT)
        causal_loss(model(ids, attention_mask=RIGHT).logits, ids, RIGHT).backward()
        causal_loss(ref.logits(ids, RIGHT), ids, RIGHT).backward()
        ours.step()
        theirs.step()
        with torch.no_grad():
            after, ref_after = model(ids, attention_mask=RIGHT).logits, ref.logits(ids, RIGHT)
        assert rel_err(model.prompt_embeddings.weight, ref.shallow) < TOL
        assert rel_err(model.intermediate_prompt_embeddings.weight, ref.deep) < TOL
        assert rel_err(after[RIGHT.bool()], ref_after[RIGHT.bool()]) < TOL
    finally:
        model.client.close()


def greedy_local(ref: LocalTuned, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache): the reference for generate with deep prompts + LoRA."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            token = ref.logits(seq, None)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def test_generate_with_deep_prompts_and_client_lora(swarm: Swarm, tmp_path: Path) -> None:
    """Petals #271: deep prompts work in generate and inference_session (prefill sends the prefix and its deep
    prompts; later steps carry none); client LoRA goes to every server once, at open."""
    model = deep_lora_model(swarm, 3)
    try:
        ref = LocalTuned(model, LlamaForCausalLM.from_pretrained(swarm.path), tmp_path / "ad")
        ids = IDS[:1]
        expected = greedy_local(ref, ids, 6)
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
        assert out[0, ids.shape[1] :].tolist() == expected
        with model.inference_session(max_length=20) as session:
            first = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
            assert session.position == ids.shape[1] + 2  # the prompt prefix is not counted
            # the user "types" the 4th greedy token; the 3rd (generated, not yet fed) goes first
            more = model.generate(torch.tensor([[expected[3]]]), max_new_tokens=2, min_new_tokens=2,
                                  do_sample=False, pad_token_id=PAD)  # fmt: skip
        assert first[0, ids.shape[1] :].tolist() == expected[:3]
        assert more[0, -2:].tolist() == expected[4:6]
    finally:
        model.client.close()


def test_saved_adapter_after_steps_gives_the_swarms_logits_in_peft_and_on_a_server(
    swarm: Swarm, tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel

    torch.manual_seed(5)
    model = connect(AutoDistributedModelForCausalLM, swarm, 2)
    server: Proc | None = None
    try:
        model.add_lora(LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = padded(None)
        for _ in range(3):
            opt.zero_grad()
            causal_loss(model(ids).logits, ids, None).backward()
            opt.step()
        with torch.no_grad():
            swarm_logits = model(ids).logits
        folder = tmp_path / "trained"
        model.save_lora(folder)
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(swarm.path), folder).eval()
        with torch.no_grad():
            assert rel_err(swarm_logits, peft_model(ids).logits) < TOL

        # the same folder served by a server (its own model id, so the other tests' routes never see it)
        server = swarm.procs.start_server(swarm.path, "0:4", [swarm.dht.address], *ARGS, "--model-id", "tiny-ad",
                                          "--adapters", f"trained={folder}", name="adapter")  # fmt: skip
        served = AutoDistributedModelForCausalLM.from_pretrained(
            swarm.path, initial_peers=[swarm.dht.address], model_id="tiny-ad", active_adapter="trained"
        )
        try:
            with torch.no_grad():
                assert rel_err(served(ids).logits, swarm_logits) < TOL
        finally:
            served.client.close()
        missing = AutoDistributedModelForCausalLM.from_pretrained(
            swarm.path, initial_peers=[swarm.dht.address], model_id="tiny-ad", active_adapter="nope"
        )
        try:
            with pytest.raises(MissingBlocks, match=r"blocks 0\.\.3.*adapter 'nope'"):
                missing(ids)
        finally:
            missing.client.close()
    finally:
        model.client.close()
        if server is not None:
            swarm.procs.stop(server)


def test_server_killed_between_forward_and_backward_changes_no_gradient(swarm: Swarm, tmp_path: Path) -> None:
    """Runs last: SIGKILLs the 0:2 server that ran the step's Forward; its replica takes the Backward."""
    model = deep_lora_model(swarm, 2)
    try:
        ref = LocalTuned(model, LlamaForCausalLM.from_pretrained(swarm.path), tmp_path / "ad")
        ids = padded(RIGHT)
        out = model(ids, attention_mask=RIGHT)
        trace = model.client.async_client.remote.last_trace
        assert trace is not None
        first = trace.parts[0].hops[0].span
        victim = next(p for p in swarm.servers.values() if p.address == first.address)
        swarm.procs.stop(victim, signal.SIGKILL)
        causal_loss(out.logits, ids, RIGHT).backward()
        causal_loss(ref.logits(ids, RIGHT), ids, RIGHT).backward()
        compare_grads(model, ref)
        assert first.peer_id in model.client.async_client.view.banned()
    finally:
        model.client.close()
