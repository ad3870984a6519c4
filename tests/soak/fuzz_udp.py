"""Fuzz a dht-node's UDP port with mutated Kademlia datagrams (dht_node/wire.py's format:
`kind(1) | msg_id(20) | msgpack([name, args(, token)])`).

Valid seeds are ping / find_node / find_value / store requests (stores of signed records under the fuzz model,
lookups of keys the swarm really holds, so some replies are big). Mutations: the byte-level ones of mutate.py,
plus msgpack-level ones (an argument of the wrong type or size, wrong arity, unknown rpc name, another kind
byte, deep nesting, oversized datagrams). Replies are matched to cases by msg_id and counted by kind
(RESPONSE, RETRY, none). Our address never answers the node, so it is never proven: every reply must obey the
3x anti-amplification rule, which is checked per reply.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import umsgpack
from kademlia.utils import digest

from dht_node.datagram import AMPLIFICATION_FACTOR
from dht_node.storage import to_wire
from dht_node.wire import REQUEST, RESPONSE, RETRY
from swarm.blocks import block_key
from swarm.identity import Identity
from swarm.records import ServerRecord
from tests.soak.messages import DEAD_ADDRESS, FUZZ_MODEL
from tests.soak.report import FuzzResult

CLIENT_ID = b""  # "answer me but never add me to a routing table" (dht_node.protocol.CLIENT_ID)
KINDS = {REQUEST: "REQUEST", RESPONSE: "RESPONSE", RETRY: "RETRY"}


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: dict[bytes, list[tuple[bytes, int]]] = {}  # msg_id -> [(kind, bytes)]
        self.stray = Counter[str]()  # requests the node sent us (pings to verify a new contact) and garbage

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        kind, msg_id = data[:1], data[1:21]
        if kind == REQUEST:
            self.stray["node's own requests"] += 1
            return
        self.replies.setdefault(msg_id, []).append((kind, len(data)))


class UdpSeeds:
    def __init__(self, rng: random.Random, real_model: str) -> None:
        self.rng = rng
        self.identity = Identity.generate()
        self.keys = [block_key(real_model, b) for b in range(4)] + [block_key(FUZZ_MODEL, 0)]

    def valid(self) -> list[object]:
        rng = self.rng
        node_id = rng.choice([CLIENT_ID, rng.randbytes(20)])
        name = rng.choice(self.keys)
        kind = rng.choice(["ping", "find_node", "find_value", "find_value", "store"])
        if kind == "ping":
            return ["ping", [node_id]]
        if kind in ("find_node", "find_value"):
            return [kind, [node_id, digest(name)]]
        key = block_key(FUZZ_MODEL, 0)
        value = ServerRecord(peer_id=self.identity.peer_id, address=DEAD_ADDRESS, model_id=FUZZ_MODEL, start=0,
                             end=1).encode()  # fmt: skip
        expiration = time.time() + 60
        signature = self.identity.sign(key, self.identity.peer_id, value, expiration)
        record = {self.identity.peer_id: (value, expiration, self.identity.public_key, signature)}
        return ["store", [node_id, digest(key), to_wire(record), key]]  # type: ignore[arg-type]

    def mutate(self, payload: list[object]) -> tuple[str, bytes]:
        """(label, the body after kind+msg_id); the kind byte itself is mutated by the caller."""
        rng = self.rng
        name, args = payload[0], list(payload[1])  # type: ignore[call-overload]
        choice = rng.randrange(10)
        if choice == 0 and args:
            args[rng.randrange(len(args))] = rng.choice(
                [None, True, -1, 2**64 - 1, 1.5, float("nan"), "x" * 300, b"\x00" * 19, b"\x00" * 21, [], {}, [[1]]]
            )
            return "arg", umsgpack.packb([name, args])
        if choice == 1:
            args = args[: rng.randrange(len(args) + 1)] if rng.random() < 0.5 else args + [b"extra"] * 3
            return "arity", umsgpack.packb([name, args])
        if choice == 2:
            return "name", umsgpack.packb([rng.choice(["", "PING", "store_all", "\x00", 5, None]), args])
        if choice == 3:  # a third element that is not a token
            return "token", umsgpack.packb([name, args, rng.choice([b"", b"t" * 16, 7, "tok"])])
        if choice == 4:
            depth = rng.choice([100, 5000])  # deep nesting: a recursive parser must not blow the stack
            return "nesting", b"\x91" * depth + b"\xc0"
        if choice == 5:
            return "oversize", umsgpack.packb([name, args + [rng.randbytes(9000)]])
        if choice == 6:
            return "not-a-list", umsgpack.packb(rng.choice([{"ping": args}, "ping", 42, b"raw"]))
        data = umsgpack.packb([name, args])
        if choice == 7:
            i = rng.randrange(len(data))
            return "bitflip", data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
        if choice == 8:
            return "truncate", data[: rng.randrange(len(data))]
        return "random", rng.randbytes(rng.choice([0, 1, 30, 500]))


async def fuzz_udp(
    host: str, port: int, cases: int, seeds: UdpSeeds, process: str, rate_per_s: float = 2000.0
) -> FuzzResult:
    """Send `cases` mutated datagrams (about `rate_per_s`), then wait for late replies and count them."""
    rng = seeds.rng
    result = FuzzResult("Dht UDP", process)
    loop = asyncio.get_running_loop()
    transport, collector = await loop.create_datagram_endpoint(_Collector, remote_addr=(host, port))
    sent: dict[bytes, tuple[str, int]] = {}  # msg_id -> (label, datagram bytes)
    try:
        batch = max(1, int(rate_per_s / 100))
        for i in range(cases):
            msg_id = rng.randbytes(20)
            valid = seeds.valid()
            roll = rng.random()
            if roll < 0.15:
                label, body = "valid", umsgpack.packb(valid)
            else:
                label, body = seeds.mutate(valid)
            kind = REQUEST
            if rng.random() < 0.1:  # unsolicited replies and retries, or an unknown kind byte
                kind = rng.choice([RESPONSE, RETRY, b"\x03", b"\xff"])
                label += f"+kind{kind[0]}"
            datagram = kind + msg_id + body
            if rng.random() < 0.03:
                datagram = datagram[: rng.randrange(22)]  # shorter than a header
                label += "+short"
            sent[msg_id] = (label, len(datagram))
            transport.sendto(datagram)
            result.cases += 1
            if i % batch == batch - 1:
                await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)  # late replies (a RETRY or a find_value answer may come after a lookup)
    finally:
        transport.close()
    amplified = []
    for msg_id, (label, size) in sent.items():
        replies = collector.replies.pop(msg_id, [])
        if not replies:
            result.statuses["no reply"] += 1
        for kind, reply_size in replies:
            result.statuses[KINDS.get(kind, f"kind {kind!r}")] += 1
            if reply_size > AMPLIFICATION_FACTOR * size:
                amplified.append(f"{label}: {size} B -> {reply_size} B")
    if collector.replies:
        result.statuses["unmatched replies"] += sum(len(v) for v in collector.replies.values())
    for what, n in collector.stray.items():
        result.notes.append(f"{n} {what} (contact checks of forged node ids, bounded)")
    if amplified:
        result.notes.append(f"FAIL: {len(amplified)} replies over {AMPLIFICATION_FACTOR}x the request, "
                            f"e.g. {amplified[:3]}")  # fmt: skip
    else:
        result.notes.append(f"no reply over {AMPLIFICATION_FACTOR}x its request (unproven address)")
    return result
