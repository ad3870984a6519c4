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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="model folder (default: %(default)s)")
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.", help="user message")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--split", type=int, default=15, help="first block of the second server (default: 15)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # SIGTERM (e.g. from a CI timeout) must also run the cleanup below, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from transformers import AutoConfig, AutoTokenizer

    from client_sdk import SwarmClient

    num_blocks = AutoConfig.from_pretrained(args.model).num_hidden_layers
    with SwarmProcesses() as swarm:
        t0 = time.perf_counter()
        dht = swarm.start_dht()
        servers = [
            swarm.start_server(args.model, f"0:{args.split}", [dht.address], wait=False),
            swarm.start_server(args.model, f"{args.split}:{num_blocks}", [dht.address], wait=False),
        ]
        for server in servers:
            swarm.wait_ready(server)
        log.info("swarm up in %.1f s: dht %s, servers %s (logs in %s)", time.perf_counter() - t0, dht.address,
                 ", ".join(s.address for s in servers), swarm.workdir)

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt_ids, list):  # newer tokenizers return a BatchEncoding
            prompt_ids = list(prompt_ids["input_ids"])
        with SwarmClient(initial_peers=[dht.address], model=args.model) as client:
            client.generate(prompt_ids, max_new_tokens=4)  # warm-up: opens channels, first allocations
            t0 = time.perf_counter()
            new_ids = client.generate(prompt_ids, max_new_tokens=args.max_new_tokens)
            elapsed = time.perf_counter() - t0
        n = len(new_ids) - len(prompt_ids) if new_ids[: len(prompt_ids)] == prompt_ids else len(new_ids)
        answer = tokenizer.decode(new_ids[-n:], skip_special_tokens=True)
        sys.stdout.write(f"\nUser: {args.prompt}\nAssistant: {answer.strip()}\n\n")
        sys.stdout.write(f"{n} tokens in {elapsed:.2f} s = {n / elapsed:.1f} tokens/s through 2 servers\n")
    log.info("all processes stopped")


if __name__ == "__main__":
    main()
