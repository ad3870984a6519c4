"""--tls-server-name: peers are dialled by the IP address they announce, while a private swarm's certificate may
name a host only ("pollen", no IP SAN). Without the override the name check fails; with it (flag, keyword or
$POLLEN_TLS_SERVER_NAME) the call goes through, and a certificate for another name is still refused."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from swarm.net import (
    TLS_SERVER_NAME_ENV,
    Security,
    add_security_args,
    bind_server,
    create_server,
    open_channel,
    security_from_args,
)
from tests.integration.dht_support import make_tls_files

TIMEOUT_S = 10.0


@pytest_asyncio.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A TLS gRPC server (health service) whose certificate names only the host "pollen"."""
    files = make_tls_files(tmp_path, common_name="pollen", ips=())
    security = Security.from_options(tls_cert=files["cert"], tls_key=files["key"], env={})
    server = create_server(security=security)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = bind_server(server, "127.0.0.1:0", security)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", files
    finally:
        await server.stop(None)


async def _check(address: str, security: Security) -> grpc.StatusCode:
    async with open_channel(address, security=security) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_dialling_by_ip_needs_the_server_name(tls_server: tuple[str, dict[str, str]]) -> None:
    address, files = tls_server
    plain = Security.from_options(tls_ca=files["ca"], env={})
    assert await _check(address, plain) == grpc.StatusCode.UNAVAILABLE  # 127.0.0.1 is not in the certificate
    named = Security.from_options(tls_ca=files["ca"], env={}, tls_server_name="pollen")
    assert await _check(address, named) == grpc.StatusCode.OK
    wrong = Security.from_options(tls_ca=files["ca"], env={}, tls_server_name="other")
    assert await _check(address, wrong) == grpc.StatusCode.UNAVAILABLE
    from_env = Security.from_options(tls_ca=files["ca"], env={TLS_SERVER_NAME_ENV: "pollen"})
    assert from_env.tls is not None and from_env.tls.server_name == "pollen"
    assert await _check(address, from_env) == grpc.StatusCode.OK
    assert "server name pollen" in from_env.describe()


async def test_the_flag_on_every_cli(tls_server: tuple[str, dict[str, str]]) -> None:
    address, files = tls_server
    parser = argparse.ArgumentParser()
    add_security_args(parser)
    args = parser.parse_args(["--tls-ca", files["ca"], "--tls-server-name", "pollen"])
    assert await _check(address, security_from_args(args, env={})) == grpc.StatusCode.OK


def test_bad_server_names_are_clear_errors(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    with pytest.raises(ValueError, match="needs TLS"):
        Security.from_options(env={}, tls_server_name="pollen")
    with pytest.raises(ValueError, match="not a host name"):
        Security.from_options(tls_ca=files["ca"], env={}, tls_server_name="pol len")
    assert Security.from_options(env={TLS_SERVER_NAME_ENV: "pollen"}).tls is None  # the variable alone: no TLS
