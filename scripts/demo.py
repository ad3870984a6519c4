"""`make demo`: a local Pollen swarm on loopback generating real text with SmolLM2-135M-Instruct.

Starts one dht-node and two shard-servers (blocks 0:15 and 15:30) as real processes, generates a chat answer
through them, prints the text and tokens/s, and stops every process, also when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.launcher

from tests.launcher import SwarmProcesses  # noqa: E402

log = logging.getLogger("demo")
# Three processes share this machine's cores and only one computes at a time: one torch thread each avoids
# OpenMP threads of idle processes spinning against the busy one.
THREADS = ("--num-threads", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="model folder (default: %(default)s)")
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.", help="user message")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--split", type=int, default=15, help="first block of the second server (default: 15)")
    return parser.parse_args()


def start_swarm(swarm: SwarmProcesses, model: str, split: int, num_blocks: int) -> str:
    """A dht-node and two shard-servers; returns the dht-node's address."""
    t0 = time.perf_counter()
    dht = swarm.start_dht()
    servers = swarm.start_servers(model, [f"0:{split}", f"{split}:{num_blocks}"], [dht.address], *THREADS)
    addresses = ", ".join(s.address for s in servers)
    log.info("swarm up in %.1f s: dht %s, servers %s", time.perf_counter() - t0, dht.address, addresses)
    return dht.address


def chat(dht_address: str, model: str, prompt: str, max_new_tokens: int) -> None:
    from client_sdk import SwarmClient

    with SwarmClient(initial_peers=[dht_address], model=model) as client:
        tokenizer = client.tokenizer
        if tokenizer is None:
            raise SystemExit(f"{model} has no tokenizer.json")
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        client.generate(prompt_ids, max_new_tokens=4)  # warm-up: opens channels, first allocations
        sys.stdout.write(f"\nUser: {prompt}\nAssistant: ")
        text = tokenizer.stream()  # token ids -> text pieces, printed as they arrive
        n = 0
        t0 = time.perf_counter()
        for token in client.stream(prompt_ids, max_new_tokens=max_new_tokens):
            n += 1
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
        elapsed = time.perf_counter() - t0
        sys.stdout.write(text.finish() + "\n\n")
    sys.stdout.write(f"{n} tokens in {elapsed:.2f} s = {n / elapsed:.1f} tokens/s through 2 servers\n")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # SIGTERM (e.g. from a CI timeout) must also run the cleanup below, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    from swarm.models import load_family

    torch.set_num_threads(1)

    num_blocks = load_family(Path(args.model)).num_blocks
    with SwarmProcesses() as swarm:
        try:
            dht_address = start_swarm(swarm, args.model, args.split, num_blocks)
            chat(dht_address, args.model, args.prompt, args.max_new_tokens)
        except BaseException:
            sys.stderr.write(swarm.logs() + "\n")  # the processes' own logs say why
            raise
    log.info("all processes stopped")


if __name__ == "__main__":
    main()
