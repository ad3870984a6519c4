"""`pollen generate --draft SPEC [--num-draft-tokens N]` as a subprocess against a tiny swarm of its own (a dht-node
and two shard-servers, 0:2 and 2:4 of a tiny chat model): speculative decoding with self-speculation and with
prompt lookup prints exactly the text of the plain run, which is transformers' greedy text; misuse is a clear
error (exit 1, no traceback)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as pollen_main
from tests.gateway.chat_model import make_chat_model
from tests.gateway.conftest import reference_greedy, reference_tokenizer
from tests.launcher import BIN, SwarmProcesses

pytestmark = pytest.mark.e2e

# Repeats itself, so that prompt lookup finds n-grams to copy.
PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of France is"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model = make_chat_model(tmp_path_factory.mktemp("draft-chat-model"))
    with SwarmProcesses() as procs:
        try:
            dht = procs.start_dht()
            servers = [
                procs.start_server(
                    model, r, [dht.address], "--throughput", "100", "--network-mbps", "1000", wait=False
                )  # fmt: skip
                for r in ("0:2", "2:4")
            ]
            for server in servers:
                procs.wait_ready(server)
            yield dht.address, model
        except BaseException:
            print(procs.logs())
            raise


def generate(swarm: tuple[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    peers, model = swarm
    argv = [str(BIN / "pollen"), "generate", "--initial-peers", peers, "--model", str(model), PROMPT,
            "--max-new-tokens", str(NEW_TOKENS), *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_draft_runs_print_the_plain_greedy_text(swarm: tuple[str, Path]) -> None:
    tok: Any = reference_tokenizer(swarm[1])
    expected = tok.decode(reference_greedy(swarm[1], list(tok(PROMPT).input_ids), NEW_TOKENS), skip_special_tokens=True)
    plain = generate(swarm)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"
    drafts = (["--draft", "self:2"], ["--draft", "prompt-lookup"], ["--draft", "lookup:3", "--num-draft-tokens", "5"])
    for extra in drafts:
        run = generate(swarm, *extra)
        assert run.returncode == 0, (extra, run.stderr)
        assert run.stdout == plain.stdout, extra


def test_misuse_is_a_clear_error(swarm: tuple[str, Path]) -> None:
    for extra, message in (
        (["--draft", "self:9"], "N must be in 1..4"),
        (["--draft", "self:2", "--num-draft-tokens", "40"], "num_draft_tokens must be in 1..16"),
        (["--num-draft-tokens", "3"], "--num-draft-tokens needs --draft"),
        (["--draft", "self:2", "--repetition-penalty", "1.2"], "not available with --draft"),
    ):
        run = generate(swarm, *extra)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, (extra, run.stderr)


def test_help_names_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        pollen_main(["generate", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--draft SPEC" in text and "--num-draft-tokens N" in text and "prompt-lookup" in text
