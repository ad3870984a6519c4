"""Shutdown soak: N cycles of (start a shard-server process, run concurrent generations through it, SIGTERM it)
and count exit codes. Every cycle must exit 0; issue 13 saw SIGABRT (-6, "terminate called without an active
exception") in 1-3 of 10 cycles before the fix. The cycle is tests/e2e/test_shutdown.py's (5 cycles in `make
test`).

    .venv/bin/python bench/soak_shutdown.py --cycles 50            # SIGTERM while 4 generations run
    .venv/bin/python bench/soak_shutdown.py --cycles 10 --after    # SIGTERM after they finished

One dht-node lives for the whole run; each cycle starts a fresh server (tiny random Llama, blocks 0:4). Prints a
table of exit codes and, for any cycle that did not exit 0, the tail of its log.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.test_shutdown import shutdown_cycle  # noqa: E402
from tests.launcher import SwarmProcesses  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--clients", type=int, default=4, help="concurrent generations per cycle")
    p.add_argument("--after", action="store_true", help="SIGTERM after the generations (16 tokens) finished")
    p.add_argument("--drain-timeout", type=float, default=0.5, help="the server's --drain-timeout")
    args = p.parse_args(argv)

    from tests.models import make_tiny_llama

    model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="soak-shutdown-")) / "tiny-llama")
    codes: collections.Counter[int] = collections.Counter()
    failures: list[tuple[int, int, str]] = []
    t0 = time.monotonic()
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        for i in range(args.cycles):
            code, server = shutdown_cycle(procs, dht, model, f"server-{i}", args.clients, not args.after,
                                          args.drain_timeout)  # fmt: skip
            codes[code] += 1
            if code != 0 or "terminate called" in server.log():
                failures.append((i, code, server.log()[-3000:]))
            print(f"cycle {i + 1}/{args.cycles}: exit {code}", flush=True)
            procs.procs.remove(server)
    when = "after they finished" if args.after else "while they ran"
    print(f"\n{args.cycles} cycles of start, {args.clients} concurrent generations, SIGTERM {when}: "
          f"{time.monotonic() - t0:.0f} s\n")  # fmt: skip
    print("| exit code | cycles |\n|---|---|")
    for code, n in sorted(codes.items()):
        print(f"| {code} | {n} |")
    for i, code, log in failures:
        print(f"\n===== cycle {i}: exit {code}, log tail =====\n{log}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
