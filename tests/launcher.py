"""Start real `dht-node` and `shard-server` processes on loopback for tests, benchmarks and the demo.

Each process gets `--host 127.0.0.1 --port 0 --ready-file F`, logs to a file (not a pipe), and runs in its
own process group. `wait_ready` polls the ready file and `proc.poll()` so a crash fails fast with the log
printed. `close()` (also on `__exit__` and at interpreter exit) SIGTERMs then SIGKILLs every group.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ready_path: Path
    address: str = ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class SwarmProcesses:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pollen-swarm-")))
    keep_logs: bool = False  # keep `workdir` (logs, ready files) after close(), e.g. for the demo
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.close)

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        ready_path = self.workdir / f"{name}.ready"
        ready_path.unlink(missing_ok=True)
        # XDG_CACHE_HOME: servers cache throughput measurements there; keep tests out of the user's home.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(self.workdir),
               **self.env}  # fmt: skip
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv + ["--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: killed as a whole in close()
            )
        proc = Proc(name, popen, log_path, ready_path)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.ready_path.exists():
                text = proc.ready_path.read_text().strip()
                if text:
                    proc.address = text.split()[0]
                    return proc.address
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; log:\n{proc.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"{proc.name} not ready after {timeout_s} s; log:\n{proc.log()}")

    def start_dht(self, name: str = "dht0", initial_peers: list[str] | None = None, *extra: str) -> Proc:
        argv = [str(BIN / "dht-node")]
        argv += ["--initial-peers", ",".join(initial_peers)] if initial_peers else ["--bootstrap"]
        proc = self._spawn(name, argv + list(extra))
        self.wait_ready(proc)
        return proc

    def start_server(
        self,
        model: str | Path,
        blocks: str,
        initial_peers: list[str],
        *extra: str,
        name: str | None = None,
        wait: bool = True,
    ) -> Proc:
        name = name or f"server-{blocks.replace(':', '-')}-{len(self.procs)}"
        argv = [
            str(BIN / "shard-server"),
            "--model",
            str(model),
            "--blocks",
            blocks,
            "--initial-peers",
            ",".join(initial_peers),
            *extra,
        ]
        proc = self._spawn(name, argv)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_servers(self, model: str | Path, spans: Sequence[str], peers: list[str], *extra: str) -> list[Proc]:
        """One server per span (e.g. ["0:2", "0:2", "2:4"]), started concurrently, then each waited for."""
        servers = [self.start_server(model, blocks, peers, *extra, wait=False) for blocks in spans]
        for server in servers:
            self.wait_ready(server)
        return servers

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Signal the process and wait for it; SIGKILL its group if it does not exit in time."""
        if proc.alive():
            try:
                os.killpg(proc.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        return proc.popen.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)  # leave nothing behind, even forked children
            except (ProcessLookupError, PermissionError):
                pass
            if proc.popen.poll() is None:
                proc.popen.wait()
        if not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()}" for p in self.procs)

    def __enter__(self) -> SwarmProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
