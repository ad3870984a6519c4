"""Fine-tuning speed: one forward+backward of a batch of 8 x 128 tokens through 2 servers on loopback vs the same
step on a local transformers model; the cost of deep prompts over shallow ones, and of client-owned LoRA.

Every setup is a prompt-tuned sequence classifier (pre_seq_len 8, the `score` head on the client): the step is
`model(ids, labels=...).loss.backward()`, so the time is the blocks' forward and backward (the servers recompute
the forward in Backward, as Petals does) plus the transport; the classification head costs next to nothing.
Setups: local transformers (the same prompts added by hooks, as tests/tuning_reference.py does); Pollen with
ptune, deep_ptune, ptune + client LoRA (r=8 on q_proj and v_proj), all with the default max_tokens_per_call
(1024: the 8 x 136 tokens go as 2 parts of 4 rows, run concurrently, so both servers work at once), and ptune
sent as 1 part (no overlap) or as 4 parts. Gradients of the swarm's ptune step are checked
against the local ones once (relative error < 1e-4).

Method: all setups are up at once; one warm-up step each, then --repeats rounds timing every setup back to back in
a rotating order; medians (min-max) and CPU seconds of every process of the setup (this one and the servers).

Usage: python bench/bench_finetune.py [--model models/smollm2-135m] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench.common, this tree's code

from bench.common import (  # noqa: E402
    REPO,
    SMALL,
    code_version,
    cpu_seconds,
    load_average,
    markdown,
    median,
    num_blocks,
    quiet_transformers,
    resolve_model,
    start_swarm,
    swarm_processes,
    use_threads,
)

PRE_SEQ_LEN = 8


def local_step(path: Path, ids: Any, labels: Any) -> tuple[Callable[[], None], Any, Any]:
    """The local reference step, its prompt parameter (for the gradient check) and its score weight."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.tuning_reference import prompted_hidden

    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32).eval()
    model.requires_grad_(False)
    torch.manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, model.config.hidden_size) * 0.02)
    model.score.weight.requires_grad_(True)

    def step() -> None:
        prompt.grad = None
        hidden = prompted_hidden(model.model, ids, None, prompt.unsqueeze(0))
        logits = model.score(hidden[:, -1])
        torch.nn.functional.cross_entropy(logits, labels).backward()

    return step, prompt, model.score.weight


def swarm_step(dht: str, path: Path, ids: Any, labels: Any, score: Any, mode: str, lora: bool = False,
               parts: int = 1) -> tuple[Callable[[], None], Any]:  # fmt: skip
    import torch

    from client_sdk import AutoDistributedModelForSequenceClassification

    options: dict[str, Any] = {}
    if parts:  # else the default max_tokens_per_call
        options["max_tokens_per_call"] = -(-ids.shape[0] // parts) * (ids.shape[1] + PRE_SEQ_LEN)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, initial_peers=[dht], num_labels=2, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, **options
    )
    if model.config.pad_token_id is None:  # Petals' random `small` has none; the ids hold no padding anyway
        model.config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.no_grad():  # the local setup's prompt and head values, for the gradient check
        model.prompt_embeddings.weight.copy_(torch.randn(PRE_SEQ_LEN, model.family.hidden_size) * 0.02)
        model.score.weight.copy_(score)
    if lora:
        from peft import LoraConfig

        model.add_lora(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    def step() -> None:
        model.zero_grad()
        model(ids, labels=labels).loss.backward()

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models/smollm2-135m"), help="model folder, or 'small'")
    parser.add_argument("--repeats", type=int, default=5, help="measured steps per setup (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="smoke run: Petals' small random model, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.model, args.repeats = SMALL, 1
    use_threads(args.threads)
    import torch
    from tqdm import tqdm

    from tests.tuning_reference import rel_err

    scratch = tempfile.TemporaryDirectory(prefix="pollen-bench-")
    print(f"code: {code_version()}; load average before: {load_average()}", file=sys.stderr)
    path = resolve_model(args.model, Path(scratch.name))
    blocks = num_blocks(path)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (args.batch, args.seq), generator=gen)  # no padding: every token counts
    labels = torch.randint(0, 2, (args.batch,), generator=gen)
    tokens = args.batch * args.seq

    with swarm_processes(args.threads) as procs:
        dht, servers = start_swarm(procs, "ft", path, 2, args.threads)
        me = os.getpid()
        server_pids = [s.popen.pid for s in servers]
        local, prompt, score = local_step(path, ids, labels)
        setups: dict[str, tuple[Callable[[], None], list[int]]] = {"local transformers": (local, [me])}
        models = {}
        for name, mode, lora, parts in (
            ("Pollen ptune", "ptune", False, 0),
            ("Pollen deep_ptune", "deep_ptune", False, 0),
            ("Pollen ptune + client LoRA r=8", "ptune", True, 0),
            ("Pollen ptune, 1 part (no split)", "ptune", False, 1),
            ("Pollen ptune, 4 parts", "ptune", False, 4),
        ):
            step, model = swarm_step(dht, path, ids, labels, score.detach(), mode, lora, parts)
            setups[name], models[name] = (step, [me, *server_pids]), model
        try:
            wall: dict[str, list[float]] = {name: [] for name in setups}
            cpu: dict[str, list[float]] = {name: [] for name in setups}
            names = list(setups)
            for round_ in tqdm(range(args.repeats + 1), desc="rounds", leave=False):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    step, pids = setups[name]
                    cpu0 = sum(cpu_seconds(p) for p in pids)
                    t0 = time.perf_counter()
                    step()
                    elapsed = time.perf_counter() - t0
                    if round_:  # round 0 is the warm-up
                        wall[name].append(elapsed)
                        cpu[name].append(sum(cpu_seconds(p) for p in pids) - cpu0)
            check = models["Pollen ptune"].prompt_embeddings.weight.grad
            error = rel_err(check, prompt.grad)
            if error > 1e-4:
                raise AssertionError(f"the swarm's prompt gradient differs from the local one: {error:.2e}")
        finally:
            for model in models.values():
                model.client.close()

    print(f"\ncode: {code_version()}; load average after: {load_average()}")
    print(
        f"{path.name} ({blocks} blocks), float32, one forward+backward of {args.batch} x {args.seq} tokens "
        f"(+{PRE_SEQ_LEN} prompt tokens) per step, 2 servers ({blocks // 2 if blocks > 1 else 1} blocks each "
        f"roughly), {args.threads} torch thread(s) per process, median of {args.repeats} (min-max); CPU = this "
        f"process + the servers; prompt gradient of the swarm vs local: relative error {error:.1e}\n"
    )
    base = median(wall["Pollen ptune"])
    rows = []
    for name in setups:
        tps = [tokens / t for t in wall[name]]
        rows.append([name, f"{median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f})", f"{median(wall[name]):.2f}",
                     f"{median(wall[name]) / base:.2f}x", f"{median(cpu[name]):.2f}"])  # fmt: skip
    print(markdown(["setup", "tokens/s", "s/step", "time vs Pollen ptune", "CPU s/step"], rows))
    scratch.cleanup()


if __name__ == "__main__":
    main()
