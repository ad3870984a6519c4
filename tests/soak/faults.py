"""The fault part: kill -9 random shard servers and dht-nodes of a swarm with replicas (restarting them a little
later) while clients generate and run fine-tuning steps; every request must complete with the right output.

Generation workers compare their tokens with transformers' greedy tokens; training workers run Forward and
Backward of a prompt-tuned model (tuning_mode="ptune") and compare logits and the prompts' gradient with a
local transformers model. A kill never leaves a block without a live, ready server (replicas present), and one
of the dht-nodes the clients were given stays up. A fault is survived when every request that overlapped its
window (from it to the next fault) was correct.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client_sdk import AutoDistributedModelForCausalLM, SwarmClient
from tests.launcher import Proc, SwarmProcesses
from tests.soak.report import FaultResult, status_kind
from tests.soak.swarmkit import PROMPTS, SERVER_FLAGS
from tests.tuning_fakes import IDS, PAD, RIGHT, TOL, causal_loss
from tests.tuning_reference import prompted_hidden, rel_err

SPANS = {"0:2": (0, 2), "2:4": (2, 4), "0:4": (0, 4)}
FAILED_PAUSE_S = 0.5  # after a failed request a worker pauses, so one bad moment is not a thousand failures
PLAN = [("k-0:2a", "0:2"), ("k-0:2b", "0:2"), ("k-2:4a", "2:4"), ("k-2:4b", "2:4"), ("k-0:4", "0:4")]


@dataclass
class Request:
    kind: str  # "generate" or "train"
    start: float
    end: float
    ok: bool
    detail: str = ""


@dataclass
class ChurnSettings:
    seconds: float  # how long faults are injected
    period_s: float  # between two faults
    restart_after_s: float  # a killed process comes back this much later
    dht_share: float  # share of faults that kill a dht-node (when one may die)
    generators: int
    trainers: int
    seed: int


@dataclass
class Churn:
    """The swarm and what the injector knows about it."""

    procs: SwarmProcesses
    model: Path
    dhts: list[Proc]
    protected: Proc  # a dht-node the clients know that is never killed
    t0: float = field(default_factory=time.monotonic)
    servers: list[tuple[Proc, str]] = field(default_factory=list)  # live or starting servers and their blocks
    restarts: list[tuple[float, str, str]] = field(default_factory=list)  # (when, kind, blocks)

    def peers(self) -> list[str]:
        return [d.address for d in self.dhts if d.alive()]

    def covered_without(self, victim: Proc) -> bool:
        """Every block keeps a live, ready server if `victim` dies."""
        held = [SPANS[b] for p, b in self.servers if p is not victim and p.alive() and _ready(p)]
        return all(any(a <= block < b for a, b in held) for block in range(4))


def _banned(client: SwarmClient) -> str:
    """The peers a client avoids right now (short ids): with the fault events' peer ids, who was left out."""
    return f" [banned: {' '.join(sorted(p[:8] for p in client.async_client.view.banned()))}]"


def peer_of(proc: Proc) -> str:
    found = re.search(r"as peer ([0-9a-f]{8})", proc.log())
    return found.group(1) if found else "?"


def _ready(proc: Proc) -> bool:
    if proc.address:
        return True
    text = proc.ready_path.read_text().strip() if proc.ready_path.exists() else ""
    if text:
        proc.address = text.split()[0]
    return bool(text)


class Workload:
    """Generation and training workers in threads, each request timed and checked."""

    def __init__(self, peers: list[str], model: Path, references: list[list[int]]) -> None:
        self.peers = peers
        self.model = model
        self.references = references
        self.requests: list[Request] = []
        self.failovers = 0
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, generators: int, trainers: int) -> None:
        targets = [self._generate] * generators + [self._train] * trainers
        for i, target in enumerate(targets):
            thread = threading.Thread(target=self._guard, args=(target, i), name=f"soak-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(300)

    def _record(self, kind: str, t0: float, ok: bool, detail: str = "") -> None:
        with self._lock:
            self.requests.append(Request(kind, t0, time.monotonic(), ok, detail))

    def _guard(self, target: Any, index: int) -> None:
        t0 = time.monotonic()
        try:
            target(index)
        except Exception as e:  # noqa: BLE001 - a worker that dies (e.g. cannot connect) is a failed request
            self._record("worker", t0, False, f"worker {index}: {type(e).__name__}: {e}"[:300])

    def _generate(self, index: int) -> None:
        rng = random.Random(index)
        with SwarmClient(self.peers, self.model) as client:
            while not self.stop.is_set():
                i = rng.randrange(len(PROMPTS))
                t0 = time.monotonic()
                try:
                    tokens = client.generate(PROMPTS[i], max_new_tokens=len(self.references[i]), eos_token_id=None)
                except Exception as e:  # noqa: BLE001
                    self._record("generate", t0, False, f"{type(e).__name__}: {e}"[:400] + _banned(client))
                    self.stop.wait(FAILED_PAUSE_S)
                    continue
                with self._lock:
                    self.failovers += len(client.async_client.last_failovers)
                ok = tokens == self.references[i]
                self._record("generate", t0, ok, "" if ok else f"prompt {i}: {tokens} != {self.references[i]}")

    def _train(self, index: int) -> None:
        from transformers import LlamaForCausalLM

        torch.manual_seed(index)
        model = AutoDistributedModelForCausalLM.from_pretrained(self.model, initial_peers=self.peers,
                                                               tuning_mode="ptune", pre_seq_len=2)  # fmt: skip
        try:
            base = LlamaForCausalLM.from_pretrained(self.model)
            shallow = torch.nn.Parameter(model.prompt_embeddings.weight.detach().clone())
            ids = IDS.masked_fill(RIGHT == 0, PAD)
            ref_logits = base.lm_head(prompted_hidden(base.model, ids, RIGHT, shallow.unsqueeze(0)))
            causal_loss(ref_logits, ids, RIGHT).backward()
            real = RIGHT.bool()
            while not self.stop.is_set():
                model.zero_grad()
                t0 = time.monotonic()
                try:
                    out = model(ids, attention_mask=RIGHT)
                    causal_loss(out.logits, ids, RIGHT).backward()
                except Exception as e:  # noqa: BLE001
                    self._record("train", t0, False, f"{type(e).__name__}: {e}"[:400] + _banned(model.client))
                    self.stop.wait(FAILED_PAUSE_S)
                    continue
                logits_err = rel_err(out.logits[real], ref_logits[real])
                grad_err = rel_err(model.prompt_embeddings.weight.grad, shallow.grad)  # type: ignore[arg-type]
                ok = logits_err < TOL and grad_err < TOL
                self._record("train", t0, ok, "" if ok else f"logits err {logits_err:.2e}, grad err {grad_err:.2e}")
        finally:
            model.client.close()


def start_churn_swarm(procs: SwarmProcesses, model: Path) -> Churn:
    d0 = procs.start_dht("k-dht0")
    others = [procs.start_dht(f"k-dht{i}", [d0.address]) for i in (1, 2)]
    churn = Churn(procs, model, [d0, *others], protected=others[-1])
    peers = churn.peers()
    started = [procs.start_server(model, b, peers, *SERVER_FLAGS, name=n, wait=False) for n, b in PLAN]
    for proc, (_, blocks) in zip(started, PLAN, strict=True):
        procs.wait_ready(proc)
        churn.servers.append((proc, blocks))
    return churn


def run_churn(churn: Churn, settings: ChurnSettings, references: list[list[int]], log: Any = print) -> FaultResult:
    rng = random.Random(settings.seed)
    result = FaultResult()
    work = Workload(churn.peers(), churn.model, references)
    work.start(settings.generators, settings.trainers)
    faults: list[float] = []
    t_start = churn.t0 = work.t0 = time.monotonic()
    next_fault = t_start + settings.period_s
    serial = 0
    while time.monotonic() < t_start + settings.seconds:
        now = time.monotonic()
        for when, kind, blocks in [r for r in churn.restarts if r[0] <= now]:
            churn.restarts.remove((when, kind, blocks))
            serial += 1
            if kind == "server":
                proc = churn.procs.start_server(churn.model, blocks, churn.peers(), *SERVER_FLAGS,
                                                name=f"k-{blocks}-r{serial}", wait=False)  # fmt: skip
                churn.servers.append((proc, blocks))
            else:
                churn.dhts.append(churn.procs.start_dht(f"k-dht-r{serial}", churn.peers()))
            result.injected[f"{kind} restart"] += 1
            result.events.append(f"+{now - churn.t0:.1f} s restart {kind} {blocks}")
        churn.servers = [(p, b) for p, b in churn.servers if p.alive()]
        if now >= next_fault:
            next_fault = now + settings.period_s * rng.uniform(0.7, 1.3)
            if _inject(churn, rng, settings, result, now):
                faults.append(now)
        time.sleep(0.05)
    work.join()
    result.seconds = time.monotonic() - t_start
    _account(result, faults, work)
    log(f"faults: {dict(result.injected)}, survived {result.survived}/{result.faults}, {dict(result.requests)}")
    return result


def _inject(churn: Churn, rng: random.Random, s: ChurnSettings, result: FaultResult, now: float) -> bool:
    killable_dhts = [d for d in churn.dhts if d.alive() and d is not churn.protected]
    if killable_dhts and rng.random() < s.dht_share:
        victim = rng.choice(killable_dhts)
        churn.procs.stop(victim, signal.SIGKILL)
        churn.restarts.append((now + s.restart_after_s, "dht-node", ""))
        result.injected["dht-node kill"] += 1
        result.events.append(f"+{now - churn.t0:.1f} s kill {victim.name}")
        return True
    candidates = [(p, b) for p, b in churn.servers if p.alive() and _ready(p) and churn.covered_without(p)]
    if not candidates:
        return False  # every block has a single live server right now: wait for the restarts
    victim, blocks = rng.choice(candidates)
    churn.servers.remove((victim, blocks))
    churn.procs.stop(victim, signal.SIGKILL)
    churn.restarts.append((now + s.restart_after_s, "server", blocks))
    result.injected["server kill"] += 1
    live = ", ".join(f"{p.name}={peer_of(p)}" for p, _ in churn.servers if p.alive() and _ready(p))
    result.events.append(f"+{now - churn.t0:.1f} s kill {victim.name}={peer_of(victim)} ({blocks}); live: {live}")
    return True


def _account(result: FaultResult, faults: list[float], work: Workload) -> None:
    result.failovers = work.failovers
    first: dict[str, str] = {}
    for r in sorted(work.requests, key=lambda r: r.start):
        result.requests[f"{r.kind} {'ok' if r.ok else 'FAILED'}"] += 1
        if not r.ok:
            kind = status_kind(r.kind, r.detail)
            result.failure_kinds[kind] += 1
            first.setdefault(kind, f"{r.kind} at +{r.start - work.t0:.1f} s: {r.detail}")
    result.failures = [f"{n}x, first: {first[kind]}" for kind, n in result.failure_kinds.most_common()]
    result.faults = len(faults)
    ends = faults[1:] + [float("inf")]
    for t0, t1 in zip(faults, ends, strict=True):
        hit = [r for r in work.requests if r.start < t1 and r.end > t0]
        result.survived += all(r.ok for r in hit)
