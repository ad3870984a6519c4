"""What a private swarm costs on loopback: the swarm key's per-call proofs and TLS vs plaintext gRPC.

Four standalone shard-server processes (tiny random Llama, blocks 0:4, one torch thread) differ only in their
security flags: none, `--swarm-key`, `--tls-cert/--tls-key`, both. For each, this process drives what a client
does for a 1-server generation: one InferenceStep stream, an 8-token prefill, then decode steps of one token
(each waits for its reply), and reports ms per token. A stream's proof is checked once, at the call, so the key
should cost nothing per token there; every Push (one per token per hop in a chain) is a unary call with its own
proof, so unary calls/s (Info) are measured too. Rounds rotate the order; medians of the rounds.

    .venv/bin/python bench/bench_security.py                # ~1 min
    .venv/bin/python bench/bench_security.py --tokens 50 --rounds 3 --quick
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import code_version, load_average, markdown, median, use_threads  # noqa: E402

HIDDEN = 64


def channel(address: str, security: Any) -> Any:
    """swarm.net.open_channel's channel (TLS and swarm-key proofs on every kind of call)."""
    from swarm.net import open_channel

    return open_channel(address, security=security)


async def decode_ms_per_token(address: str, security: Any, tokens: int) -> float:
    import torch

    from swarm.pb import common_pb2, shard_pb2, shard_pb2_grpc
    from swarm.tensors import to_proto

    async with channel(address, security) as ch:
        call = shard_pb2_grpc.ShardStub(ch).InferenceStep()
        opened = shard_pb2.InferenceOpen(model_id="tiny", blocks=common_pb2.BlockRange(start=0, end=4),
                                         max_length=tokens + 8, session_id=uuid.uuid4().hex)  # fmt: skip
        await call.write(shard_pb2.InferenceRequest(open=opened))
        await call.read()

        async def step(position: int, n: int) -> None:
            hidden = to_proto(torch.randn(1, n, HIDDEN))
            msg = shard_pb2.InferenceStepInput(step_id=uuid.uuid4().hex, position=position, hidden=hidden)
            await call.write(shard_pb2.InferenceRequest(step=msg))
            reply = await call.read()
            assert reply.HasField("step"), reply

        await step(0, 8)  # the prefill
        t0 = time.perf_counter()
        for i in range(tokens):
            await step(8 + i, 1)
        elapsed = time.perf_counter() - t0
        await call.done_writing()
        await call.code()
    return 1000 * elapsed / tokens


async def unary_calls_per_s(address: str, security: Any, calls: int) -> float:
    from swarm.pb import shard_pb2, shard_pb2_grpc

    async with channel(address, security) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        await stub.Info(shard_pb2.InfoRequest())
        t0 = time.perf_counter()
        for _ in range(calls):
            await stub.Info(shard_pb2.InfoRequest())
        return calls / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200, help="decode steps per measurement")
    p.add_argument("--calls", type=int, default=300, help="Info calls per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="50 tokens, 100 calls, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.calls, args.rounds = 50, 100, 2
    use_threads(1)

    from swarm.auth import SwarmKey
    from swarm.net import Security, TlsFiles
    from tests.integration.dht_support import make_tls_files
    from tests.launcher import SwarmProcesses
    from tests.models import make_tiny_llama

    scratch = Path(tempfile.mkdtemp(prefix="bench-security-"))
    model = make_tiny_llama(scratch / "tiny")
    key_file = scratch / "swarm.key"
    SwarmKey.generate().write(key_file)
    tls = make_tls_files(scratch)
    key_flags = ["--swarm-key", str(key_file)]
    tls_flags = ["--tls-cert", tls["cert"], "--tls-key", tls["key"], "--tls-ca", tls["ca"]]
    key = SwarmKey.from_file(key_file)
    setups = {
        "plaintext": ([], Security()),
        "swarm key": (key_flags, Security(key)),
        "TLS": (tls_flags, Security(tls=TlsFiles(ca=tls["ca"]))),
        "swarm key + TLS": (key_flags + tls_flags, Security(key, TlsFiles(ca=tls["ca"]))),
    }
    ms: dict[str, list[float]] = {name: [] for name in setups}
    cps: dict[str, list[float]] = {name: [] for name in setups}
    print(f"code: {code_version()}; load average before: {load_average()}")
    with SwarmProcesses() as procs:
        common = ["--throughput", "100", "--network-mbps", "1000", "--num-threads", "1", "--model-id", "tiny"]
        servers = {name: procs.start_server(model, "0:4", [], *common, *flags, name=name.replace(" ", ""),
                                            wait=False) for name, (flags, _) in setups.items()}  # fmt: skip
        for server in servers.values():
            procs.wait_ready(server)
        names = list(setups)
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in names[r % len(names) :] + names[: r % len(names)]:
                security = setups[name][1]
                t = asyncio.run(decode_ms_per_token(servers[name].address, security, args.tokens))
                c = asyncio.run(unary_calls_per_s(servers[name].address, security, args.calls))
                if r:
                    ms[name].append(t)
                    cps[name].append(c)
    base_ms, base_cps = median(ms["plaintext"]), median(cps["plaintext"])
    rows = []
    for name in setups:
        m, c = median(ms[name]), median(cps[name])
        rows.append((name, f"{m:.3f}", f"{m - base_ms:+.3f}", f"{min(ms[name]):.3f}", f"{c:.0f}",
                     f"{1000 / c - 1000 / base_cps:+.3f}"))  # fmt: skip
    print(f"\n1-server decode (tiny Llama, blocks 0:4, loopback), {args.tokens} tokens x {args.rounds} rounds\n")
    print(markdown(["setup", "ms/token", "vs plaintext", "best ms/token", "unary calls/s", "ms/call vs plaintext"],
                   rows))  # fmt: skip
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
