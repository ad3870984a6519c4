"""The shard server's admin endpoint in process: who may use the socket (file modes, refused directories, stale
and live sockets), bad and ill-timed admin requests, and what pause/resume change on the swarm-facing port
(new sessions refused as paused, open ones closed, Info's state, the weights dropped and back)."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shard_server import ShardServer, ShardServerConfig
from shard_server.admin import default_socket_path, prepare_socket_path
from shard_server.startup import ConfigError
from swarm.blocks import BlockRange
from swarm.pb import admin_pb2, admin_pb2_grpc, common_pb2, shard_pb2, shard_pb2_grpc
from swarm.records import ServerState
from swarm.tensors import to_proto
from tests.servers import serve, wait_until

TIMEOUT_S = 30.0
POLLEN = str(Path(sys.executable).parent / "pollen")


# ---- the socket path ----------------------------------------------------------------------------------------


def private_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def test_missing_directory_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "shard.sock"
    prepare_socket_path(path)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_directory_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    folder = private_dir(tmp_path)
    os.chmod(folder, mode)
    with pytest.raises(ConfigError, match=f"open to group or others \\(mode {mode:04o}\\).*chmod 700"):
        prepare_socket_path(folder / "shard.sock")


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("only root can give a directory away")
    folder = private_dir(tmp_path)
    os.chown(folder, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        prepare_socket_path(folder / "shard.sock")


def test_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = private_dir(tmp_path) / "shard.sock"
    path.write_text("mine")
    with pytest.raises(ConfigError, match="not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "mine"


def test_too_long_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unix sockets allow 107"):
        prepare_socket_path(private_dir(tmp_path) / ("x" * 120 + ".sock"))


def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = private_dir(tmp_path) / "shard.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ConfigError, match="another process already serves"):
            prepare_socket_path(path)
    assert path.exists()  # closed without unlinking: what a crashed server leaves behind
    prepare_socket_path(path)
    assert not path.exists()


def test_default_path_is_per_port_in_the_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path(31330) == tmp_path / "pollen" / "shard-31330.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_socket_path(31330) == tmp_path / "cache" / "pollen" / "run" / "shard-31330.sock"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_socket_path(31330) == Path.home() / ".cache" / "pollen" / "run" / "shard-31330.sock"


# ---- a running server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin") / "private" / "shard.sock"


@pytest_asyncio.fixture(scope="module")
async def server(tiny_llama: Path, socket_path: Path) -> AsyncIterator[ShardServer]:
    config = ShardServerConfig(
        model=str(tiny_llama), blocks=BlockRange(0, 4), model_id="tiny", throughput_tps=100.0,
        cache_tokens=4096, admin_socket=str(socket_path), drain_timeout_s=0.5,
    )  # fmt: skip
    async for srv in serve(config):
        yield srv
    assert not socket_path.exists(), "the admin socket must be removed at stop"


@pytest_asyncio.fixture(scope="module")
async def admin(server: ShardServer, socket_path: Path) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        yield admin_pb2_grpc.AdminStub(channel)


@pytest_asyncio.fixture(scope="module")
async def shard(server: ShardServer) -> AsyncIterator[shard_pb2_grpc.ShardStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield shard_pb2_grpc.ShardStub(channel)


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    return int(reply.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def expect_error(coro: object, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(coro, TIMEOUT_S)  # type: ignore[arg-type]
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for word in words:
        assert word in details, details


async def open_session(shard: shard_pb2_grpc.ShardStub) -> grpc.aio.StreamStreamCall:
    """An InferenceStep stream with one step done (so the session holds KV cache)."""
    call = shard.InferenceStep()
    msg = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=0, end=4), max_length=16,
                                  session_id=uuid.uuid4().hex, batch_size=1)  # fmt: skip
    await call.write(shard_pb2.InferenceRequest(open=msg))
    first = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert first.WhichOneof("kind") == "opened", first
    step = shard_pb2.InferenceStepInput(step_id="s0", position=0, hidden=to_proto(torch.randn(1, 3, 64)))
    await call.write(shard_pb2.InferenceRequest(step=step))
    assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).step.position == 3
    return call


async def test_socket_is_private(server: ShardServer, socket_path: Path) -> None:
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)


async def test_socket_serves_health_and_reflection(server: ShardServer, socket_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        assert await health(channel, "pollen.v1.Admin") == SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for reply in replies for s in reply.list_services_response.service]
    assert "pollen.v1.Admin" in names and "grpc.health.v1.Health" in names
    async with grpc.aio.insecure_channel(server.address) as channel:  # the swarm's port has no Admin service
        await expect_error(
            channel.unary_unary("/pollen.v1.Admin/Pause")(b"", timeout=TIMEOUT_S), grpc.StatusCode.UNIMPLEMENTED
        )


async def test_status_describes_the_server(admin: admin_pb2_grpc.AdminStub, server: ShardServer) -> None:
    status = await admin.Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)
    assert (status.state, status.peer_id, status.model_id) == ("online", server.peer_id, "tiny")
    assert (status.blocks.start, status.blocks.end, status.address) == (0, 4, server.address)
    assert status.weights_bytes == server.memory_report["weights_bytes"] > 0
    assert status.throughput_tps == 100.0 and status.rss_bytes > 0


@pytest.mark.parametrize("grace", [-1.0, math.nan, math.inf, 1e9])
async def test_bad_grace_is_refused(admin: admin_pb2_grpc.AdminStub, server: ShardServer, grace: float) -> None:
    await expect_error(admin.Pause(admin_pb2.PauseRequest(grace_s=grace)), grpc.StatusCode.INVALID_ARGUMENT, "grace_s")
    assert server.state == ServerState.ONLINE


async def test_resume_when_online_is_a_no_op(admin: admin_pb2_grpc.AdminStub, server: ShardServer) -> None:
    status = await admin.Resume(admin_pb2.ResumeRequest(), timeout=TIMEOUT_S)
    assert (status.changed, status.state) == (False, "online")
    assert "already online" in status.message


async def test_pause_is_refused_during_a_move_or_start(admin: admin_pb2_grpc.AdminStub, server: ShardServer) -> None:
    server.lifecycle.busy = "moving"
    try:
        await expect_error(admin.Pause(admin_pb2.PauseRequest()), grpc.StatusCode.FAILED_PRECONDITION, "moving")
    finally:
        server.lifecycle.busy = ""
    server.state = ServerState.JOINING
    try:
        await expect_error(admin.Pause(admin_pb2.PauseRequest()), grpc.StatusCode.FAILED_PRECONDITION, "joining")
    finally:
        server.state = ServerState.ONLINE
    assert server.servicer is not None and server.servicer.backend is not None


async def test_pause_closes_sessions_refuses_new_ones_and_resume_serves_again(
    admin: admin_pb2_grpc.AdminStub, shard: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    call = await open_session(shard)
    paused = await admin.Pause(admin_pb2.PauseRequest(grace_s=0.0), timeout=TIMEOUT_S)
    assert (paused.changed, paused.state, paused.sessions_closed, paused.sessions_finished) == (True, "paused", 1, 0)
    assert paused.weights_bytes == 0 and paused.kv_reserved_bytes == 0 and paused.active_sessions == 0
    assert paused.peer_id == server.peer_id
    # The open session's client learns why (NOT_FOUND: replay elsewhere), a new one is sent elsewhere.
    assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.NOT_FOUND
    assert "paused" in (await call.details() or "")
    await expect_error(open_session(shard), grpc.StatusCode.UNAVAILABLE, "paused")
    info = await shard.Info(shard_pb2.InfoRequest(), timeout=TIMEOUT_S)
    assert (info.state, info.peer_id) == ("paused", server.peer_id)
    async with grpc.aio.insecure_channel(server.address) as channel:
        assert await health(channel) == NOT_SERVING
    again = await admin.Pause(admin_pb2.PauseRequest(), timeout=TIMEOUT_S)
    assert (again.changed, again.state) == (False, "paused") and "already paused" in again.message

    resumed = await admin.Resume(admin_pb2.ResumeRequest(), timeout=TIMEOUT_S)
    assert (resumed.changed, resumed.state, resumed.peer_id) == (True, "online", server.peer_id)
    assert resumed.weights_bytes == server.memory_report["weights_bytes"]
    assert resumed.throughput_tps == 100.0  # not re-measured
    info = await shard.Info(shard_pb2.InfoRequest(), timeout=TIMEOUT_S)
    assert info.state == "online"
    async with grpc.aio.insecure_channel(server.address) as channel:
        assert await health(channel) == SERVING
    call = await open_session(shard)
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.OK


async def test_pause_lets_a_session_finish_within_the_grace(
    admin: admin_pb2_grpc.AdminStub, shard: shard_pb2_grpc.ShardStub, server: ShardServer
) -> None:
    call = await open_session(shard)
    pausing = asyncio.ensure_future(admin.Pause(admin_pb2.PauseRequest(grace_s=60.0), timeout=TIMEOUT_S * 3))
    await wait_until(lambda: server.lifecycle.busy == "pausing", "the pause to start")
    await expect_error(admin.Pause(admin_pb2.PauseRequest()), grpc.StatusCode.FAILED_PRECONDITION, "pausing")
    await expect_error(admin.Resume(admin_pb2.ResumeRequest()), grpc.StatusCode.FAILED_PRECONDITION, "pausing")
    assert (await admin.Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)).state == "pausing"
    await call.done_writing()  # the client finishes on its own
    assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.OK
    paused = await pausing
    assert (paused.state, paused.sessions_finished, paused.sessions_closed) == ("paused", 1, 0)
    assert (await admin.Resume(admin_pb2.ResumeRequest(), timeout=TIMEOUT_S)).state == "online"


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        POLLEN, "server", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_exit_codes(server: ShardServer, socket_path: Path, tmp_path: Path) -> None:
    code, out, _ = await cli("status", "--admin-socket", str(socket_path))
    assert code == 0 and "online" in out and server.peer_id in out
    server.lifecycle.busy = "moving"
    try:
        code, _, err = await cli("pause", "--admin-socket", str(socket_path))
    finally:
        server.lifecycle.busy = ""
    assert code == 1 and "FAILED_PRECONDITION" in err and "moving" in err
    code, _, err = await cli("status", "--admin-socket", str(tmp_path / "nothing.sock"))
    assert code == 2 and "no admin socket" in err
    stale = private_dir(tmp_path) / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening: nobody answers
    code, _, err = await cli("status", "--admin-socket", str(stale))
    assert code == 2 and "no shard-server answers" in err
    code, _, err = await cli("pause", "--admin-socket", str(socket_path), "--grace", "-3")
    assert code == 2 and "--grace" in err
    code, _, err = await cli("frobnicate", "--admin-socket", str(socket_path))
    assert code == 2
