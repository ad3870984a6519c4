"""The `pollen` command as people use it: `--help` everywhere, `generate` and `swarm` as subprocesses, and
`chat` in a real pseudo-terminal (typed lines, streamed replies, Ctrl-D), compared with transformers."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import subprocess
import termios
import time
from typing import Any

import pytest

from gateway.cli import main as pollen_main
from tests.gateway.conftest import GatewaySwarm, reference_greedy, reference_tokenizer
from tests.launcher import BIN

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\r")


def pollen(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / "pollen"), *args], capture_output=True, text=True, timeout=timeout_s, env=env)


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    top = pollen("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("gateway", "chat", "generate", "swarm"))
    for command, flags in {
        "gateway": ["--initial-peers", "--model", "--port", "--api-key-file", "--cors-origin", "--max-concurrency"],
        "chat": ["--initial-peers", "--model", "--system", "--temperature", "--max-new-tokens"],
        "generate": ["--initial-peers", "--model", "--chat", "--seed", "--stop"],
        "swarm": ["--initial-peers", "--model", "--json"],
    }.items():
        with pytest.raises(SystemExit) as done:
            pollen_main([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), (command, text)


def test_generate_streams_the_greedy_text(gateway_swarm: GatewaySwarm) -> None:
    tok: Any = reference_tokenizer(gateway_swarm.model_a)
    prompt = "Once upon a time"
    ref = reference_greedy(gateway_swarm.model_a, list(tok(prompt).input_ids), 12)
    run = pollen("generate", "--initial-peers", gateway_swarm.peers, "--model", str(gateway_swarm.model_a), prompt,
                 "--max-new-tokens", "12")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == tok.decode(ref, skip_special_tokens=True) + "\n"


def test_swarm_table_and_json(gateway_swarm: GatewaySwarm) -> None:
    model = str(gateway_swarm.model_a)
    table = pollen("swarm", "--initial-peers", gateway_swarm.peers, "--model", model)
    assert table.returncode == 0, table.stderr
    assert re.search(r"tiny-chat-a\s+HEALTHY\s+4 blocks, 2 online servers", table.stdout), table.stdout
    assert "servers per block: 1111" in table.stdout
    assert len(re.findall(r"127\.0\.0\.1:\d+\s+(0:2|2:4)\s+online", table.stdout)) == 2
    listed = pollen("swarm", "--initial-peers", gateway_swarm.peers, "--json")  # every announced model
    state = json.loads(listed.stdout)
    assert {r["name"] for r in state["model_reports"]} >= {"tiny-chat-a", "tiny-chat-b"}
    down = pollen("swarm", "--initial-peers", "127.0.0.1:9", "--model", model)
    assert down.returncode == 1 and "DhtUnavailable" in down.stderr and "Traceback" not in down.stderr


class Terminal:
    """A process on a pseudo-terminal: what it prints is read back with ANSI escapes removed."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # the terminal's Ctrl-C reaches it as SIGINT
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout_s: float = 120) -> str:
        """Everything printed from the last marker to the next `marker` (exclusive)."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.seen:
            assert time.monotonic() < deadline, f"no {marker!r} on the terminal; it shows:\n{self.seen}"
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the process exited and closed the terminal
                    chunk = b""
                if not chunk:
                    assert marker in self.seen, f"terminal closed before {marker!r}:\n{self.seen}"
                self.seen += ANSI.sub("", chunk.decode(errors="replace"))
        before, _, self.seen = self.seen.partition(marker)
        return before

    def next_char(self, timeout_s: float = 120) -> str:
        """Wait for at least one more character and return the first one not read yet."""
        deadline = time.monotonic() + timeout_s
        while not self.seen:
            assert time.monotonic() < deadline, "the terminal printed nothing more"
            if select.select([self.master], [], [], 0.2)[0]:
                self.seen += ANSI.sub("", os.read(self.master, 4096).decode(errors="replace"))
        return self.seen[0]

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def server_sessions(swarm: GatewaySwarm) -> int:
    """Sessions the first server of model A has opened so far (from its log)."""
    server = next(p for p in swarm.procs.procs if p.name == "tiny-chat-a-0-2")
    return server.log().count("opened: blocks 0:2")


def test_chat_in_a_terminal(gateway_swarm: GatewaySwarm) -> None:
    """Two turns typed at the prompt: each reply streams and equals transformers' greedy continuation of the
    whole conversation; both turns share one server-side session; Ctrl-D quits with exit code 0."""
    tok: Any = reference_tokenizer(gateway_swarm.model_a)
    turns = ["hello world", "what is the answer"]
    messages: list[dict[str, str]] = []
    history: list[int] = []  # the session's tokens, as the chat builds them
    held = ""  # their text
    expected = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        full = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert full.startswith(held)  # the template keeps the earlier turns as they were: one session suffices
        history += tok(full[len(held) :], add_special_tokens=False).input_ids
        new = reference_greedy(gateway_swarm.model_a, history, 8)
        history += new
        held = full + tok.decode(new, skip_special_tokens=False)
        reply = tok.decode(new, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        expected.append(reply)

    sessions_before = server_sessions(gateway_swarm)
    term = Terminal([str(BIN / "pollen"), "chat", "--initial-peers", gateway_swarm.peers,
                     "--model", str(gateway_swarm.model_a), "--greedy", "--max-new-tokens", "8"])  # fmt: skip
    try:
        banner = term.read_until(">>> ")
        assert "pollen chat · tiny-chat-a · 4 blocks on 2 servers" in banner
        for turn, reply in zip(turns, expected):
            term.type(turn + "\n")
            shown = term.read_until(">>> ")
            assert shown == f"{turn}\n{reply}\n\n", shown  # the echo of the typed line, then the reply
        term.type("\x04")  # Ctrl-D at the prompt
        assert term.proc.wait(60) == 0
    finally:
        term.close()
    assert server_sessions(gateway_swarm) == sessions_before + 1


def test_chat_ctrl_c_stops_a_reply_not_the_chat(gateway_swarm: GatewaySwarm) -> None:
    term = Terminal([str(BIN / "pollen"), "chat", "--initial-peers", gateway_swarm.peers,
                     "--model", str(gateway_swarm.model_a), "--greedy", "--max-new-tokens", "240"])  # fmt: skip
    try:
        term.read_until(">>> ")
        term.type("hello world\n")
        term.read_until("hello world\n")
        term.read_until(term.next_char())  # the reply has started streaming
        term.type("\x03")  # Ctrl-C
        assert "[interrupted]" in term.read_until(">>> ")
        term.type("/reset\n")
        assert "(conversation reset)" in term.read_until(">>> ")
        term.type("what is the answer\n")
        assert term.read_until(">>> ").startswith("what is the answer\n")  # the chat goes on
        term.type("\x03")  # Ctrl-C at the prompt quits
        assert term.proc.wait(60) == 0
    finally:
        term.close()
