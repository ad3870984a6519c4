"""The reliability suite as plain functions, shared by tests/soak/test_soak.py (pytest, `make test`) and
bench/soak.py (`make soak`): the settings of the short and the long mode, the swarm that is fuzzed and loaded,
and `run_suite` that runs the three parts in order and returns the report.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.launcher import Proc, SwarmProcesses
from tests.reference import greedy_references
from tests.soak.faults import ChurnSettings, run_churn, start_churn_swarm
from tests.soak.fuzz import run_fuzz
from tests.soak.load import Idle, idle_state, run_load
from tests.soak.messages import ShardTarget
from tests.soak.report import MIB, SoakReport
from tests.soak.swarmkit import FUZZ_DHT_FLAGS, NEW_TOKENS, PROMPTS, start_servers
from tests.tuning_fakes import make_tiny

SEED = 20_240_613
# After the warm-up, 10,000 cases per RPC may not grow a process by more. Transient requests of tens of MiB move a
# server's RSS up and down by ~20 MiB (20,000 Forward cases: 294 -> 310 -> 299 -> 331 -> 318 MiB), so less is noise.
RSS_DRIFT_LIMIT = 48 * MIB


@dataclass(frozen=True)
class Settings:
    fuzz_cases: int  # per RPC (and for the UDP port)
    load_clients: int
    load_seconds: float
    churn: ChurnSettings


SETTINGS = {
    "short": Settings(
        1_000,
        8,
        30.0,
        ChurnSettings(
            seconds=35.0, period_s=3.5, restart_after_s=3.0, dht_share=0.15, generators=2, trainers=1, seed=SEED
        ),
    ),  # fmt: skip
    "long": Settings(
        10_000,
        32,
        300.0,
        ChurnSettings(
            seconds=120.0, period_s=2.5, restart_after_s=3.0, dht_share=0.1, generators=4, trainers=2, seed=SEED
        ),
    ),  # fmt: skip
}


@dataclass
class MainSwarm:
    """Two dht-nodes and one chain (0:2, 2:4): dht0 and the 0:2 server are fuzzed, then the chain is loaded."""

    dhts: list[Proc]
    servers: list[Proc]
    idle: dict[str, Idle]  # read before anything ran

    @property
    def peers(self) -> list[str]:
        return [d.address for d in self.dhts]


def start_main_swarm(procs: SwarmProcesses, model: Path) -> MainSwarm:
    dht0 = procs.start_dht("dht0", None, *FUZZ_DHT_FLAGS)
    dht1 = procs.start_dht("dht1", [dht0.address])
    servers = start_servers(procs, model, [("server-0:2", "0:2"), ("server-2:4", "2:4")], [dht0.address, dht1.address])
    return MainSwarm([dht0, dht1], servers, {s.name: idle_state(s) for s in servers})


def fuzz_part(swarm: MainSwarm, model_id: str, settings: Settings, report: SoakReport, seed: int = SEED,
              log: Callable[[str], None] = print) -> None:  # fmt: skip
    target = ShardTarget(model_id, 0, 2, 64)
    fuzz, rss, notes = run_fuzz(swarm.servers[0], swarm.dhts[0], [swarm.servers[1], swarm.dhts[1]], target,
                                settings.fuzz_cases, seed, log)  # fmt: skip
    report.fuzz += fuzz
    report.rss += rss
    for note in notes:
        (report.extra_problems if note.startswith("FAIL") else report.notes).append(note)
    for sample in rss:
        if sample.drift > RSS_DRIFT_LIMIT:
            report.extra_problems.append(
                f"RSS of {sample.process} grew {sample.text()} (limit +{RSS_DRIFT_LIMIT // MIB})"
            )


def load_part(swarm: MainSwarm, model: Path, settings: Settings, references: list[list[int]],
              report: SoakReport) -> None:  # fmt: skip
    report.load = run_load(swarm.peers, model, swarm.servers, swarm.idle, settings.load_clients,
                           settings.load_seconds, PROMPTS, references)  # fmt: skip


def fault_part(model: Path, settings: Settings, references: list[list[int]], report: SoakReport,
               log: Callable[[str], None] = print) -> None:  # fmt: skip
    with SwarmProcesses() as procs:
        churn = start_churn_swarm(procs, model)
        report.faults = run_churn(churn, settings.churn, references, log)


def run_suite(mode: str, seed: int = SEED, log: Callable[[str], None] = print) -> SoakReport:
    settings = SETTINGS[mode]
    settings = dataclasses.replace(settings, churn=dataclasses.replace(settings.churn, seed=seed))
    report = SoakReport(mode)
    model = make_tiny(Path(tempfile.mkdtemp(prefix="pollen-soak-")) / "tiny")
    references = greedy_references(model, PROMPTS, NEW_TOKENS)
    with SwarmProcesses() as procs:
        swarm = start_main_swarm(procs, model)
        fuzz_part(swarm, model.name, settings, report, seed, log)
        load_part(swarm, model, settings, references, report)
    fault_part(model, settings, references, report, log)
    return report
