"""Which command-line flags the deploy files pass to which program, and which flags each program has.

The deploy files run four programs: `dht-node`, `shard-server`, `pollen gateway` and deploy/healthcheck.py.
`invocations(tokens)` finds them in a token list (a compose `command`, a Kubernetes `command + args`, a
systemd `ExecStart`, a README line) and returns the `--flags` each is given; a token holding a whole shell
script (`sh -c "..."`) is searched too. `help_flags(argv)` reads a program's `--help` as a user would.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROGRAMS = ("dht-node", "shard-server", "pollen gateway", "healthcheck.py")
HELP_ARGV: dict[str, list[str]] = {
    "dht-node": [str(BIN / "dht-node"), "--help"],
    "shard-server": [str(BIN / "shard-server"), "--help"],
    "pollen gateway": [str(BIN / "pollen"), "gateway", "--help"],
    "healthcheck.py": [sys.executable, str(REPO / "deploy" / "healthcheck.py"), "--help"],
}
SEPARATORS = {";", "&&", "||", "|", "&"}
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
# argparse's option lines: two spaces, then the option strings and metavars, then two spaces and the help
HELP_OPTION_LINE = re.compile(r"^ {2}(-\S.*?)(?: {2,}|$)")


def need(module: str, package: str) -> ModuleType:
    """A validator from PyPI (pyproject's dev extras): a clear failure, not a skip, when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is not installed: pip install {package} (pyproject's dev extras)")


def program_at(tokens: list[str], i: int) -> str | None:
    name = tokens[i].rsplit("/", 1)[-1]
    if name in ("dht-node", "shard-server", "healthcheck.py"):
        return name
    if name == "pollen" and i + 1 < len(tokens) and tokens[i + 1] == "gateway":
        return "pollen gateway"
    return None


def invocations(tokens: list[str]) -> Iterator[tuple[str, set[str]]]:
    """(program, flags) for each program started in `tokens`; flags end at a shell separator."""
    current: tuple[str, set[str]] | None = None
    for i, token in enumerate(tokens):
        if token in SEPARATORS:
            if current is not None:
                yield current
            current = None
            continue
        if any(c.isspace() for c in token):  # a script inside a token, e.g. `sh -c "..."`
            yield from script_invocations(token)
            continue
        program = program_at(tokens, i)
        if program is not None:
            if current is not None:
                yield current
            current = (program, set())
        elif current is not None and token.startswith("--"):
            current[1].add(token.split("=", 1)[0])
    if current is not None:
        yield current


def script_invocations(script: str) -> Iterator[tuple[str, set[str]]]:
    """Invocations in shell text: one logical line (backslash continuations joined) at a time."""
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes in prose: not a command
            continue
        yield from invocations(tokens)


def env_file_flags(text: str) -> set[str]:
    """Flags in the values of an env file's VAR=... lines, commented-out examples included."""
    flags: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^#?\s*[A-Z_]+=(.*)$", line.strip())
        if m:
            flags |= set(FLAG.findall(m.group(1)))
    return flags


def help_flags(program: str) -> tuple[set[str], str]:
    """(long options in `program --help`, "" or why the help could not be read)."""
    try:
        out = subprocess.run(HELP_ARGV[program], capture_output=True, text=True, timeout=120, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return set(), f"{program} --help failed: {e}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return set(), f"{program} --help exited {out.returncode}: {last}"
    flags: set[str] = set()
    for line in out.stdout.splitlines():
        m = HELP_OPTION_LINE.match(line)
        if m:
            flags |= set(FLAG.findall(m.group(1)))
    return flags, ""


def flag_value(argv: list[str], flag: str) -> str:
    """The word after `flag` in an argv list."""
    return argv[argv.index(flag) + 1]


def merge(found: Iterable[tuple[str, set[str]]], into: dict[str, set[str]]) -> None:
    for program, flags in found:
        into.setdefault(program, set()).update(flags)
