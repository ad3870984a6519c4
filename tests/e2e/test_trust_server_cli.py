"""`shard-server --swarm-key FILE --tls-cert --tls-key --tls-ca` (and $POLLEN_SWARM_KEY) as processes, next to a
dht-node started the same way: both servers announce into the keyed TLS swarm (so their own DHT calls carry the
key and verify the dht-node's certificate), serve Info to a member, refuse a caller without the key
(UNAUTHENTICATED) and leave the health service open for orchestrators' probes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swarm.auth import SWARM_KEY_ENV, SwarmKey
from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.model_files import default_model_id
from swarm.net import Security, TlsFiles, open_channel
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import decode_server_records
from tests.integration.dht_support import make_tls_files
from tests.launcher import Proc, SwarmProcesses

pytestmark = pytest.mark.e2e


@dataclass
class Private:
    dht: Proc
    servers: list[Proc]
    member: Security  # the key and the CA
    model_id: str


@pytest.fixture(scope="module")
def private(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    folder = tmp_path_factory.mktemp("private")
    key = folder / "swarm.key"
    SwarmKey.generate().write(key)
    tls = make_tls_files(folder)
    tls_flags = ("--tls-cert", tls["cert"], "--tls-key", tls["key"], "--tls-ca", tls["ca"])
    with SwarmProcesses() as procs:
        try:
            dht = procs.start_dht("dht0", None, "--swarm-key", str(key), *tls_flags)
            first = procs.start_server(tiny_llama, "0:2", [dht.address], "--swarm-key", str(key), *tls_flags,
                                       "--throughput", "1", "--network-mbps", "1000", wait=False)  # fmt: skip
            procs.env[SWARM_KEY_ENV] = str(key)  # the second server finds the key in the environment
            second = procs.start_server(tiny_llama, "2:4", [dht.address], *tls_flags, "--throughput", "1",
                                        "--network-mbps", "1000", wait=False)  # fmt: skip
            for server in (first, second):
                procs.wait_ready(server)
            member = Security.from_options(str(key), tls_ca=tls["ca"], env={})
            yield Private(dht, [first, second], member, default_model_id(tiny_llama))
        except BaseException:
            print(procs.logs())
            raise


async def info(address: str, security: Security) -> shard_pb2.InfoResponse:
    async with open_channel(address, security=security) as channel:
        return await asyncio.wait_for(shard_pb2_grpc.ShardStub(channel).Info(shard_pb2.InfoRequest()), 30)


async def test_keyed_tls_servers_announce_serve_members_and_refuse_strangers(private: Private) -> None:
    client = DhtClient([private.dht.address], security=private.member)
    try:
        keys = [block_key(private.model_id, b) for b in range(4)]
        records = await client.batch_get(keys)
        announced = {r.address for key, entries in zip(keys, records, strict=True)
                     for r in decode_server_records(key, entries).values()}  # fmt: skip
    finally:
        await client.close()
    assert announced == {s.address for s in private.servers}
    stranger = Security(tls=TlsFiles(ca=private.member.tls.ca if private.member.tls else None))
    for server in private.servers:
        assert (await info(server.address, private.member)).blocks.end in (2, 4)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await info(server.address, stranger)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with open_channel(server.address, security=stranger) as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert "swarm key" in server.log() and "TLS" in server.log()
