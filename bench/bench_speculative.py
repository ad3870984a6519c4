"""Speculative decoding over a slow network: 2 shard-servers splitting SmolLM2-135M (blocks 0:15 and 15:30), every
link delayed 25 ms one way by a user-space proxy in front of each server (bench/delay_proxy.py, as bench_wan.py),
greedy decoding with push on (3 one-way legs per round trip: client -> A -> B -> client).

Per setup: ms per new token (wall time of a whole `generate`, prefill included, / tokens; median over repeats),
and for speculative setups the acceptance rate, the mean draft length k and the tokens per round trip. Plain
decoding pays one round trip per token; a trip that verifies k drafts yields (accepted + 1) tokens for about
the same network time, plus the draft's local compute (`client CPU ms/token`). Setups run in a rotating order
each round so a load change on the shared machine hits all alike; every output must equal the plain output.

Drafts: self-speculation (`self:N`: the model's first N blocks + its own head, loaded in the client), prompt
lookup (`prompt-lookup`, `lookup:N`: no model, the continuation of an earlier occurrence of the last 2 (N) tokens,
up to 10 per trip; it proposes nothing when the text does not repeat, so its "mean k" is the mean proposal) and,
with `--draft PATH`, any folder of a model with the same tokenizer. `self:<all blocks>` is the whole model run in
the client: every draft is accepted, which shows what the network side alone gains (not a sensible deployment).
`--model tiny` (a random 4-block Llama, ~1 ms of compute) shows the network-bound case.

Usage: python bench/bench_speculative.py [--model models/smollm2-135m] [--delay-ms 25] [--tokens 48]
       [--repeats 3] [--self-blocks 8,20,30] [--lookup prompt-lookup,lookup:3] [--draft PATH ...]
       [--num-draft-tokens K] [--prompt story|quote]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import child_env, code_version, load_average, markdown, num_blocks, split_ranges  # noqa: E402
from bench.delay_proxy import DelayProxy  # noqa: E402

TOKEN_PROMPT = [1, 17, 42, 99, 5, 64, 23, 7]  # for a model without a tokenizer
STORY = (
    "The history of the bicycle begins in the early nineteenth century. The first bicycles were made of wood and "
    "had no pedals. Riders pushed themselves along with their feet."
)
# Output grounded in the input (quoting, editing, extraction): where prompt lookup finds its drafts.
QUOTE = (
    "Minutes of the meeting. The committee agreed that the new bridge will open on the first of May, that the toll "
    "will be two euros for cars and free for bicycles, and that the old ferry will keep running on weekends until "
    "the end of the summer.\n\nQuestion: What did the committee agree?\nAnswer: The committee agreed that"
)
PROMPTS = {"story": STORY, "quote": QUOTE}


@dataclass
class Runs:
    ms_per_token: list[float] = field(default_factory=list)
    cpu_ms_per_token: list[float] = field(default_factory=list)  # this process: embeddings, head, the draft
    acceptance: list[float] = field(default_factory=list)
    mean_k: list[float] = field(default_factory=list)
    tokens_per_trip: list[float] = field(default_factory=list)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m", help="a model folder, or 'tiny' (random, 4 blocks)")
    ap.add_argument("--delay-ms", type=float, default=25.0)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--self-blocks", default=None, help="comma-separated N of self:N drafts (default: a quarter, two "
                    "thirds and all of the blocks; '' for none)")  # fmt: skip
    ap.add_argument("--lookup", default="prompt-lookup", help="comma-separated prompt-lookup drafts "
                    "(prompt-lookup, lookup:N; '' for none)")  # fmt: skip
    ap.add_argument("--draft", action="append", default=[], help="folder of a draft model (same tokenizer)")
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="story", help="story: a free continuation (the "
                    "default); quote: an answer that repeats its input, where prompt lookup finds drafts")  # fmt: skip
    ap.add_argument("--num-draft-tokens", type=int, default=None, help="k of the first trip of model drafts (default "
                    "4, then adaptive) and of every prompt-lookup trip (default 10)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    if args.model == "tiny":  # compute ~1 ms a token: the network is all that counts
        from tests.models import make_tiny_llama

        model = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-spec-")) / "tiny")
    else:
        model = Path(args.model).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"no model at {model} (for SmolLM2, run `make model` in the repo root)")
    blocks = num_blocks(model)
    if args.self_blocks is None:
        args.self_blocks = ",".join(str(n) for n in sorted({max(1, blocks // 4), round(2 * blocks / 3), blocks}))

    import os

    os.environ.update(child_env(args.threads))
    import torch

    from client_sdk import SwarmClient
    from tests.launcher import SwarmProcesses

    torch.set_num_threads(args.threads)
    drafts = [f"self:{n}" for n in args.self_blocks.split(",") if n] + [x for x in args.lookup.split(",") if x]
    drafts += args.draft
    setups: list[str | None] = [None, *drafts]
    proxies = [DelayProxy(args.delay_ms / 1000) for _ in range(2)]
    runs = {name(s): Runs() for s in setups}
    with SwarmProcesses(env=child_env(args.threads)) as procs:
        dht = procs.start_dht()
        servers = []
        for proxy, blocks in zip(proxies, split_ranges(num_blocks(model), 2), strict=True):
            flags = ("--num-threads", str(args.threads), "--throughput", "100", "--public-address", proxy.address)
            servers.append(procs.start_server(model, blocks, [dht.address], *flags, wait=False))
        for proxy, server in zip(proxies, servers, strict=True):
            proxy.set_target(procs.wait_ready(server))
        with SwarmClient([dht.address], model, refresh_period_s=0) as client:
            ids = client.tokenizer.encode(PROMPTS[args.prompt]) if client.tokenizer is not None else TOKEN_PROMPT
            expected = client.generate(ids, args.tokens)  # also the warm-up of the plain path
            for spec in drafts:  # loads each draft once (kept by the client) and warms it up
                client.generate(ids, 4, draft_model=spec)
            for round_ in range(args.repeats):
                shift = round_ % len(setups)
                for spec in setups[shift:] + setups[:shift]:
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    out = client.generate(ids, args.tokens, draft_model=spec, num_draft_tokens=args.num_draft_tokens)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    if out != expected:
                        raise AssertionError(f"{name(spec)}: other tokens than plain greedy: {out} vs {expected}")
                    r = runs[name(spec)]
                    r.ms_per_token.append(1000 * wall / len(out))
                    r.cpu_ms_per_token.append(1000 * cpu / len(out))
                    stats = client.async_client.last_speculation
                    if spec is not None and stats is not None:
                        r.acceptance.append(stats.acceptance_rate)
                        r.mean_k.append(statistics.mean(stats.draft_lengths))
                        r.tokens_per_trip.append(stats.tokens_per_step)
    for proxy in proxies:
        proxy.close()

    plain = statistics.median(runs["plain"].ms_per_token)
    rows = []
    for label, r in runs.items():
        ms = statistics.median(r.ms_per_token)
        spec_cols = (
            [f"{statistics.median(r.acceptance):.0%}", f"{statistics.median(r.mean_k):.1f}",
             f"{statistics.median(r.tokens_per_trip):.2f}"]
            if r.acceptance else ["-", "-", "1.00"]
        )  # fmt: skip
        rows.append([label, f"{ms:.1f}", f"{plain / ms:.2f}x", *spec_cols,
                     f"{statistics.median(r.cpu_ms_per_token):.1f}"])  # fmt: skip
    spans = ", ".join(split_ranges(num_blocks(model), 2))
    print(f"\n{model.name}, 2 servers ({spans}), {args.delay_ms:.0f} ms one-way on every link, push on, greedy, "
          f"{len(expected)} new tokens after a {len(ids)}-token {args.prompt!r} prompt, "
          f"median of {args.repeats} runs; k: {args.num_draft_tokens or 'default'} (model drafts: from 4, "
          "adaptive; prompt lookup: up to 10 a trip)")  # fmt: skip
    print(f"code {code_version()}; load average {load_average()}; {args.threads} torch thread(s) per process")
    header = ["setup", "ms/token", "speed-up", "acceptance", "mean k", "tokens/trip", "client CPU ms/token"]
    print(markdown(header, rows))


def name(spec: str | None) -> str:
    if spec is None:
        return "plain"
    return spec if spec.startswith(("self:", "lookup:")) or spec == "prompt-lookup" else Path(spec).name


if __name__ == "__main__":
    main()
