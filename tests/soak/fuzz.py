"""The fuzz part: mutated messages against every RPC of a shard server and of a dht-node (gRPC), and raw
datagrams against the dht-node's UDP port. RSS of each process is read after a warm-up round (first use of a
code path allocates for good) and again at the end; every process must still be alive and answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from swarm.pb import dht_pb2, shard_pb2
from tests.launcher import Proc
from tests.soak.fuzz_grpc import PushVictim, builders_for, fuzz_method, seeded
from tests.soak.fuzz_udp import UdpSeeds, fuzz_udp
from tests.soak.messages import DhtMessages, ShardMessages, ShardTarget
from tests.soak.mutate import Mutator
from tests.soak.report import MIB, FuzzResult, RssSample, rss_bytes
from tests.soak.swarmkit import answers

SHARD = shard_pb2.DESCRIPTOR.services_by_name["Shard"]
DHT = dht_pb2.DESCRIPTOR.services_by_name["Dht"]
MAX_MESSAGE_BYTES = 256 << 20  # our side must not refuse what we send or what comes back


async def _fuzz_all(
    server: Proc, dht: Proc, target: ShardTarget, cases: int, seed: int, log: Callable[[str], None]
) -> tuple[list[FuzzResult], list[str]]:
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.enable_http_proxy", 0)]  # fmt: skip
    results: list[FuzzResult] = []
    notes: list[str] = []
    async with (
        grpc.aio.insecure_channel(server.address, options=options) as shard_channel,
        grpc.aio.insecure_channel(dht.address, options=options) as dht_channel,
    ):
        victim: PushVictim | None = None
        shard_msgs = ShardMessages(seeded(seed, "shard"), target, lambda: victim.session_id if victim else "none")
        victim = PushVictim(shard_channel, shard_msgs)
        victim.start()
        dht_msgs = DhtMessages(seeded(seed, "dht"), target.model_id)
        others = [shard_msgs.forward()[0], dht_msgs.store()[0], shard_msgs.inference()[0]]
        plan = [(shard_channel, server, m, builders_for(SHARD, shard_msgs.builders())[m.name]) for m in SHARD.methods]
        plan += [(dht_channel, dht, m, builders_for(DHT, dht_msgs.builders())[m.name]) for m in DHT.methods]
        try:
            for channel, proc, method, valid in plan:
                mutator = Mutator(seeded(seed, f"mutate:{method.full_name}"), others)
                result = await fuzz_method(channel, method, valid, mutator, cases, proc.name)
                result.crashed = not proc.alive()
                result.notes.append(f"RSS of {proc.name} afterwards: {rss_bytes(proc.popen.pid) / MIB:.1f} MiB")
                results.append(result)
                log(f"fuzz {result.target}: {result.cases} cases, {dict(result.statuses)}")
                if result.crashed:
                    return results, notes
        finally:
            await victim.stop()
        notes.append(f"Push: a session taking pushes with its token was ended by them {victim.killed} times "
                     f"({victim.opened} opened)")  # fmt: skip
        host, port = dht.address.rsplit(":", 1)
        udp = await fuzz_udp(host, int(port), cases, UdpSeeds(seeded(seed, "udp"), target.model_id), dht.name)
        udp.crashed = not dht.alive()
        results.append(udp)
        log(f"fuzz {udp.target}: {udp.cases} cases, {dict(udp.statuses)}")
    return results, notes


def run_fuzz(
    server: Proc,
    dht: Proc,
    bystanders: list[Proc],
    target: ShardTarget,
    cases: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[list[FuzzResult], list[RssSample], list[str]]:
    """Warm up with a few hundred cases per RPC (another seed), read RSS, fuzz `cases` per RPC, read RSS again."""
    processes = [server, dht, *bystanders]
    asyncio.run(_fuzz_all(server, dht, target, min(300, max(50, cases // 10)), seed + 1, lambda _: None))
    before = {p.name: rss_bytes(p.popen.pid) for p in processes}
    results, notes = asyncio.run(_fuzz_all(server, dht, target, cases, seed, log))
    rss = [RssSample(p.name, before[p.name], rss_bytes(p.popen.pid)) for p in processes]
    for p in processes:
        if not answers(p):
            notes.append(f"FAIL: {p.name} does not answer after the fuzzing")
    return results, rss, notes
