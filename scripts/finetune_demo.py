"""`make finetune-demo`: prompt-tune SmolLM2-135M for sentiment through a local 2-server Pollen swarm on CPU.

Starts one dht-node and two shard-servers (blocks 0:15 and 15:30) as real processes, then trains Petals-style
prompt tuning with a classification head: `AutoDistributedModelForSequenceClassification(num_labels=2,
tuning_mode="ptune", pre_seq_len=8)`. Only the 8 prompt embeddings and the `score` head (on this machine) are
trained; the frozen blocks stay on the servers, which run Forward and Backward for every batch. The data is
generated here: templated sentences about movies, meals, hotels... with a positive or a negative adjective,
split into disjoint train and held-out sets. Prints a per-epoch table (train loss, held-out loss and accuracy)
and stops every process, also when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.launcher

from scripts.demo import start_swarm  # noqa: E402  (the same dht-node and two servers as `make demo`)
from tests.launcher import SwarmProcesses  # noqa: E402

log = logging.getLogger("finetune-demo")

POSITIVE = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant",
            "charming", "pleasant", "amazing", "enjoyable", "perfect", "beautiful", "fun", "impressive"]  # fmt: skip
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "poor", "bad", "miserable",
            "dull", "annoying", "painful", "mediocre", "ugly", "tedious", "unpleasant"]  # fmt: skip
NOUNS = ["movie", "book", "meal", "concert", "hotel", "game", "trip", "show", "album", "restaurant", "play",
         "course", "phone", "service", "museum", "party"]  # fmt: skip
TEMPLATES = ["The {noun} was {adj}.", "I thought the {noun} was {adj}.", "What a {adj} {noun}!",
             "Honestly, this {noun} is {adj}.", "My friends said the {noun} felt {adj}.", "Overall, a {adj} {noun}.",
             "The {noun} turned out {adj}.", "It was a {adj} {noun}, really."]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="model folder (default: %(default)s)")
    parser.add_argument("--split", type=int, default=15, help="first block of the second server (default: 15)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set (default: 3)")
    parser.add_argument("--train", type=int, default=192, help="training sentences (default: 192)")
    parser.add_argument("--test", type=int, default=96, help="held-out sentences (default: 96)")
    parser.add_argument("--batch", type=int, default=8, help="sentences per step (default: 8)")
    parser.add_argument("--pre-seq-len", type=int, default=8, help="prompt tokens (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the prompts (default: 1e-2)")
    parser.add_argument("--head-lr", type=float, default=1e-3,
                        help="AdamW learning rate of the head (default: 1e-3; its inputs have norms ~50)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, its order and the head (default: 0)")
    return parser.parse_args()


def make_data(n_train: int, n_test: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Disjoint train and held-out sets of (sentence, label), label 1 = positive, balanced."""
    rng = random.Random(seed)
    sentences = {
        (t.format(noun=noun, adj=adj), label)
        for label, adjectives in ((1, POSITIVE), (0, NEGATIVE))
        for adj in adjectives
        for noun in NOUNS
        for t in TEMPLATES
    }
    pool = sorted(sentences)
    rng.shuffle(pool)
    if n_train + n_test > len(pool):
        raise SystemExit(f"--train + --test is over the {len(pool)} sentences the templates make")
    return pool[:n_train], pool[n_train : n_train + n_test]


def batches(data: list[tuple[str, int]], size: int, tokenizer: Any, pad: int) -> list[tuple[Any, Any, Any]]:
    """(input_ids, attention_mask, labels) per batch, right-padded with the pad id (classification pools by it)."""
    import torch

    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        ids = [tokenizer.encode(text) for text, _ in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        out.append((input_ids, mask, torch.tensor([label for _, label in chunk])))
    return out


def evaluate(model: Any, data: list[tuple[Any, Any, Any]]) -> tuple[float, float]:
    """(mean loss, accuracy) over `data`, Forward only."""
    import torch

    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for ids, mask, labels in data:
            out = model(ids, attention_mask=mask, labels=labels)
            loss += float(out.loss) * len(labels)
            correct += int((out.logits.argmax(-1) == labels).sum())
            total += len(labels)
    return loss / total, correct / total


def train(dht_address: str, args: argparse.Namespace) -> list[list[str]]:
    import torch
    from tqdm import tqdm

    from client_sdk import AutoDistributedModelForSequenceClassification

    torch.manual_seed(args.seed)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        args.model, initial_peers=[dht_address], num_labels=2, tuning_mode="ptune", pre_seq_len=args.pre_seq_len
    )
    try:
        tokenizer = model.client.tokenizer
        if tokenizer is None:
            raise SystemExit(f"{args.model} has no tokenizer.json")
        pad = model.config.pad_token_id
        train_set, test_set = make_data(args.train, args.test, args.seed)
        test = batches(test_set, 32, tokenizer, pad)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        log.info("trainable: %s (%d values); the %d blocks stay on the servers",
                 ", ".join(n for n, _ in trainable), sum(p.numel() for _, p in trainable),
                 model.family.num_blocks)  # fmt: skip
        optimizer = torch.optim.AdamW(
            [{"params": [model.prompt_embeddings.weight], "lr": args.lr},
             {"params": [model.score.weight], "lr": args.head_lr}]
        )  # fmt: skip
        t0 = time.perf_counter()
        test_loss, accuracy = evaluate(model, test)
        rows = [["0 (start)", "-", f"{test_loss:.3f}", f"{accuracy:.1%}", f"{time.perf_counter() - t0:.0f}"]]
        rng = random.Random(args.seed)
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            rng.shuffle(train_set)
            losses: list[float] = []
            bar = tqdm(batches(train_set, args.batch, tokenizer, pad), desc=f"epoch {epoch}/{args.epochs}",
                       unit="batch", file=sys.stdout)  # fmt: skip
            for ids, mask, labels in bar:
                optimizer.zero_grad()
                loss = model(ids, attention_mask=mask, labels=labels).loss
                loss.backward()  # Backward on the servers, in reverse: gradients of the prompts come back
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{sum(losses[-5:]) / len(losses[-5:]):.3f}")
            test_loss, accuracy = evaluate(model, test)
            elapsed = time.perf_counter() - t0
            rows.append([str(epoch), f"{sum(losses) / len(losses):.3f}", f"{test_loss:.3f}", f"{accuracy:.1%}",
                         f"{elapsed:.0f}"])  # fmt: skip
            print_table(rows)
        return rows
    finally:
        model.client.close()


def print_table(rows: list[list[str]]) -> None:
    header = ["epoch", "train loss", "held-out loss", "held-out accuracy", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    sys.stdout.write("\n" + "\n".join(lines) + "\n\n")
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM also runs the cleanup, like Ctrl-C
    import torch

    from swarm.models import load_family

    torch.set_num_threads(1)
    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"no model at {args.model}; run `make model` first")
    num_blocks = load_family(Path(args.model)).num_blocks
    t0 = time.perf_counter()
    with SwarmProcesses() as swarm:
        try:
            dht_address = start_swarm(swarm, args.model, args.split, num_blocks)
            train(dht_address, args)
        except BaseException:
            sys.stderr.write(swarm.logs()[-5000:] + "\n")  # the processes' own logs say why
            raise
    log.info("done in %.0f s; all processes stopped", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
