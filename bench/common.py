"""Shared pieces of the benchmarks: the code under test, the honest local baseline, swarms on loopback, tables.

Which code is measured: the tree this file lives in. Its root goes first on `sys.path` here and first on
`PYTHONPATH` for every child process (`PYTHONPATH` beats the editable install), so a benchmark copied into a
git worktree measures that worktree. `code_version()` says which commit (and whether the tree was dirty).

The local baseline is the plainest call: `LlamaForCausalLM.generate(ids, max_new_tokens=n)` (greedy, no
`min_new_tokens` or other logits processor on one side only). `greedy_prompt` picks a prompt whose greedy
continuation has no EOS within n tokens, so both sides produce the same n tokens with default EOS handling.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this tree's client_sdk, tests.launcher, ... before the editable install

MIB = 1 << 20
PROMPT_LEN = 16
SMALL = "small"  # Petals' `small` benchmark model, built on the fly (random weights)
BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")  # model.layers.3.*, transformer.h.3.*


def child_env(threads: int) -> dict[str, str]:
    """Environment for every child process: this tree's code, `threads` torch threads, no tokenizer pool."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    n = str(threads)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


def use_threads(threads: int) -> None:
    """This process: `threads` torch threads (call before heavy imports), and the same for its children."""
    os.environ.update(child_env(threads))
    import torch

    torch.set_num_threads(threads)


def code_version() -> str:
    """`<commit> (<tree>)`, noting uncommitted changes outside bench/ (the code measured, not the benchmark)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench")
    except (OSError, subprocess.SubprocessError):
        return f"unknown commit ({REPO})"
    return f"{head}{' + uncommitted changes' if dirty else ''} ({REPO})"


def _git(*argv: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def markdown(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quiet_transformers() -> None:
    """No progress bars, no per-call warnings ("Setting pad_token_id to eos_token_id") in the tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---- models -------------------------------------------------------------------------------------------------


def make_random_small(folder: Path) -> Path:
    """Petals-bench's `small` model: hidden 512, 8 layers, 8 heads, vocab 32000, random weights (seed 1234)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    if (folder / "config.json").exists():
        return folder
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


def resolve_model(name: str, scratch: Path) -> Path:
    """`small` (or `random-small`) -> Petals' small model built in `scratch`; anything else is a folder."""
    if name in (SMALL, "random-small"):
        return make_random_small(scratch / "random-small")
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"no model at {path} (for SmolLM2, run `make model` in the repo root)")
    return path.resolve()


def num_blocks(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    return int(cfg.get("num_hidden_layers") or cfg["n_layer"])


def safetensors_entries(path: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's header entry (dtype, shape, data_offsets) across the model's safetensors files."""
    entries: dict[str, dict[str, Any]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        entries.update(header)
    return entries


def block_weight_bytes(path: Path, blocks: range, element_bytes: int = 4) -> int:
    """Bytes of the weights of `blocks` once loaded with `element_bytes` per element (float32: 4), from the
    safetensors headers (no tensor is read)."""
    total = 0
    for name, entry in safetensors_entries(path).items():
        match = BLOCK_INDEX.search(name)
        if match and int(match.group(1)) in blocks:
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            total += numel * element_bytes
    return total


# ---- the local baseline -------------------------------------------------------------------------------------


def load_local(path: Path) -> Any:
    """The reference model, float32, eval mode (transformers' Auto class picks the family's CausalLM)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def local_generate(lm: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The plainest local call: greedy `generate(ids, max_new_tokens=n)`; returns the new tokens only."""
    import torch

    out = lm.generate(torch.tensor([prompt]), max_new_tokens=new_tokens)  # [1, prompt + new]
    return out[0, len(prompt) :].tolist()


def greedy_prompt(lm: Any, new_tokens: int, seed: int = 0, tries: int = 50) -> tuple[list[int], list[int]]:
    """A random PROMPT_LEN-token prompt whose greedy continuation runs `new_tokens` tokens without EOS.

    Returns (prompt, the expected new tokens). Both sides can then use plain EOS handling and still make
    exactly `new_tokens` tokens, so neither needs `min_new_tokens` (whose logits processor costs 5-9 %).
    """
    import torch

    gen_cfg = lm.generation_config
    if gen_cfg.do_sample or (gen_cfg.num_beams or 1) != 1:
        raise SystemExit(f"the model's generation_config is not greedy: {gen_cfg}")
    eos = gen_cfg.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    vocab = int(lm.config.vocab_size)
    for attempt in range(seed, seed + tries):
        gen = torch.Generator().manual_seed(attempt)
        prompt = torch.randint(100, vocab, (PROMPT_LEN,), generator=gen).tolist()  # above the special ids
        tokens = local_generate(lm, prompt, new_tokens)
        if len(tokens) == new_tokens and not eos_ids & set(tokens):
            return prompt, tokens
    raise RuntimeError(f"no prompt among {tries} seeds has a {new_tokens}-token greedy continuation without EOS")


# ---- swarms on loopback -------------------------------------------------------------------------------------


def split_ranges(blocks: int, servers: int) -> list[str]:
    """`servers` contiguous half-open ranges covering `blocks` as evenly as possible."""
    cuts = [round(i * blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def start_swarm(procs: Any, name: str, model: Path, servers: int, threads: int, *extra: str) -> tuple[str, list[Any]]:
    """A dht-node of its own plus `servers` shard-servers splitting the model; returns (dht address, servers).

    Each swarm gets its own dht-node so that swarms of the same model alive at once never mix routes.
    """
    dht = procs.start_dht(f"dht-{name}")
    flags = ("--num-threads", str(threads), *extra)
    started = [
        procs.start_server(model, r, [dht.address], *flags, name=f"{name}-{i}", wait=False)
        for i, r in enumerate(split_ranges(num_blocks(model), servers))
    ]
    for proc in started:
        procs.wait_ready(proc)
    return str(dht.address), started


def swarm_processes(threads: int) -> Any:
    from tests.launcher import SwarmProcesses

    return SwarmProcesses(env=child_env(threads))


@dataclass
class Timings:
    """Per setup, per measured call: wall seconds, and CPU seconds of every process involved (this one and
    the setup's servers; with batch 1 they take turns, so on an idle machine wall ~ CPU + wake-ups)."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    # per setup, per call: CPU seconds of each process, in order (this one, then server 1, server 2, ...)
    per_process: dict[str, list[list[float]]] = field(default_factory=dict)


def compare_decode(
    lm: Any,
    model: Path,
    prompt: list[int],
    expected: list[int],
    server_counts: Sequence[int],
    repeats: int,
    threads: int,
    extra_server_flags: Sequence[str] = (),
    desc: str = "",
) -> Timings:
    """Times `generate` calls of the local model and of swarms of 1, 2, ... servers, interleaved.

    Every swarm is up at once (idle ones cost nothing), so each round times every setup back to back, in a
    rotating order: a load change on the shared machine hits all setups alike. One warm-up call each.
    Raises if any setup produces other tokens than `expected`.
    """
    from tqdm import tqdm

    from client_sdk import SwarmClient

    new_tokens = len(expected)
    runners: dict[str, Callable[[], list[int]]] = {"local": lambda: local_generate(lm, prompt, new_tokens)}
    pids: dict[str, list[int]] = {"local": [os.getpid()]}
    clients = []
    with swarm_processes(threads) as procs:
        try:
            for count in server_counts:
                dht, servers = start_swarm(procs, f"s{count}", model, count, threads, *extra_server_flags)
                client = SwarmClient(initial_peers=[dht], model=str(model))
                clients.append(client)
                runners[setup_name(count)] = functools.partial(swarm_generate, client, prompt, new_tokens)
                pids[setup_name(count)] = [os.getpid()] + [s.popen.pid for s in servers]
            out = Timings({name: [] for name in runners}, {name: [] for name in runners}, {n: [] for n in runners})
            names = list(runners)
            for round_ in tqdm(range(repeats + 1), desc=desc or "rounds", leave=False):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    cpu0 = [cpu_seconds(pid) for pid in pids[name]]
                    t0 = time.perf_counter()
                    tokens = runners[name]()
                    elapsed = time.perf_counter() - t0
                    cpu = [cpu_seconds(pid) - c for pid, c in zip(pids[name], cpu0, strict=True)]
                    if tokens != expected:
                        first = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))
                        raise AssertionError(
                            f"{name}: {len(tokens)} tokens, first difference at {first}: "
                            f"{tokens[first : first + 5]} vs {expected[first : first + 5]}"
                        )
                    if round_:  # round 0 is the warm-up
                        out.wall[name].append(elapsed)
                        out.cpu[name].append(sum(cpu))
                        out.per_process[name].append(cpu)
        finally:
            for client in clients:
                client.close()
    return out


def swarm_generate(client: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The swarm side's plainest call: `client.generate(prompt, max_new_tokens=n)` with default EOS handling."""
    return list(client.generate(prompt, max_new_tokens=new_tokens))


def setup_name(servers: int) -> str:
    return f"{servers} server" + ("s" if servers > 1 else "")


def memory(pid: int) -> dict[str, int]:
    """Bytes of VmRSS and its parts RssAnon and RssFile (file-backed: mmap'd weights live there)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def rss_bytes(pid: int) -> int:
    return memory(pid)["VmRSS"]


def decode_once(dht: str, model: Path, new_tokens: int = 64) -> None:
    """One generation through the swarm: the server touches every weight (mmap'd weights are resident only
    after that), allocates a KV cache and runs its first steps."""
    from client_sdk import SwarmClient

    with SwarmClient(initial_peers=[dht], model=str(model)) as client:
        client.generate(list(range(100, 116)), max_new_tokens=new_tokens)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's live threads so far, in ns resolution (/proc/<pid>/stat counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])  # ns on a CPU
        except (OSError, ValueError):
            pass  # the thread just ended
    return total / 1e9
