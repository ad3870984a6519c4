"""Per family: greedy tokens/s of local transformers vs a 2-server swarm, for a ~100M-parameter random model
(float32); then, for Llama, bytes per block and shard-server RSS per dtype/quantization. Prints markdown.

    .venv/bin/python bench/bench_families.py [--tokens 32] [--runs 3] [--families llama,bloom,falcon,mixtral]

Everything runs on 127.0.0.1: one dht-node, shard-servers with `--num-threads 1` each (2 servers = the 2 cores),
local transformers with 2 threads. Medians of `--runs` runs after one warm-up generation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.launcher

from tests.launcher import Proc, SwarmProcesses  # noqa: E402

MIB = 1 << 20
PROMPT = [3, 17, 42, 99, 5, 64, 23, 7]


def config_100m(family: str):  # -> PretrainedConfig
    from transformers import BloomConfig, FalconConfig, LlamaConfig, MixtralConfig

    common = dict(vocab_size=8000, hidden_size=768)
    if family == "llama":
        return LlamaConfig(**common, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                           num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip
    if family == "bloom":
        return BloomConfig(**common, n_layer=12, n_head=12)
    if family == "falcon":
        return FalconConfig(**common, num_hidden_layers=12, num_attention_heads=12, new_decoder_architecture=True,
                            num_kv_heads=4, max_position_embeddings=512)  # fmt: skip
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=12,
                             num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=512)  # fmt: skip
    raise ValueError(family)


def make_model(family: str, root: Path) -> tuple[Path, int, int]:
    """Save a random ~100M model; returns (path, parameters, blocks)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = root / f"{family}-100m"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_100m(family))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    return path, params, int(model.config.num_hidden_layers)


def local_tps(path: Path, tokens: int, runs: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([PROMPT])

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=0)  # fmt: skip
        return tokens / (time.perf_counter() - t0)

    once()  # warm-up
    return statistics.median(once() for _ in range(runs))


def swarm_tps(path: Path, blocks: int, dht: Proc, procs: SwarmProcesses, tokens: int, runs: int) -> float:
    from client_sdk import SwarmClient

    half = blocks // 2
    servers = [
        procs.start_server(path, r, [dht.address], "--num-threads", "1", "--throughput", "100", wait=False)
        for r in (f"0:{half}", f"{half}:{blocks}")
    ]
    for server in servers:
        procs.wait_ready(server)
    try:
        with SwarmClient([dht.address], path) as client:

            def once() -> float:
                t0 = time.perf_counter()
                out = client.generate(PROMPT, max_new_tokens=tokens, eos_token_id=None)
                assert len(out) == tokens
                return tokens / (time.perf_counter() - t0)

            once()
            return statistics.median(once() for _ in range(runs))
    finally:
        for server in servers:
            procs.stop(server)


def status(proc: Proc) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def memory_table(path: Path, blocks: int, procs: SwarmProcesses, runs: int) -> list[str]:
    from shard_server.loader import inspect_model
    from shard_server.memory import block_bytes
    from swarm.blocks import BlockRange

    info = inspect_model(str(path), BlockRange(0, blocks))
    rows = ["| dtype / quant | bytes per block (MiB) | served blocks | server RSS after load (MiB) | peak RSS (MiB) "
            "| RSS over the float32 baseline process (MiB) |", "|---|---|---|---|---|---|"]  # fmt: skip
    variants = [("float32", "none"), ("bfloat16", "none"), ("float16", "none"), ("float32", "int8"),
                ("bfloat16", "int8"), ("float32", "nf4"), ("bfloat16", "nf4")]  # fmt: skip
    baseline = None
    for dtype, quant in variants:
        rss, hwm = [], []
        for _ in range(runs):
            flags = ("--num-threads", "1", "--throughput", "1", "--dtype", dtype, "--quant", quant)
            server = procs.start_server(path, f"0:{blocks}", [], *flags)
            if baseline is None:  # an empty-ish server: 1 block of a tiny model, same code path
                from tests.models import make_tiny_llama

                tiny = make_tiny_llama(Path(tempfile.mkdtemp(prefix="pollen-tiny-")))
                base = procs.start_server(tiny, "0:1", [], "--num-threads", "1", "--throughput", "1")
                baseline = status(base)["VmRSS"]
                procs.stop(base)
            s = status(server)
            rss.append(s["VmRSS"])
            hwm.append(s["VmHWM"])
            procs.stop(server)
        per_block = block_bytes(info, dtype, quant)
        label = dtype if quant == "none" else f"{quant} (compute {dtype})"
        rss_m, hwm_m = statistics.median(rss), statistics.median(hwm)
        rows.append(f"| {label} | {per_block / MIB:.2f} | {blocks} | {rss_m / MIB:.0f} | {hwm_m / MIB:.0f} | "
                    f"{(rss_m - baseline) / MIB:.0f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--families", default="llama,bloom,falcon,mixtral")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pollen-bench-families-"))
    speed = ["| family | parameters | blocks | local transformers (tok/s) | swarm, 2 servers (tok/s) | swarm / local |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    llama: tuple[Path, int] | None = None
    with SwarmProcesses() as procs:
        dht = procs.start_dht()
        for family in args.families.split(","):
            path, params, blocks = make_model(family, root)
            local = local_tps(path, args.tokens, args.runs)
            swarm = swarm_tps(path, blocks, dht, procs, args.tokens, args.runs)
            speed.append(f"| {family} | {params / 1e6:.0f}M | {blocks} | {local:.1f} | {swarm:.1f} | "
                         f"{swarm / local:.2f} |")  # fmt: skip
            print(speed[-1], file=sys.stderr, flush=True)
            if family == "llama":
                llama = (path, blocks)
        print(
            f"\n### Greedy decoding, {args.tokens} new tokens after an 8-token prompt, float32, median of {args.runs}\n"
        )
        print("\n".join(speed))
        if llama is not None and not args.skip_memory:
            print(f"\n### Llama ~100M: bytes per block and shard-server RSS (all {llama[1]} blocks, median of "
                  f"{args.runs})\n")  # fmt: skip
            print("\n".join(memory_table(llama[0], llama[1], procs, args.runs)))


if __name__ == "__main__":
    main()
