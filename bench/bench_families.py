"""Per family (llama, bloom, falcon, mixtral): greedy decode speed of a ~100M-parameter random float32 model,
plain local `transformers` vs Pollen with 1 and 2 servers; then, for Llama, shard-server RSS per dtype/quant.

Baseline as in bench_generate.py: `model.generate(ids, max_new_tokens=n)` and nothing else, a prompt whose
greedy continuation has no EOS within n tokens (chosen at run time), the same n tokens on every side (checked).
Setups interleaved round by round, one warm-up call each, medians of --repeats; every process (this one, each
server) uses 1 torch thread.

Usage: python bench/bench_families.py [--tokens 64] [--repeats 3] [--families llama,bloom] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    MIB,
    block_weight_bytes,
    code_version,
    compare_decode,
    decode_once,
    greedy_prompt,
    load_average,
    load_local,
    markdown,
    median,
    quiet_transformers,
    rss_bytes,
    setup_name,
    swarm_processes,
    use_threads,
)

FAMILIES = ("llama", "bloom", "falcon", "mixtral")


def config_100m(family: str, layers: int | None = None) -> Any:  # -> PretrainedConfig
    """~100M parameters (Mixtral: 4 experts, top-2); `layers` overrides the depth (for --quick)."""
    from transformers import BloomConfig, FalconConfig, LlamaConfig, MixtralConfig

    common: dict[str, Any] = dict(vocab_size=8000, hidden_size=768)
    if family == "llama":
        return LlamaConfig(
            **common,
            intermediate_size=2048,
            num_hidden_layers=layers or 12,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
    if family == "bloom":
        return BloomConfig(**common, n_layer=layers or 12, n_head=12)
    if family == "falcon":
        return FalconConfig(
            **common,
            num_hidden_layers=layers or 12,
            num_attention_heads=12,
            new_decoder_architecture=True,
            num_kv_heads=4,
            max_position_embeddings=512,
        )
    if family == "mixtral":
        return MixtralConfig(
            **common,
            intermediate_size=1024,
            num_hidden_layers=layers or 8,
            num_attention_heads=12,
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=512,
        )
    raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def make_model(family: str, root: Path, layers: int | None = None) -> tuple[Path, int, int]:
    """Save a random model; returns (path, parameters, blocks)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = root / f"{family}-100m"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_100m(family, layers))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    return path, params, int(model.config.num_hidden_layers)


def make_tiny_llama(root: Path) -> Path:
    """One block of hidden 64: a shard-server that holds almost no weights, for the RSS baseline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny", safe_serialization=True)
    return root / "tiny"


def memory_table(path: Path, blocks: int, root: Path, runs: int) -> str:
    """shard-server RSS after a short generation per dtype/quant, and over a server holding (almost) nothing."""
    variants = [
        ("float32", "none"),
        ("bfloat16", "none"),
        ("float16", "none"),
        ("float32", "int8"),
        ("bfloat16", "int8"),
        ("float32", "nf4"),
        ("bfloat16", "nf4"),
    ]
    rows = []
    with swarm_processes(1) as procs:
        dht = str(procs.start_dht().address)

        def rss(model: Path, span: str, *flags: str) -> int:
            """VmRSS after a short generation (weights mapped from the file are resident once touched)."""
            server = procs.start_server(model, span, [dht], "--num-threads", "1", "--throughput", "1", *flags)
            try:
                decode_once(dht, model, new_tokens=8)
                return rss_bytes(server.popen.pid)
            finally:
                procs.stop(server)

        tiny = make_tiny_llama(root)
        baseline = median(rss(tiny, "0:1") for _ in range(runs))
        for dtype, quant in variants:
            measured = median(rss(path, f"0:{blocks}", "--dtype", dtype, "--quant", quant) for _ in range(runs))
            element = 4 if dtype == "float32" else 2
            weights = (
                f"{block_weight_bytes(path, range(blocks), element) / blocks / MIB:.2f}" if quant == "none" else "-"
            )
            label = dtype if quant == "none" else f"{quant} (compute {dtype})"
            over = measured - baseline
            rows.append([label, weights, f"{measured / MIB:.0f}", f"{over / MIB:.0f}", f"{over / blocks / MIB:.2f}"])
    header = [
        "dtype / quant",
        "weights per block (MiB, headers)",
        "server RSS after a generation (MiB)",
        f"RSS over a 1-tiny-block server ({baseline / MIB:.0f} MiB)",
        "measured per block (MiB)",
    ]
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per call (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="measured calls per setup (default: 3)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all four)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the Llama RSS table")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-block models, 16 tokens, 1 repeat")
    args = parser.parse_args()
    layers = None
    if args.quick:
        layers, args.tokens, args.repeats, args.skip_memory = 2, 16, 1, True
    use_threads(1)
    scratch = tempfile.TemporaryDirectory(prefix="pollen-bench-families-")
    root = Path(scratch.name)
    print(f"code: {code_version()}; load average before: {load_average()}", file=sys.stderr)
    rows, llama = [], None
    for family in args.families.split(","):
        path, params, blocks = make_model(family, root, layers)
        lm = load_local(path)
        prompt, expected = greedy_prompt(lm, args.tokens)
        # --throughput: skip the start-up measurement (it only orders servers, and there is one chain here)
        timings = compare_decode(lm, path, prompt, expected, (1, 2), args.repeats, 1, ("--throughput", "100"), family)
        del lm
        tps = {setup: args.tokens / median(ts) for setup, ts in timings.wall.items()}
        best = {setup: min(ts) for setup, ts in timings.wall.items()}  # seconds of the fastest call
        cpu = {setup: median(ts) for setup, ts in timings.cpu.items()}
        one, two = setup_name(1), setup_name(2)
        rows.append(
            [
                family,
                f"{params / 1e6:.0f}M",
                blocks,
                f"{tps['local']:.1f}",
                f"{tps[one]:.1f}",
                f"{tps[two]:.1f}",
                f"{tps[one] / tps['local']:.3f}x",
                f"{tps[two] / tps['local']:.3f}x",
                f"{best['local'] / best[one]:.3f}x",
                f"{best['local'] / best[two]:.3f}x",
                f"{cpu['local'] / cpu[one]:.3f}x / {cpu['local'] / cpu[two]:.3f}x",
            ]
        )
        print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
        if family == "llama":
            llama = (path, blocks)

    print(f"\ncode: {code_version()}; load average after: {load_average()}")
    print(
        f"### Greedy decoding, {args.tokens} new tokens (same on every side, checked), float32, 1 torch thread "
        f"per process, median of {args.repeats}; 'best' compares the fastest call of each setup; CPU compares the "
        f"CPU time of the local process with that of all processes of a swarm setup\n"
    )
    header = [
        "family",
        "parameters",
        "blocks",
        "local (tok/s)",
        "1 server (tok/s)",
        "2 servers (tok/s)",
        "1 server / local",
        "2 servers / local",
        "best 1 / local",
        "best 2 / local",
        "CPU: local / 1, local / 2",
    ]
    print(markdown(header, rows))
    if llama is not None and not args.skip_memory:
        print(f"\n### Llama ~100M: shard-server RSS holding all {llama[1]} blocks, median of {args.repeats}\n")
        print(memory_table(llama[0], llama[1], root, args.repeats))
    scratch.cleanup()


if __name__ == "__main__":
    main()
