"""The local admin endpoint: `pollen.v1.Admin` (Pause, Resume, Status) on a Unix socket only the server's owner
can open, next to the standard health service (SERVING while the endpoint is up: the admin side is always
reachable, whatever the swarm-facing port says) and server reflection, so `grpcurl -plaintext -unix PATH list`
works. It is never served on the swarm's TCP port: who can reach the socket file is who may pause the server.

Who may connect is the file system's business: the socket lives in a directory of its owner's with mode 0700
(created so if missing; an existing one that group or others can enter, or that belongs to someone else, is
refused at start), and the socket file itself is 0600. Without --admin-socket each server takes
`$XDG_RUNTIME_DIR/pollen/shard-<port>.sock` (else `$XDG_CACHE_HOME/pollen/run/shard-<port>.sock`, ~/.cache by
default), logged at start and removed at stop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any, Protocol

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shard_server.lifecycle import Lifecycle, LifecycleHost, Outcome
from shard_server.memory import rss_bytes
from shard_server.startup import ConfigError
from swarm.errors import InvalidRequest, map_errors
from swarm.pb import admin_pb2, admin_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name  # "pollen.v1.Admin"
MAX_GRACE_S = 3600.0  # a pause longer than an hour is a typo, not a plan
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes on Linux, NUL included
OFF = ("", "off", "none")  # --admin-socket values that disable the endpoint


def default_socket_dir() -> Path:
    """Per-user runtime directory ($XDG_RUNTIME_DIR is 0700 and cleared at logout), else the user's cache."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "pollen"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pollen" / "run"


def default_socket_path(port: int) -> Path:
    return default_socket_dir() / f"shard-{port}.sock"


def prepare_socket_path(path: Path) -> None:
    """Make `path` usable for a private socket, or raise ConfigError saying why not: its directory is created
    0700 if missing, must belong to this user and be closed to group and others; a stale socket file left by a
    crashed server is removed, one another process still listens on is not."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(f"admin socket path {path} is {len(os.fsencode(path))} bytes long; Unix sockets allow "
                          f"{MAX_SOCKET_PATH_BYTES}: choose a shorter --admin-socket")  # fmt: skip
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask; make it exact
    except FileExistsError:  # ours from an earlier start, or a sibling server's: checked below either way
        pass
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"admin socket directory {folder} is not a directory")
    if st.st_uid != os.getuid():
        raise ConfigError(f"admin socket directory {folder} belongs to uid {st.st_uid}, not to this user "
                          f"({os.getuid()}): choose a directory of your own with --admin-socket")  # fmt: skip
    if st.st_mode & 0o077:
        raise ConfigError(f"admin socket directory {folder} is open to group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); `chmod 700 {folder}` or choose another "
                          f"--admin-socket")  # fmt: skip
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"admin socket path {path} exists and is not a socket; remove it or choose another")
    if _listening(path):
        raise ConfigError(f"another process already serves the admin socket {path}; give this server its own "
                          "--admin-socket")  # fmt: skip
    path.unlink()  # left behind by a server that did not stop cleanly


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class AdminHost(LifecycleHost, Protocol):
    """What the admin endpoint reads from ShardServer besides the lifecycle's parts."""

    peer_id: str
    model_id: str
    throughput_tps: float
    lifecycle: Lifecycle

    @property
    def address(self) -> str: ...


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, server: AdminHost) -> None:
        self.server = server

    @map_errors
    async def Pause(self, request: admin_pb2.PauseRequest, context: grpc.aio.ServicerContext) -> Any:
        grace: float | None = None
        if request.HasField("grace_s"):
            grace = request.grace_s
            if not (math.isfinite(grace) and 0 <= grace <= MAX_GRACE_S):
                raise InvalidRequest(f"grace_s must be between 0 and {MAX_GRACE_S:.0f} seconds, got {grace}")
        # Shielded: an operator who gives up waiting (Ctrl-C) must not leave the server half paused.
        outcome = await asyncio.shield(asyncio.ensure_future(self.server.lifecycle.pause(grace)))
        return self._status(outcome)

    @map_errors
    async def Resume(self, request: admin_pb2.ResumeRequest, context: grpc.aio.ServicerContext) -> Any:
        outcome = await asyncio.shield(asyncio.ensure_future(self.server.lifecycle.resume()))
        return self._status(outcome)

    @map_errors
    async def Status(self, request: admin_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> Any:
        return self._status(None)

    def _status(self, outcome: Outcome | None) -> admin_pb2.AdminStatus:
        s = self.server
        backend = s.servicer.backend if s.servicer is not None else None
        weights = sum(t.numel() * t.element_size() for t in backend.span.parameters()) if backend is not None else 0
        cuda = s._device.type == "cuda"
        status = admin_pb2.AdminStatus(
            state=s.lifecycle.phase,
            peer_id=s.peer_id,
            model_id=s.model_id,
            address=s.address,
            active_sessions=s.cache.active_sessions,
            rss_bytes=rss_bytes(),
            weights_bytes=weights,
            kv_reserved_bytes=max(0, s.cache.used_bytes),
            device_allocated_bytes=torch.cuda.memory_allocated(s._device) if cuda else 0,
            throughput_tps=s.throughput_tps,
            state_since_s=time.monotonic() - s.lifecycle.state_since,
        )
        if s.blocks is not None:
            status.blocks.CopyFrom(common_pb2.BlockRange(start=s.blocks.start, end=s.blocks.end))
        if outcome is not None:
            status.changed = outcome.changed
            status.message = outcome.message
            status.transition_ms = outcome.transition_ms
            if outcome.drain is not None:
                status.sessions_finished = outcome.drain.finished
                status.sessions_closed = outcome.drain.closed
                status.sessions_gone_ms = outcome.drain.gone_ms
        return status


class AdminEndpoint:
    """The gRPC server on the Unix socket; `start` checks the path first (ConfigError), `stop` removes it."""

    def __init__(self, path: Path, server: AdminHost) -> None:
        self.path = path
        self._server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(server), self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((ADMIN_SERVICE, health_name, reflection.SERVICE_NAME), self._server)
        self._inode = 0

    async def start(self) -> None:
        prepare_socket_path(self.path)
        if not self._server.add_insecure_port(f"unix:{self.path}"):
            raise ConfigError(f"cannot listen on the admin socket {self.path}")
        await self._server.start()
        os.chmod(self.path, 0o600)  # the 0700 directory already keeps others out; the file says so too
        self._inode = os.stat(self.path).st_ino
        for service in ("", ADMIN_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("admin socket %s (`pollen server pause|resume|status --admin-socket %s`)", self.path, self.path)

    async def stop(self) -> None:
        await self._server.stop(grace=0.5)
        try:
            if self._inode and os.stat(self.path).st_ino == self._inode:  # not a successor's socket
                self.path.unlink()
        except FileNotFoundError:
            pass


async def start_admin(option: str, port: int, server: AdminHost) -> AdminEndpoint | None:
    """The endpoint for --admin-socket (`option`): "auto" = the default path for `port`, "" or "off" = none."""
    if option.strip().lower() in OFF:
        return None
    path = default_socket_path(port) if option == "auto" else Path(option).expanduser().absolute()
    endpoint = AdminEndpoint(path, server)
    await endpoint.start()
    return endpoint
