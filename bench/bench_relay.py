"""What the relay costs per token on loopback: the same 2-server chain reached directly vs through a relay.

Two swarms of real processes, alike but for one flag: in "direct" the shard servers are dialled at their own
ports (`--use-relay never`); in "relay" both attach to their dht-node's relay (`--relay` on the dht-node,
`--use-relay always` on the servers), so every client step and every server-to-server push crosses the relay
(two extra loopback hops and one gRPC stream per relayed server). Each round generates with both, in a rotating
order; the tokens must equal local greedy. Reports median ms/token (wall) and CPU ms/token of all processes
of the setup (client, servers, and the dht-node, where the relay runs). Then bulk throughput (a long prefill's
hidden states): MiB/s echoed through an in-process relay and agent vs a plain loopback socket.

    .venv/bin/python bench/bench_relay.py                     # ~2 min on 2 cores
    .venv/bin/python bench/bench_relay.py --tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    SMALL,
    code_version,
    cpu_seconds,
    greedy_prompt,
    load_average,
    load_local,
    markdown,
    median,
    num_blocks,
    resolve_model,
    split_ranges,
    swarm_generate,
    swarm_processes,
    use_threads,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMALL, help="model folder, or `small` (Petals' small random Llama)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--bulk-mib", type=int, default=32, help="MiB each way for the bulk throughput line")
    args = p.parse_args()
    use_threads(args.threads)
    from client_sdk import SwarmClient

    scratch = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    model = resolve_model(args.model, scratch)
    lm = load_local(model)
    prompt, expected = greedy_prompt(lm, args.tokens)
    flags = ("--num-threads", str(args.threads), "--throughput", "100", "--network-mbps", "1000")
    setups = {"direct": ((), ("--use-relay", "never")), "relay": (("--relay",), ("--use-relay", "always"))}
    clients, pids, wall, cpu = {}, {}, {n: [] for n in setups}, {n: [] for n in setups}
    with swarm_processes(args.threads) as procs:
        try:
            for name, (dht_flags, server_flags) in setups.items():
                dht = procs.start_dht(f"dht-{name}", None, *dht_flags)
                servers = [procs.start_server(model, r, [dht.address], *flags, *server_flags, name=f"{name}-{i}")
                           for i, r in enumerate(split_ranges(num_blocks(model), 2))]  # fmt: skip
                if name == "relay" and not all("attached to relay" in s.log() for s in servers):
                    raise SystemExit(f"relay setup: a server did not attach to the relay\n{procs.logs()}")
                clients[name] = SwarmClient(initial_peers=[dht.address], model=str(model))
                pids[name] = [os.getpid(), dht.popen.pid] + [s.popen.pid for s in servers]
            names = list(setups)
            for round_ in range(args.rounds + 1):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    cpu0 = [cpu_seconds(pid) for pid in pids[name]]
                    t0 = time.perf_counter()
                    tokens = swarm_generate(clients[name], prompt, args.tokens)
                    elapsed = time.perf_counter() - t0
                    spent = sum(cpu_seconds(pid) - c for pid, c in zip(pids[name], cpu0, strict=True))
                    if tokens != expected:
                        raise AssertionError(f"{name}: tokens differ from local greedy: {tokens} vs {expected}")
                    if round_:
                        wall[name].append(1000 * elapsed / args.tokens)
                        cpu[name].append(1000 * spent / args.tokens)
        finally:
            for client in clients.values():
                client.close()
    rows = [(n, f"{median(wall[n]):.2f}", f"{median(cpu[n]):.2f}", len(wall[n])) for n in setups]
    rows.append(("relay - direct", f"{median(wall['relay']) - median(wall['direct']):+.2f}",
                 f"{median(cpu['relay']) - median(cpu['direct']):+.2f}", ""))  # fmt: skip
    print(f"\n2-server chain, {args.tokens} tokens, model {model.name}, {args.threads} thread(s), push on; "
          f"{code_version()}; load {load_average()}")  # fmt: skip
    print(markdown(["setup", "ms/token (median)", "CPU ms/token, all processes", "rounds"], rows))
    direct_mibs, relay_mibs = asyncio.run(bulk_mib_per_s(args.bulk_mib))
    print(f"\nbulk: {args.bulk_mib} MiB each way on one connection, echoed (median of 3)")
    print(
        markdown(
            ["path", "MiB/s"], [("loopback socket", f"{direct_mibs:.0f}"), ("through the relay", f"{relay_mibs:.0f}")]
        )
    )


async def bulk_mib_per_s(mib: int) -> tuple[float, float]:
    """MiB/s of an echo round trip: straight to an echo server, and through a RelayService + RelayAgent."""
    from swarm.net import bind_server, create_server, format_address
    from swarm.relay import RelayAgent, RelayLimits, RelayService

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def roundtrip(address: str, payload: bytes) -> float:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        t0 = time.perf_counter()
        sender = asyncio.create_task(_send(writer, payload))
        await reader.readexactly(len(payload))
        await sender
        writer.close()
        return len(payload) / 2**20 / (time.perf_counter() - t0)

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_address = format_address("127.0.0.1", target.sockets[0].getsockname()[1])
    service = RelayService(RelayLimits(max_bytes_per_s=0), "127.0.0.1", "127.0.0.1")
    server = create_server()
    service.add_to_server(server)
    relay_address = format_address("127.0.0.1", bind_server(server, "127.0.0.1:0"))
    await server.start()

    async def candidates() -> list[str]:
        return [relay_address]

    agent = RelayAgent(echo_address, candidates)
    endpoint = await agent.attach()
    assert endpoint is not None
    runner = asyncio.create_task(agent.run())
    payload = os.urandom(mib << 20)
    try:
        direct = [await roundtrip(echo_address, payload) for _ in range(3)]
        relayed = [await roundtrip(endpoint.address, payload) for _ in range(3)]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await server.stop(0)
        target.close()
    return median(direct), median(relayed)


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(payload)
    await writer.drain()


if __name__ == "__main__":
    main()
