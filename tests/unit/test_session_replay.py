"""The failover replay: one step that rebuilds the same KV cache as a span's history with beam reorders."""

from __future__ import annotations

import pytest
import torch

from client_sdk.routing import Span
from client_sdk.span_stream import SpanStream, StepInput, consolidate
from swarm.records import ServerRecord


def test_consolidate_applies_reorders_to_the_lineage() -> None:
    a = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # prefill, rows r0, r1
    b = torch.tensor([[[10.0]], [[11.0]]])  # step 2 after reorder [1, 1]
    c = torch.tensor([[[20.0]], [[21.0]]])  # step 3 after reorder [1, 0]
    history = [StepInput("s1", a, 0), StepInput("s2", b, 3, hypo_ids=torch.tensor([1, 1]))]
    out = consolidate([*history, StepInput("s3", c, 4, hypo_ids=torch.tensor([1, 0]))])
    assert out is not None
    # after [1,1]: both rows = r1 lineage + b; after [1,0]: row0 = old row1 (r1, 11), row1 = old row0 (r1, 10)
    assert out[:, :, 0].tolist() == [[3, 4, 5, 11, 20], [3, 4, 5, 10, 21]]
    assert consolidate([]) is None


def stream() -> SpanStream:
    record = ServerRecord(peer_id="p", address="127.0.0.1:1", model_id="m", start=0, end=2)
    return SpanStream(Span("p", record.address, 0, 2, record), "session")


def test_history_and_position_live_on_the_stream() -> None:
    s = stream()
    prefill, one = StepInput("a", torch.ones(2, 3, 4), 0), StepInput("b", torch.zeros(2, 1, 4), 3)
    s.confirm(prefill)
    s.confirm(one)
    assert s.position == 4 and s.history == [prefill, one]
    replayed = StepInput("c", torch.ones(2, 5, 4), 0)
    s.confirm(replayed)  # a step from position 0 supersedes everything before it
    assert s.position == 5 and s.history == [replayed]


def test_replay_sends_history_plus_the_current_step_from_position_zero() -> None:
    s = stream()  # a replacement: history moved here, nothing in its cache yet
    s.history = [StepInput("", torch.ones(1, 3, 2), 0)]
    mask = torch.ones(1, 4, dtype=torch.long)
    current = StepInput("now", torch.full((1, 1, 2), 7.0), 3, mask, torch.tensor([0]))
    inp = s.replay(current, None)
    assert (inp.step_id, inp.position, inp.hypo_ids, inp.end) == ("now", 0, None, 4)
    assert inp.mask is mask and inp.hidden[0, :, 0].tolist() == [1, 1, 1, 7]
    full = torch.randn(1, 4, 2)  # the previous span was replayed: its whole output is this span's input
    assert s.replay(current, full).hidden is full
    with pytest.raises(RuntimeError):
        s.replay(current, torch.randn(1, 2, 2))
