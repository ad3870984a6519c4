"""Greedy decoding speed: plain `transformers` vs Pollen with 1 and 2 servers on loopback, same model, one run.

Baseline: `LlamaForCausalLM.generate(ids, max_new_tokens=64)`, nothing else (no `min_new_tokens`: its logits
processor would slow the local side only). The prompt (16 random token ids) is chosen at run time so that its
greedy continuation has no EOS within 64 tokens; Pollen's `client.generate(prompt, max_new_tokens=64)` then
makes the same 64 tokens, checked on every call. Both times include the 16-token prefill.

Method: one warm-up then --repeats measured calls per setup, the setups interleaved round by round (all swarms
are up at once, each with its own dht-node); medians, with min-max. Every process (this one, each server) uses
--threads torch threads. `ms added per hop`: 1 server minus local (first hop), 2 servers minus 1 server (second).

Usage: python bench/bench_generate.py [--models small,models/smollm2-135m] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    PROMPT_LEN,
    REPO,
    SMALL,
    code_version,
    compare_decode,
    greedy_prompt,
    load_average,
    load_local,
    markdown,
    median,
    num_blocks,
    resolve_model,
    setup_name,
    use_threads,
)

NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        "--model",
        default=f"{SMALL},{REPO / 'models/smollm2-135m'}",
        help="comma-separated: 'small' (Petals' random 8-block Llama) and/or model folders",
    )
    parser.add_argument("--repeats", type=int, default=5, help="measured calls per setup (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS, help="new tokens per call (default: 64)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the small model only, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = SMALL, 1
    use_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="pollen-bench-")
    print(f"code: {code_version()}; load average before: {load_average()}", file=sys.stderr)

    rows, hops, procs = [], [], []
    for name in args.models.split(","):
        path = resolve_model(name, Path(scratch.name))
        label = "Petals' small (random)" if name == SMALL else path.name
        lm = load_local(path)
        prompt, expected = greedy_prompt(lm, args.tokens)
        timings = compare_decode(lm, path, prompt, expected, (1, 2), args.repeats, args.threads, desc=label)
        del lm
        per_token = 1000 / args.tokens
        ms = {setup: per_token * median(ts) for setup, ts in timings.wall.items()}
        best = {setup: per_token * min(ts) for setup, ts in timings.wall.items()}
        cpu = {setup: per_token * median(ts) for setup, ts in timings.cpu.items()}
        for setup, ts in timings.wall.items():
            tps = [args.tokens / t for t in ts]
            rows.append(
                [
                    label if setup == "local" else "",
                    "local transformers" if setup == "local" else f"Pollen, {setup}",
                    f"{median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f})",
                    f"{ms[setup]:.2f}",
                    f"{ms['local'] / ms[setup]:.3f}x",
                    f"{best[setup]:.2f}",
                    f"{best['local'] / best[setup]:.3f}x",
                    f"{cpu[setup]:.2f}",
                ]
            )
        for setup, calls in timings.per_process.items():
            # median per process over the calls: client (this process), then each server of the chain
            per_proc = [per_token * median(call[i] for call in calls) for i in range(len(calls[0]))]
            procs.append([label if setup == "local" else "", setup, " / ".join(f"{ms:.2f}" for ms in per_proc)])
        one, two = setup_name(1), setup_name(2)
        hops.append(
            [label, f"{num_blocks(path)}"]
            + [f"{d[one] - d['local']:+.2f} / {d[two] - d[one]:+.2f}" for d in (ms, best, cpu)]
        )

    print(f"\ncode: {code_version()}; load average after: {load_average()}")
    print(
        f"{args.tokens} new greedy tokens after a {PROMPT_LEN}-token prompt (same tokens on every side, checked), "
        f"float32, {args.threads} torch thread(s) per process, median of {args.repeats} (min-max); 'best' = the "
        f"fastest call of each setup (least disturbed by other load); CPU = all processes of the setup (this one "
        f"and its servers), which take turns at batch 1\n"
    )
    header = ["model", "setup", "tokens/s", "ms/token", "swarm / local", "best ms/token", "best swarm / local"]
    print(markdown([*header, "CPU ms/token"], rows))
    print()
    header = ["model", "blocks", "ms added by hop 1 / hop 2", "best: hop 1 / hop 2", "CPU ms: hop 1 / hop 2"]
    print(markdown(header, hops))
    print()
    print(markdown(["model", "setup", "CPU ms/token: client (or local) / server 1 / server 2"], procs))
    scratch.cleanup()


if __name__ == "__main__":
    main()
