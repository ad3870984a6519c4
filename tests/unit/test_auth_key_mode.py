"""A swarm key file that other users can read is warned about; a group-readable one is not (Kubernetes mounts
secrets 0440 with the pod's fsGroup)."""

from __future__ import annotations

import logging
import os

import pytest

from swarm.auth import SwarmKey


@pytest.mark.parametrize(
    ("mode", "warned"),
    [(0o600, False), (0o400, False), (0o440, False), (0o640, False), (0o644, True), (0o604, True), (0o602, True)],
)
def test_only_access_by_others_is_warned(tmp_path, caplog, mode, warned):
    path = tmp_path / "swarm.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="swarm.auth"):
        SwarmKey.from_file(path)
    lines = [r.getMessage() for r in caplog.records if "accessible to other users" in r.getMessage()]
    assert bool(lines) == warned, (oct(mode), lines)
    if warned:
        assert f"mode {mode:04o}" in lines[0] and str(path) in lines[0]
