"""A request that waited in the worker's queue while a pause (or move) emptied the weights gets ServerDraining
(UNAVAILABLE: the client continues on another server), never a shape error from the emptied tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard_server.backend import BlockBackend, KvHandle, StepItem
from swarm.errors import ServerDraining
from tests.family_checks import one_thread
from tests.unit.test_lora import Model


def test_calls_after_release_are_refused_clearly(tmp_path: Path) -> None:
    with one_thread():
        model = Model.build("llama", tmp_path)
        backend = BlockBackend(model.span, torch.device("cpu"), torch.float32)
        x = model.head.embed(model.ids(1)).detach()  # [1, seq, hidden]
        blocks = model.span.blocks
        assert backend.forward(blocks, x).shape == x.shape  # serving
        backend.released = True
        with pytest.raises(ServerDraining, match="unloaded its blocks"):
            backend.forward(blocks, x)
        with pytest.raises(ServerDraining):
            backend.backward(blocks, x, torch.ones_like(x))
        with pytest.raises(ServerDraining):
            backend.step([StepItem(KvHandle(blocks, 1, 16), 0, x[:, :2])])
