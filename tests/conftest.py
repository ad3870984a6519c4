"""Shared fixtures: the tiny random Llama checkpoint every shard-server and client test runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with config.json + model.safetensors of a 4-layer random Llama (hidden 64, seed 0)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.gpu` tests run only where torch sees a CUDA device."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
