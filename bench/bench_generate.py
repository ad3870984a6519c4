"""Greedy decoding speed: plain `transformers` vs Pollen with 1 and 2 servers on loopback, same model, one run.

Method (as in ../shared/notes/petals-bench.md, so the figures compare with Petals'): prompt of 16 token ids,
64 new tokens (EOS ignored), greedy; 1 warm-up then --repeats measured runs per setup; medians with min-max.
Every process uses --threads torch threads. Prints a table and the per-token time each server hop adds.

Usage: python bench/bench_generate.py --model models/smollm2-135m   (or --model random-small)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.launcher

from tests.launcher import SwarmProcesses  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 16, 64


def make_random_small(folder: Path) -> Path:
    """Petals-bench's `small` model: hidden 512, 8 layers, 8 heads, vocab 32000, random weights (seed 1234)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def summarize(times: list[float]) -> dict[str, float]:
    med = statistics.median(times)
    return {
        "tps": NEW_TOKENS / med,
        "tps_min": NEW_TOKENS / max(times),
        "tps_max": NEW_TOKENS / min(times),
        "ms_per_token": 1000 * med / NEW_TOKENS,
    }


def bench_local(model: Path, prompt: list[int], repeats: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        lm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        if i:
            times.append(time.perf_counter() - t0)
    return times


def bench_swarm(model: Path, ranges: list[str], prompt: list[int], repeats: int, threads: int) -> list[float]:
    from client_sdk import SwarmClient

    with SwarmProcesses(env={"OMP_NUM_THREADS": str(threads)}) as swarm:
        dht = swarm.start_dht()
        procs = [swarm.start_server(model, r, [dht.address], "--num-threads", str(threads), wait=False) for r in ranges]
        for proc in procs:
            swarm.wait_ready(proc)
        with SwarmClient(initial_peers=[dht.address], model=str(model)) as client:
            times = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                out = client.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                if i:
                    times.append(time.perf_counter() - t0)
                assert len(out) - len(prompt) in (NEW_TOKENS, 0) or len(out) == NEW_TOKENS
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="model folder, or 'random-small'")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per setup (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    tmp = None
    model = Path(args.model)
    if args.model == "random-small":
        tmp = tempfile.TemporaryDirectory(prefix="pollen-bench-")
        model = make_random_small(Path(tmp.name) / "random-small")
    cfg = AutoConfig.from_pretrained(model)
    n = cfg.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (PROMPT_LEN,), generator=gen).tolist()

    rows = {"local transformers": summarize(bench_local(model, prompt, args.repeats))}
    rows["Pollen, 1 server"] = summarize(bench_swarm(model, [f"0:{n}"], prompt, args.repeats, args.threads))
    rows["Pollen, 2 servers"] = summarize(
        bench_swarm(model, [f"0:{n // 2}", f"{n // 2}:{n}"], prompt, args.repeats, args.threads)
    )
    local = rows["local transformers"]
    print(
        f"\nmodel {args.model} ({n} blocks), prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy, "
        f"{args.threads} torch thread(s)/process, median of {args.repeats} (min-max)\n"
    )
    print("| setup | tokens/s | ms/token | vs local |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tps']:.1f} ({r['tps_min']:.1f}-{r['tps_max']:.1f}) | {r['ms_per_token']:.2f} "
            f"| {r['tps'] / local['tps']:.2f}x |"
        )
    one, two = rows["Pollen, 1 server"], rows["Pollen, 2 servers"]
    print(
        f"\nfirst server hop adds {one['ms_per_token'] - local['ms_per_token']:+.2f} ms/token; "
        f"second server adds {two['ms_per_token'] - one['ms_per_token']:+.2f} ms/token"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
