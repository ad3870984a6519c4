"""Backward with fine-tuning, on the server's backend: gradients w.r.t. the span's input, the deep prompts and the
client's LoRA weights equal autograd through transformers + peft with the same prompts (relative error < 1e-5),
over two spans like two servers, with and without a padding mask, in both of the backend's ways (one graph, or
block by block); deep prompts in an inference session equal a Forward with them; and the activation model is an
upper bound of what autograd really keeps (the memory a Backward is allowed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard_server.backend import BlockBackend, KvHandle, StepItem
from shard_server.memory import (
    DEFAULT_BACKWARD_TOKENS,
    PLAN_CACHE_TOKENS,
    activation_model,
    plan_num_blocks,
    usable_bytes,
)
from shard_server.tuning import RequestTuning
from swarm.blocks import BlockRange
from swarm.models import Segment
from swarm.models.lora import LoraKey, LoraWeights
from tests.family_checks import one_thread
from tests.models import FAMILIES
from tests.unit.test_lora import LENGTH, Model, client_lora, peft_model, reference_logits

RTOL = 1e-5
PRE = 3  # pre_seq_len


def rel_err(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).norm() / expected.norm()).item()


def backend_for(model: Model, whole_graph: bool) -> BlockBackend:
    backend = BlockBackend(model.span, torch.device("cpu"), torch.float32)
    backend.estimate_activations = activation_model(model.family, torch.float32).bytes
    backend.activation_budget_bytes = 1 << 40 if whole_graph else 0
    return backend


def detached(lora: list[tuple[LoraKey, LoraWeights]], blocks: BlockRange) -> list[tuple[LoraKey, LoraWeights]]:
    """What the client sends for `blocks`: copies of its weights."""
    return [
        (key, LoraWeights(w.a.detach().clone(), w.b.detach().clone(), w.scaling))
        for key, w in lora
        if blocks.start <= key[0] < blocks.end
    ]


@pytest.mark.parametrize("whole_graph", [True, False], ids=["one-graph", "block-by-block"])
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_gradients_equal_transformers_and_peft(family: str, whole_graph: bool, tmp_path: Path) -> None:
    with one_thread():
        model = Model.build(family, tmp_path)
        n, hidden_size = model.family.num_blocks, model.family.hidden_size
        pm = peft_model(model, rank=4, alpha=8.0, seed=3)
        lora = client_lora(model, pm, scaling=2.0)
        backend = backend_for(model, whole_graph)
        # prompts broadcast over the batch for llama, one per row for bloom
        prompt_batch = 1 if family == "llama" else 2
        generator = torch.Generator().manual_seed(5)
        for mask in (None, torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * LENGTH], dtype=torch.bool)):
            ids = model.ids(2)
            prompts = torch.randn(n, prompt_batch, PRE, hidden_size, generator=generator).requires_grad_(True)
            weights = torch.randn(2, LENGTH, 128, generator=generator)
            real = torch.ones(2, LENGTH, dtype=torch.bool) if mask is None else mask

            logits, inputs = reference_logits(model, pm, ids, mask, prompts)
            loss = (logits[real] * weights[real]).sum()
            params = [t for _, w in lora for t in (w.a, w.b)]
            expected = torch.autograd.grad(loss, [inputs[0], inputs[2], prompts, *params])

            # ours: two spans as two servers, [0, 2) then [2, 4); the client's graph is just the head
            spans = (BlockRange(0, 2), BlockRange(2, n))
            x0 = model.head.embed(ids).detach()
            tunings = [RequestTuning(prompts.detach()[b.start : b.end], detached(lora, b)) for b in spans]
            x2 = backend.forward(spans[0], x0, mask, tunings[0])
            out = backend.forward(spans[1], x2, mask, tunings[1]).clone().requires_grad_(True)
            ours_logits = model.head.logits(out)
            torch.testing.assert_close(ours_logits[real], logits[real], atol=1e-5, rtol=0)
            g = torch.autograd.grad((ours_logits[real] * weights[real]).sum(), out)[0]
            second = backend.backward(spans[1], x2, g, mask, tunings[1])
            first = backend.backward(spans[0], x0, second.grad_input, mask, tunings[0])

            what = f"{family} mask={mask is not None}"
            assert rel_err(second.grad_input, expected[1]) < RTOL, f"{what}: grad w.r.t. block 2's input"
            assert rel_err(first.grad_input[real], expected[0][real]) < RTOL, f"{what}: grad w.r.t. the embeddings"
            assert first.grad_prompts is not None and second.grad_prompts is not None
            assert first.grad_prompts.shape == (2, prompt_batch, PRE, hidden_size)
            grad_prompts = torch.cat([first.grad_prompts, second.grad_prompts])
            assert rel_err(grad_prompts, expected[2]) < RTOL, f"{what}: grad w.r.t. the prompts"
            got = {key: (da, db) for key, da, db in [*first.grad_lora, *second.grad_lora]}
            assert [key for key, _, _ in first.grad_lora] == [key for key, _ in tunings[0].lora]  # sent order
            for (key, _), da, db in zip(lora, expected[3::2], expected[4::2], strict=True):
                assert rel_err(got[key][0], da) < RTOL, f"{what}: grad w.r.t. lora_A of {key}"
                assert rel_err(got[key][1], db) < RTOL, f"{what}: grad w.r.t. lora_B of {key}"


def test_step_prompts_in_a_session_equal_forward(tmp_path: Path) -> None:
    """Deep prompts sent with the prefill step of a session (the later steps carry none) and the session's LoRA
    give what one Forward with the same prompts and LoRA gives."""
    with one_thread():
        model = Model.build("llama", tmp_path)
        backend = backend_for(model, True)
        n, hidden_size = model.family.num_blocks, model.family.hidden_size
        lora = detached(client_lora(model, peft_model(model, seed=4), 2.0), model.span.blocks)
        prompts = torch.randn(n, 1, PRE, hidden_size, generator=torch.Generator().manual_seed(6))
        x = model.head.embed(model.ids(1)).detach()
        expected = backend.forward(model.span.blocks, x, None, RequestTuning(prompts, lora))
        session_lora = backend.session_lora(RequestTuning(None, lora))
        kv = KvHandle(model.span.blocks, 1, 16)
        outs = [backend.step([StepItem(kv, 0, x[:, :2], lora=session_lora, prompts=prompts)])[0]]  # slots 0, 1
        outs += backend.step([StepItem(kv, 2, x[:, 2:5], lora=session_lora, prompts=prompts)])  # slot 2 < PRE
        for pos in range(5, LENGTH):
            outs += backend.step([StepItem(kv, pos, x[:, pos : pos + 1], lora=session_lora)])
        torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_model_bounds_what_autograd_keeps(family: str, tmp_path: Path) -> None:
    """Bytes of the tensors autograd saves (parameters excluded) for a Backward through 1 and 2 blocks, against
    the estimate: never below, and not wastefully above (within 3x)."""
    with one_thread():
        model = Model.build(family, tmp_path)
        estimate = activation_model(model.family, torch.float32)
        weights = {p.untyped_storage().data_ptr() for p in model.span.parameters()}
        for batch, seq in ((1, 64), (4, 16), (1, 192)):
            for blocks in (1, 2):
                mask = torch.ones(batch, seq, dtype=torch.bool)
                mask[0, :2] = False
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor, into: dict[int, int] = saved) -> torch.Tensor:
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in weights:
                        into[storage.data_ptr()] = storage.nbytes()
                    return t

                x = torch.randn(batch * seq, model.family.hidden_size, requires_grad=True)
                span = model.span.sub(BlockRange(0, blocks))
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    span(x, [Segment(batch, seq, mask=mask)])
                kept = sum(saved.values())
                bound = estimate.bytes(batch, seq, blocks, True)
                assert kept <= bound <= 3 * kept, f"{family} {batch}x{seq} {blocks} blocks: kept {kept}, bound {bound}"


def test_backward_tokens_and_block_plan_count_activations(tmp_path: Path) -> None:
    """The token limit is the largest single sequence whose block-by-block Backward fits the budget (the worst
    split of those tokens), and the block plan leaves room for a DEFAULT_BACKWARD_TOKENS Backward."""
    model = Model.build("bloom", tmp_path)  # ALiBi: the shared [batch, heads, seq, seq] bias counts too
    act = activation_model(model.family, torch.float32)
    budget = 64 << 20
    tokens = act.max_tokens(budget, 30, cap=1 << 20)
    assert act.bytes(1, tokens, 30, False) <= budget < act.bytes(1, tokens + 1, 30, False)
    for batch in (1, 2, 4, 8):  # any batch x seq <= tokens fits
        assert act.bytes(batch, tokens // batch, 30, False) <= budget
    assert act.max_tokens(budget, 30, cap=100) == 100
    assert act.bytes(2, 64, 4, True) > act.bytes(2, 64, 4, False)  # one graph keeps every block's activations

    gib = 1 << 30
    block, kv = 200 << 20, 4096
    without = plan_num_blocks(8 * gib, block, kv, 1000)
    with_backward = plan_num_blocks(8 * gib, block, kv, 1000, act)
    per_block = block + PLAN_CACHE_TOKENS * kv + DEFAULT_BACKWARD_TOKENS * model.family.hidden_size * 4
    fixed = act.bytes(1, DEFAULT_BACKWARD_TOKENS, 0, False)
    assert with_backward == (usable_bytes(8 * gib) - fixed) // per_block <= without
