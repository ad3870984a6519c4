"""Pollen's reliability soak (`make soak`): fuzz every RPC and the DHT's UDP port, load the swarm with concurrent
clients, and kill -9 servers and dht-nodes under generation and fine-tuning; prints the figures as a table and
exits 1 if anything failed. The same parts run, shorter, in `make test` (tests/soak/test_soak.py).

Usage: python bench/soak.py [--mode long|short] [--seed N]   (long: <= 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.soak.suite import SEED, SETTINGS, run_suite  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(SETTINGS), default="long")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the fuzz cases and the fault schedule")
    args = ap.parse_args()
    t0 = time.monotonic()
    report = run_suite(args.mode, args.seed, log=lambda line: print(f"[{time.monotonic() - t0:6.0f} s] {line}"))
    if report.faults is not None and report.faults.problems():
        print("fault schedule (peer ids as in the failures' [banned: ...]):\n  " + "\n  ".join(report.faults.events))
    print(report.table())
    print(f"soak ({args.mode}) took {time.monotonic() - t0:.0f} s")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
