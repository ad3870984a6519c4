"""Repository invariants that keep the code easy to change."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script)], capture_output=True, text=True, cwd=ROOT)


def test_committed_protobuf_stubs_match_proto_sources():
    result = run("check_proto.py")
    assert result.returncode == 0, result.stderr


def test_role_packages_import_only_swarm():
    result = run("check_imports.py")
    assert result.returncode == 0, result.stderr


def test_swarm_core_import_is_light():
    code = (
        "import sys, swarm, swarm.blocks, swarm.records, swarm.errors, swarm.dht_client; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
