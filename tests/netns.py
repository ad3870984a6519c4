"""Two Linux network namespaces joined by a veth pair, and real Pollen processes started inside them.

"pub" (10.A.B.1) plays the public internet; "nat" (10.A.B.2) a volunteer behind NAT: a process there that
binds 127.0.0.1 cannot be dialled from "pub" but can dial out over the veth, which is what a NAT does to
inbound connections. Needs root and iproute2 (`ip`); nothing touches the root namespace's interfaces, and the
namespaces (with the veth) are deleted on close. Names are unique per instance, so parallel runs do not clash.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from tests.launcher import Proc, SwarmProcesses


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetnsPair:
    def __init__(self) -> None:
        token = secrets.token_hex(3)
        self.pub, self.nat = f"pollen-pub-{token}", f"pollen-nat-{token}"
        a, b = 100 + secrets.randbelow(100), secrets.randbelow(250)
        self.pub_ip, self.nat_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        self._veth = (f"plp{token}", f"pln{token}")  # interface names: at most 15 characters
        self._created: list[str] = []

    def create(self) -> NetnsPair:
        for ns in (self.pub, self.nat):
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        vp, vn = self._veth
        _ip("link", "add", vp, "netns", self.pub, "type", "veth", "peer", "name", vn, "netns", self.nat)
        for ns, dev, addr in ((self.pub, vp, self.pub_ip), (self.nat, vn, self.nat_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        return self

    def close(self) -> None:
        for ns in reversed(self._created):  # deleting a namespace deletes its end of the veth (and the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()

    @staticmethod
    def prefix(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


class NetnsProcesses(SwarmProcesses):
    """SwarmProcesses whose processes run inside a namespace and bind a given host (tests.launcher handles
    the ready files, logs and process groups)."""

    def spawn_in(self, ns: str, name: str, argv: list[str], host: str) -> Proc:
        log_path, ready_path = self.workdir / f"{name}.log", self.workdir / f"{name}.ready"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(self.workdir),
               **self.env}  # fmt: skip
        command = [*NetnsPair.prefix(ns), *argv, "--host", host, "--port", "0", "--ready-file", str(ready_path)]
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)  # fmt: skip
        proc = Proc(name, popen, log_path, ready_path)
        self.procs.append(proc)
        return proc

    def run_in(self, ns: str, argv: list[str], timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """A short-lived command in `ns` (a client), output captured."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(self.workdir), **self.env}
        return subprocess.run([*NetnsPair.prefix(ns), *argv], capture_output=True, text=True, timeout=timeout_s,
                              env=env, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
