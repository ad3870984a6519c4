"""The client half of prompt tuning and sequence classification against fake servers that keep the wire
contract (tests/tuning_fakes.py, no sockets): logits and gradients equal a local transformers model with the
same frozen weights, with and without padding. The servers' own implementation is tested end to end in
tests/e2e/test_finetune.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from client_sdk.classification import DistributedModelForSequenceClassification
from client_sdk.model import DistributedModelForCausalLM
from tests.tuning_fakes import LEFT, PAD, RIGHT, TOL, Swarm, build, causal_loss, make_swarm, make_tiny, padded
from tests.tuning_reference import deep_layout, pooled_index, prompted_hidden, rel_err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-ft"))


@pytest.fixture(scope="module")
def swarm(tiny: Path) -> Swarm:
    return make_swarm(tiny)


@pytest.fixture(scope="module")
def local(tiny: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny).eval()


# ---- prompt tuning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
@pytest.mark.parametrize("mask", [None, RIGHT, LEFT], ids=["nomask", "right", "left"])
def test_prompt_gradients_match_local_transformers(
    swarm: Swarm, local: LlamaForCausalLM, mode: str, mask: torch.Tensor | None
) -> None:
    client = swarm.client("a", "b")
    model: DistributedModelForCausalLM = build(DistributedModelForCausalLM, client, mode, 3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = ["prompt_embeddings.weight"] + (
        ["intermediate_prompt_embeddings.weight"] if mode == "deep_ptune" else []
    )
    assert trainable == sorted(expected)
    ids = padded(mask)
    out = model(ids, attention_mask=mask)
    assert out.logits.shape == (3, 8, 128)  # the prefix is cut off
    causal_loss(out.logits, ids, mask).backward()

    shallow = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep_w = None
    deep = None
    if mode == "deep_ptune":
        deep_w = model.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = deep_layout(deep_w, 4, 3)
    hidden = prompted_hidden(local.model, ids, mask, shallow.unsqueeze(0), deep)
    ref_logits = local.lm_head(hidden)
    causal_loss(ref_logits, ids, mask).backward()
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()  # padding outputs are junk
    assert rel_err(out.logits[real], ref_logits[real]) < TOL
    assert rel_err(model.prompt_embeddings.weight.grad, shallow.grad) < TOL  # type: ignore[arg-type]
    if deep_w is not None:
        assert deep_w.grad is not None and deep_w.grad.abs().sum() > 0
        assert rel_err(model.intermediate_prompt_embeddings.weight.grad, deep_w.grad) < TOL  # type: ignore[arg-type]
    # each server got only its own blocks' deep prompt slices (checked by the fake's zip over its layers)
    assert {(k, a, b) for k, a, b, _ in swarm.servers["a"].calls} == {("forward", 0, 2), ("backward", 0, 2)}


# ---- sequence classification -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_cls(tiny: Path) -> LlamaForSequenceClassification:
    return LlamaForSequenceClassification.from_pretrained(tiny, num_labels=3).eval()


@pytest.mark.parametrize("mask", [None, RIGHT, LEFT], ids=["nomask", "right", "left"])
def test_classification_matches_transformers(
    swarm: Swarm, local_cls: LlamaForSequenceClassification, mask: torch.Tensor | None
) -> None:
    """No prompts: the score head's logits, loss and gradient equal transformers' own forward."""
    model: DistributedModelForSequenceClassification = build(
        DistributedModelForSequenceClassification, swarm.client("a", "b"), num_labels=3
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
    local_cls.score.weight.data.copy_(model.score.weight.data)
    local_cls.zero_grad()
    ids, labels = padded(mask), torch.tensor([2, 0, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    # transformers' own forward; with left padding, positions as generate makes them (the servers' rule)
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    ref = local_cls(ids, attention_mask=mask, position_ids=positions, labels=labels)
    ref.loss.backward()
    assert rel_err(out.logits, ref.logits) < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL * abs(ref.loss.item())
    assert rel_err(model.score.weight.grad, local_cls.score.weight.grad) < TOL  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "labels"), [
    ("deep_ptune", torch.tensor([2, 0, 1])),  # single-label
    ("ptune", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),  # multi-label (float)
])  # fmt: skip
def test_prompt_tuned_classification_gradients(
    swarm: Swarm, local_cls: LlamaForSequenceClassification, mode: str, labels: torch.Tensor
) -> None:
    model: DistributedModelForSequenceClassification = build(
        DistributedModelForSequenceClassification, swarm.client("e", "f", "g"), mode, 2, num_labels=3
    )
    local_cls.score.weight.data.copy_(model.score.weight.data)
    local_cls.zero_grad()
    local_cls.config.problem_type = None
    ids = padded(RIGHT)
    out = model(ids, attention_mask=RIGHT, labels=labels)
    out.loss.backward()
    assert model.config.problem_type == local_cls.config.problem_type or local_cls.config.problem_type is None

    shallow = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep_w = deep = None
    if mode == "deep_ptune":
        deep_w = model.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = deep_layout(deep_w, 4, 3)
    hidden = prompted_hidden(local_cls.model, ids, RIGHT, shallow.unsqueeze(0), deep)
    logits = local_cls.score(hidden)[torch.arange(3), pooled_index(ids, PAD)]
    loss = local_cls.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=local_cls.config)
    loss.backward()
    assert model.config.problem_type == local_cls.config.problem_type
    assert rel_err(out.logits, logits) < TOL
    assert rel_err(model.score.weight.grad, local_cls.score.weight.grad) < TOL  # type: ignore[arg-type]
    assert rel_err(model.prompt_embeddings.weight.grad, shallow.grad) < TOL  # type: ignore[arg-type]
    if deep_w is not None:
        assert rel_err(model.intermediate_prompt_embeddings.weight.grad, deep_w.grad) < TOL  # type: ignore[arg-type]
    assert {(a, b) for _, a, b, _ in swarm.servers["f"].calls} == {(1, 3)}
