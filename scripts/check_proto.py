"""Fail when the committed protobuf stubs in swarm/pb differ from what `make proto` generates from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").glob("*.proto"))
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iswarm/pb=proto",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            *protos,
        ]
        subprocess.run(cmd, cwd=ROOT, check=True)
        fresh = {p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file()}
        committed = {p.relative_to(ROOT) for p in (ROOT / "swarm/pb").glob("*_pb2*") if p.is_file()}
        stale = sorted(
            str(p) for p in fresh if not (ROOT / p).is_file() or not filecmp.cmp(Path(tmp) / p, ROOT / p, shallow=False)
        )
        extra = sorted(str(p) for p in committed - fresh)
    if stale or extra:
        print("protobuf stubs are stale; run `make proto` and commit swarm/pb/", file=sys.stderr)
        for p in stale:
            print(f"  differs or missing: {p}", file=sys.stderr)
        for p in extra:
            print(f"  not generated from proto/: {p}", file=sys.stderr)
        return 1
    print(f"protobuf stubs match proto/ ({len(fresh)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
