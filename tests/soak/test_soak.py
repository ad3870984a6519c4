"""Reliability suite (issue 13, part 5), short by default (`make test`, ~2 minutes); POLLEN_SOAK=long runs the full
soak (`make soak` runs the same parts through bench/soak.py). The figures are printed as a table at the end of
the run (tests/soak/conftest.py).

1. fuzz: mutated protobuf messages against every RPC of a shard server and of a dht-node (raw bytes through
   generic gRPC calls) and mutated datagrams against the dht-node's UDP port: no crash, a clear status for
   each (no UNKNOWN/INTERNAL), RSS flat after a warm-up, every process still answering;
2. load: concurrent clients generating for a while, every answer equal to transformers' greedy tokens, then no
   session and no cache byte left on any server;
3. faults: kill -9 of random servers and dht-nodes (replicas present, restarted later) while clients generate
   and run prompt-tuning steps: every request completes with transformers' tokens, logits and gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launcher import SwarmProcesses
from tests.reference import greedy_references
from tests.soak.conftest import REPORTS
from tests.soak.report import SoakReport, mode_from_env
from tests.soak.suite import SETTINGS, MainSwarm, fault_part, fuzz_part, load_part, start_main_swarm
from tests.soak.swarmkit import NEW_TOKENS, PROMPTS
from tests.tuning_fakes import make_tiny

pytestmark = pytest.mark.e2e

MODE = mode_from_env()


@pytest.fixture(scope="module")
def report() -> SoakReport:
    report = SoakReport(MODE)
    REPORTS.append(report)
    return report


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("soak") / "tiny")


@pytest.fixture(scope="module")
def references(model: Path) -> list[list[int]]:
    return greedy_references(model, PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def swarm(model: Path, request: pytest.FixtureRequest) -> Iterator[MainSwarm]:
    procs = SwarmProcesses()
    failed_before = request.session.testsfailed
    try:
        yield start_main_swarm(procs, model)
    finally:
        if request.session.testsfailed > failed_before:
            for proc in procs.procs:  # the tails of the logs explain most failures
                print(f"===== {proc.name} (last lines) =====\n" + "\n".join(proc.log().splitlines()[-40:]))
        procs.close()


def test_fuzz_every_rpc_and_the_udp_port(swarm: MainSwarm, model: Path, report: SoakReport) -> None:
    fuzz_part(swarm, model.name, SETTINGS[MODE], report)
    assert report.fuzz and all(r.cases == SETTINGS[MODE].fuzz_cases for r in report.fuzz)
    problems = [p for r in report.fuzz for p in r.problems()] + report.extra_problems
    assert not problems, "\n".join(problems)


def test_concurrent_clients_leave_no_session_or_cache_bytes(
    swarm: MainSwarm, model: Path, references: list[list[int]], report: SoakReport
) -> None:
    load_part(swarm, model, SETTINGS[MODE], references, report)
    assert report.load is not None and report.load.generations > 0
    assert not report.load.problems(), "\n".join(report.load.problems())


def test_kill_servers_and_dht_nodes_during_generation_and_training(
    model: Path, references: list[list[int]], report: SoakReport
) -> None:
    fault_part(model, SETTINGS[MODE], references, report)
    faults = report.faults
    assert faults is not None and faults.faults > 0 and faults.injected["server kill"] > 0
    assert faults.requests["generate ok"] > 0 and faults.requests["train ok"] > 0
    assert not faults.problems(), "\n".join(faults.problems() + ["fault schedule:", *faults.events])
