"""Helpers of the in-process DHT tests: a wall clock the test moves, condition waits, and a raw UDP peer whose
`barrier()` proves that a node has handled every datagram sent before it (instead of sleeping and hoping)."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import umsgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kademlia.utils import digest

from dht_node.protocol import CLIENT_ID
from dht_node.wire import REQUEST, RESPONSE
from swarm.blocks import block_key

HANG_S = 120.0  # bounds for a hung test only: never a speed requirement, a loaded machine stays far below


class ManualClock:
    """time.time() plus an offset the test advances: records expire when the test says, not when a busy
    machine happens to get there (pass as `DhtNode(clock=...)`)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = HANG_S, poll_s: float = 0.05
) -> None:
    """Poll `condition` (sync or async) until it holds; fail with `what` only if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting until {what}"
        await asyncio.sleep(poll_s)


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sources: dict[bytes, tuple[str, int]] = {}  # datagram -> the address it came from
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.sources[data] = (addr[0], addr[1])
        self.arrived.set()


class UdpPeer:
    """A raw datagram socket on 127.0.0.1 in the test's event loop (the nodes' loop too)."""

    def __init__(self, transport: asyncio.DatagramTransport, collector: _Collector) -> None:
        self.transport, self._collector = transport, collector

    @classmethod
    async def open(cls, host: str = "127.0.0.1", port: int = 0) -> UdpPeer:
        """A socket on `host` (any of 127.0.0.0/8 on Linux: another source IP for per-IP limits); a `port` of
        a stopped node makes it a black hole where that node was (it counts what arrives, answers nothing)."""
        loop = asyncio.get_running_loop()
        transport, collector = await loop.create_datagram_endpoint(_Collector, local_addr=(host, port))
        return cls(transport, collector)

    @property
    def port(self) -> int:
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def received(self) -> list[bytes]:
        return self._collector.received

    def source_of(self, datagram: bytes) -> tuple[str, int]:
        return self._collector.sources[datagram]

    def send(self, data: bytes, port: int) -> None:
        self.transport.sendto(data, ("127.0.0.1", port))

    async def barrier(self, port: int) -> None:
        """Ping the node at `port` as a client (which it answers but never adds) and wait for the reply: a node
        reads its socket in order, so every datagram sent before has been handled (or dropped by the kernel)."""
        msg_id = os.urandom(20)
        request, reply = REQUEST + msg_id + umsgpack.packb(["ping", [CLIENT_ID]]), RESPONSE + msg_id
        deadline = time.monotonic() + HANG_S
        while not any(d.startswith(reply) for d in self.received):
            assert time.monotonic() < deadline, f"node on port {port} never answered the barrier ping"
            self._collector.arrived.clear()
            self.send(request, port)  # again: the kernel may have dropped it behind a flood
            try:
                await asyncio.wait_for(self._collector.arrived.wait(), 1.0)
            except TimeoutError:
                pass

    def close(self) -> None:
        self.transport.close()


# ---- what a public UDP port receives ----


def garbage_datagrams(rng: random.Random, node_id: bytes) -> list[bytes]:
    """Malformed requests of every shape, oversize and recursive payloads, and random bytes."""

    def request(payload: object) -> bytes:
        return b"\x00" + rng.randbytes(20) + umsgpack.packb(payload)

    shapes: list[object] = [
        [],
        ["ping"],
        ["ping", []],
        ["ping", [b"short"]],
        ["ping", "not a list"],
        ["ping", [node_id]],  # our own id: a reflection, not a contact
        [b"ping", [b"x" * 20]],
        ["store", [1, 2, 3]],
        ["store", [b"x" * 20, b"k" * 20, {"a": "not an entry"}]],
        ["store", [b"x" * 20, b"k" * 20, {"a": [b"v", 1e300]}]],
        ["store", [b"x" * 20, b"k" * 20, {f"s{i}": [b"v", time.time() + 9] for i in range(500)}]],
        ["store", [b"x" * 20, b"short", {}]],
        ["find_node", [None, None]],
        ["find_value", [b"x" * 20, 5]],
        ["find_value", [b"x" * 20, b"k" * 20, "extra"]],
        ["stun", []],
        ["__init__", []],
        ["nonexistent", [1]],
        {"a": 1},
        [1.5, [None]],
    ]
    out = [request(shape) for shape in shapes]
    # arrays nested deeper than the recursion limit of the (recursive) unpacker
    out.append(b"\x00" + rng.randbytes(20) + b"\x91" * 3000 + b"\x90")
    out.append(b"\x00" + rng.randbytes(20) + umsgpack.packb(["store", [b"x" * 20, b"k" * 20, b"v" * 9000]]))
    out.append(b"\x01" + rng.randbytes(20) + umsgpack.packb([True, None]))  # reply to nothing
    out += [b"\x00" + rng.randbytes(20) + rng.randbytes(rng.randint(0, 300)) for _ in range(150)]
    out += [rng.randbytes(rng.randint(0, 1500)) for _ in range(150)]
    return out


def fuzz_datagrams(rng: random.Random, count: int, model: str) -> list[bytes]:
    """Garbage of every kind a public port sees: random bytes, bad msgpack, wrong rpc shapes and types,
    oversized packets, forged and unsigned stores, and a store flood."""
    junk: list[Any] = [None, True, 1, -1, 2**63, 1.5, float("nan"), "", "x" * 300, b"", b"\x00" * 20, [], {}, [[]],
                       {"a": [b"v", 1e300]}, [b"k" * 20] * 300]  # fmt: skip
    names = ["ping", "store", "find_node", "find_value", "stun", "nope", b"store", 7]
    out: list[bytes] = []
    for i in range(count):
        kind = i % 6
        msg_id = rng.randbytes(20)
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif kind == 1:
            out.append(b"\x00" + msg_id + rng.randbytes(rng.randint(1, 100)))
        elif kind == 2:
            args = [rng.choice(junk) for _ in range(rng.randint(0, 5))]
            out.append(b"\x00" + msg_id + umsgpack.packb([rng.choice(names), args]))
        elif kind == 3:
            out.append(rng.choice([b"\x00", b"\x01"]) + msg_id + rng.randbytes(rng.choice([9000, 30000, 60000])))
        elif kind == 4:  # stores that parse but must be refused: unsigned, wrong key name, bad signature
            name = block_key(model, rng.randint(0, 9))
            entry = [b"{}", time.time() + 60, rng.randbytes(32), rng.randbytes(64)]
            subkey = rng.randbytes(20).hex()
            key = digest(name) if rng.random() < 0.7 else rng.randbytes(20)
            out.append(b"\x00" + msg_id + umsgpack.packb(["store", [rng.randbytes(20), key, {subkey: entry}, name]]))
        else:  # a reply nobody asked for
            out.append(b"\x01" + msg_id + umsgpack.packb(rng.choice(junk)))
    return out


# ---- TLS material for tests: a CA and a server certificate it signed ----


def make_tls_files(
    directory: Path, common_name: str = "pollen-test", ips: tuple[str, ...] = ("127.0.0.1",)
) -> dict[str, str]:
    """Write ca.pem, server.pem and server.key (EC P-256) into `directory`; the server certificate names
    `common_name` (DNS) and `ips` (IP SANs), so a client dialling 127.0.0.1 verifies it. Returns the paths."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {name: str(path) for name, path in paths.items()}
