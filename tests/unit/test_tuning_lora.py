"""The client half of client-owned LoRA, batches split into parts, Backward failover and bad input, against fake
servers that keep the wire contract (tests/tuning_fakes.py, no sockets): gradients equal a local peft model; the
saved adapter is a standard PEFT folder; parts and a server lost between Forward and Backward change nothing;
bad input fails before anything is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from client_sdk.model import DistributedModelForCausalLM
from tests.tuning_fakes import (
    IDS,
    LEFT,
    RIGHT,
    TOL,
    FakeClient,
    Swarm,
    build,
    causal_loss,
    make_swarm,
    make_tiny,
    padded,
)
from tests.tuning_reference import prompted_hidden, rel_err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-ft"))


@pytest.fixture(scope="module")
def swarm(tiny: Path) -> Swarm:
    return make_swarm(tiny)


# ---- client-owned LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, LEFT], ids=["nomask", "left"])
def test_client_lora_matches_peft(swarm: Swarm, tiny: Path, tmp_path: Path, mask: torch.Tensor | None) -> None:
    from peft import LoraConfig, PeftModel

    model: DistributedModelForCausalLM = build(DistributedModelForCausalLM, swarm.client("a", "b"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    lora = model.add_lora(config)
    assert len(lora.targets) == 4 * 3 and all(s == 8 / 2 for _, _, s in lora.targets)  # rsLoRA: alpha / sqrt(r)
    assert all(p.requires_grad == n.startswith("lora.") for n, p in model.named_parameters())
    assert all(not p.detach().any() for n, p in lora.named_parameters() if "lora_B" in n)  # PEFT's init
    with torch.no_grad():  # B starts at zero (PEFT's init); make it nonzero so A gets a gradient too
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_lora(tmp_path / "adapter")
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny), tmp_path / "adapter", is_trainable=True)
    ids = padded(mask)
    out = model(ids, attention_mask=mask)
    causal_loss(out.logits, ids, mask).backward()
    base: Any = ref.base_model.model  # the transformers model with LoRA layers
    ref_logits = base.lm_head(prompted_hidden(base.model, ids, mask))
    causal_loss(ref_logits, ids, mask).backward()
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert rel_err(out.logits[real], ref_logits[real]) < TOL
    ref_params = dict(ref.named_parameters())
    for block, module, _ in lora.targets:
        pair = lora.pair(block, module)
        for side, param in (("A", pair.lora_A.weight), ("B", pair.lora_B.weight)):
            theirs = ref_params[f"base_model.model.model.layers.{block}.{module}.lora_{side}.default.weight"]
            assert torch.equal(param.detach(), theirs.detach())
            assert param.grad is not None and theirs.grad is not None and param.grad.abs().sum() > 0
            assert rel_err(param.grad, theirs.grad) < TOL, (block, module, side)


def test_saved_adapter_has_peft_names_and_config(swarm: Swarm, tiny: Path, tmp_path: Path) -> None:
    import json

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"o_proj": 3})
    model = build(DistributedModelForCausalLM, swarm.client("a", "b"))
    model.add_lora(config)
    model.save_lora(tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    theirs = get_peft_model_state_dict(get_peft_model(LlamaForCausalLM.from_pretrained(tiny), config))
    assert set(saved) == set(theirs)
    assert all(saved[k].shape == theirs[k].shape for k in saved)  # o_proj has rank 3, the rest 2
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 2 and written["rank_pattern"] == {"o_proj": 3}


def test_unsupported_lora_configs_fail_clearly(swarm: Swarm) -> None:
    from peft import LoraConfig

    model = build(DistributedModelForCausalLM, swarm.client("a", "b"))
    with pytest.raises(ValueError, match="DoRA"):
        model.add_lora(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="matches no linear module"):
        model.add_lora(LoraConfig(r=2, target_modules=["nonexistent"]))
    with pytest.raises(RuntimeError, match="add_lora"):
        model.save_lora("/nonexistent")


# ---- parts, failover, bad input ---------------------------------------------------------------------------


def tuned_model(client: FakeClient) -> DistributedModelForCausalLM:
    """deep_ptune + LoRA with the same initial values every time."""
    from peft import LoraConfig

    torch.manual_seed(1)
    model: DistributedModelForCausalLM = build(DistributedModelForCausalLM, client, "deep_ptune", 2)
    model.add_lora(LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def grads_of(model: DistributedModelForCausalLM, mask: torch.Tensor | None = RIGHT) -> dict[str, torch.Tensor]:
    ids = padded(mask)
    out = model(ids, attention_mask=mask)
    causal_loss(out.logits, ids, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref) and len(ref) == 2 + 4 * 2 * 2
    for name, g in ref.items():
        assert rel_err(got[name], g) < TOL, name


def test_batch_split_into_parts_gives_the_same_gradients(swarm: Swarm) -> None:
    ref = grads_of(tuned_model(swarm.client("a", "b")))
    client = swarm.client("a", "b", "c", max_tokens_per_call=2 * (8 + 2))  # 2 rows (8 tokens + 2 prompts) a part
    got = grads_of(tuned_model(client))
    assert_same_grads(got, ref)
    backward_rows = sorted(rows for p in "abc" for kind, _, _, rows in swarm.servers[p].calls if kind == "backward")
    assert backward_rows == [1, 1, 2, 2]  # two parts of the 3 rows, each through two hops


def test_backward_over_a_servers_limit_is_halved(swarm: Swarm) -> None:
    ref = grads_of(tuned_model(swarm.client("a", "b")))
    client = swarm.client("a", "b")
    swarm.servers["b"].max_backward_rows = 1
    got = grads_of(tuned_model(client))
    assert_same_grads(got, ref)
    assert [rows for kind, _, _, rows in swarm.servers["b"].calls if kind == "backward"] == [1, 1, 1]
    assert [rows for kind, _, _, rows in swarm.servers["a"].calls if kind == "backward"] == [3]


@pytest.mark.parametrize("case", ["replica", "split"])
def test_server_lost_before_backward_changes_nothing(swarm: Swarm, case: str) -> None:
    """The server of a hop dies between Forward and Backward: the hop is redone on a replica, or, when no live
    server holds the whole hop, its pieces are forwarded again and then back-propagated."""
    ref = grads_of(tuned_model(swarm.client("a", "b")))
    first = "a" if case == "replica" else "d"
    swarm.servers[first].throughput = 1e9  # the forward goes through it (throughput-weighted routes)
    try:
        model = tuned_model(swarm.client(first, "b", "c" if case == "replica" else "a"))
        ids = padded(RIGHT)
        out = model(ids, attention_mask=RIGHT)
        assert {p for p in swarm.servers if any(k == "forward" for k, *_ in swarm.servers[p].calls)} >= {first}
        swarm.servers[first].dead = True
        causal_loss(out.logits, ids, RIGHT).backward()
    finally:
        swarm.servers[first].throughput = 1.0
    assert_same_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ref)  # type: ignore[misc]
    if case == "replica":
        assert [c[:3] for c in swarm.servers["c"].calls] == [("backward", 0, 2)]
    else:  # d held 0:4; a (0:2) and b (2:4) re-ran the forward of the pieces, then their backward
        assert [c[0] for c in swarm.servers["a"].calls] == ["forward", "backward"]


def test_bad_input_fails_before_sending(swarm: Swarm) -> None:
    from swarm.errors import InvalidRequest

    client = swarm.client("a", "b")
    model = tuned_model(client)
    hidden = torch.randn(2, 5, 64)
    bad: list[tuple[Any, type[Exception]]] = [
        (lambda: model(IDS[0]), ValueError),  # 1-D ids
        (lambda: model(IDS + 1000), ValueError),  # out of the vocabulary
        (lambda: model(IDS, inputs_embeds=torch.randn(3, 8, 64)), ValueError),  # both
        (lambda: model(inputs_embeds=torch.randn(3, 8, 32)), ValueError),  # wrong hidden size
        (lambda: model(IDS, attention_mask=RIGHT[:, :5]), ValueError),
        (lambda: model(IDS, labels=IDS[:, :4]), ValueError),
        (lambda: model.layers(hidden, prompts=torch.randn(3, 1, 2, 64)), InvalidRequest),  # 3 blocks, not 4
        (lambda: model.layers(hidden, prompts=torch.randn(4, 1, 2, 32)), InvalidRequest),  # wrong hidden size
        (lambda: model.layers(hidden, prompts=torch.randn(4, 3, 2, 64)), InvalidRequest),  # batch 3 for 2 rows
        (lambda: model.layers(hidden[:, :1], prompts=torch.randn(4, 1, 2, 64)), InvalidRequest),  # seq < prefix
        (lambda: model.layers(hidden, torch.ones(2, 4)), InvalidRequest),  # mask shape
        (lambda: model.layers(hidden[0]), InvalidRequest),  # 2-D hidden
    ]
    for call, error in bad:
        with pytest.raises(error):
            call()
    assert all(not s.calls for s in swarm.servers.values())
    remote = client.async_client.remote
    _, trace = client.run(remote.forward(hidden))
    with pytest.raises(InvalidRequest, match="grad_output"):
        client.run(remote.backward(torch.randn(2, 4, 64), trace))
