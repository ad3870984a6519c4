"""The failover replay tensor: one step that rebuilds the same KV cache as a history with beam reorders."""

from __future__ import annotations

import torch

from client_sdk.span_stream import consolidate


def test_consolidate_applies_reorders_to_the_lineage() -> None:
    a = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # prefill, rows r0, r1
    b = torch.tensor([[[10.0]], [[11.0]]])  # step 2 after reorder [1, 1]
    c = torch.tensor([[[20.0]], [[21.0]]])  # step 3 after reorder [1, 0]
    out = consolidate([(a, None), (b, torch.tensor([1, 1])), (c, torch.tensor([1, 0]))])
    assert out is not None
    # after [1,1]: both rows = r1 lineage + b; after [1,0]: row0 = old row1 (r1, 11), row1 = old row0 (r1, 10)
    assert out[:, :, 0].tolist() == [[3, 4, 5, 11, 20], [3, 4, 5, 10, 21]]
    assert consolidate([]) is None
