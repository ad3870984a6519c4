"""Tuning on the wire: each server gets exactly its blocks' deep prompts and LoRA weights; Backward replies that
do not match what was sent are the server's fault (retryable) and never reach autograd."""

from __future__ import annotations

import pytest
import torch

from client_sdk.tuning import LoraWeight, Tuning, TuningGrads, decode_grads
from swarm.errors import InvalidRequest, PollenError
from swarm.pb import shard_pb2
from swarm.tensors import from_proto, to_proto


def make_tuning(batch: int = 1) -> Tuning:
    prompts = torch.arange(6 * batch * 2 * 4, dtype=torch.float32).view(6, batch, 2, 4)  # blocks 10..15
    lora = tuple(LoraWeight(b, m, torch.randn(2, 4), torch.randn(3, 2), 0.5) for b in (11, 13) for m in ("q", "v"))
    return Tuning(10, 16, prompts, lora, adapter="ad")


def test_for_span_sends_only_the_spans_blocks() -> None:
    t = make_tuning()
    msg = t.for_span(12, 14, torch.bfloat16)
    assert msg.adapter == "ad"
    sent = from_proto(msg.prompts)
    assert sent.dtype == torch.bfloat16 and torch.equal(sent.float(), t.prompts[2:4].bfloat16().float())  # type: ignore[index]
    assert [(w.block, w.module, w.scaling) for w in msg.lora] == [(13, "q", 0.5), (13, "v", 0.5)]
    assert torch.equal(from_proto(msg.lora[0].a), t.lora[2].a)
    assert not t.for_span(14, 16, prompts=False).HasField("prompts")
    with pytest.raises(ValueError):
        t.for_span(8, 12)


def test_rows_slices_per_row_prompts_only() -> None:
    shared, per_row = make_tuning(1), make_tuning(4)
    assert shared.rows(1, 3) is shared
    assert torch.equal(per_row.rows(1, 3).prompts, per_row.prompts[:, 1:3])  # type: ignore[arg-type,index]


def test_invalid_tuning_is_rejected_on_the_client() -> None:
    with pytest.raises(InvalidRequest, match="blocks"):
        Tuning(0, 4, torch.zeros(3, 1, 2, 8))
    with pytest.raises(InvalidRequest, match="outside"):
        Tuning(0, 4, lora=(LoraWeight(4, "q", torch.zeros(2, 8), torch.zeros(8, 2), 1.0),))
    with pytest.raises(InvalidRequest, match="rank"):
        Tuning(0, 4, lora=(LoraWeight(1, "q", torch.zeros(2, 8), torch.zeros(8, 3), 1.0),))
    with pytest.raises(InvalidRequest, match="float"):
        Tuning(0, 4, torch.zeros(4, 1, 2, 8, dtype=torch.int64))


def reply_for(t: Tuning, a: int, b: int) -> shard_pb2.BackwardResponse:
    reply = shard_pb2.BackwardResponse(grad_prompts=to_proto(torch.ones_like(t.prompts[a - 10 : b - 10])))  # type: ignore[index]
    for i in t.lora_indices(a, b):
        w = t.lora[i]
        reply.grad_lora.append(shard_pb2.LoraTensors(block=w.block, module=w.module, a=to_proto(w.a), b=to_proto(w.b)))
    return reply


def test_decode_grads_checks_the_reply_against_what_was_sent() -> None:
    t = make_tuning()
    grads = decode_grads(reply_for(t, 11, 14), t, 11, 14, "s")
    assert grads.prompts is not None and grads.prompts.shape == (3, 1, 2, 4) and sorted(grads.lora) == [0, 1, 2, 3]
    total = TuningGrads.zeros(t)
    total.add_span(t, 11, 14, grads)
    total.add_span(t, 11, 14, grads)
    assert total.prompts is not None and total.prompts[1:4].eq(2).all() and total.prompts[0].eq(0).all()
    assert torch.equal(total.lora[0][0], 2 * t.lora[0].a)

    wrong_order = reply_for(t, 11, 14)
    wrong_order.grad_lora[0].module, wrong_order.grad_lora[1].module = "v", "q"
    short = reply_for(t, 11, 14)
    del short.grad_lora[-1]
    no_prompts = reply_for(t, 11, 14)
    no_prompts.ClearField("grad_prompts")
    bad_shape = reply_for(t, 11, 14)
    bad_shape.grad_prompts.CopyFrom(to_proto(torch.ones(2, 1, 2, 4)))
    for reply in (wrong_order, short, no_prompts, bad_shape):
        with pytest.raises(PollenError) as info:
            decode_grads(reply, t, 11, 14, "s")
        assert info.value.retryable
