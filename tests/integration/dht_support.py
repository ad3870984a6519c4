"""Helpers of the in-process DHT tests: a wall clock the test moves, condition waits, and a raw UDP peer whose
`barrier()` proves that a node has handled every datagram sent before it (instead of sleeping and hoping)."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import umsgpack

from dht_node.protocol import CLIENT_ID, REQUEST, RESPONSE

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
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.arrived.set()


class UdpPeer:
    """A raw datagram socket on 127.0.0.1 in the test's event loop (the nodes' loop too)."""

    def __init__(self, transport: asyncio.DatagramTransport, collector: _Collector) -> None:
        self.transport, self._collector = transport, collector

    @classmethod
    async def open(cls) -> UdpPeer:
        loop = asyncio.get_running_loop()
        transport, collector = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
        return cls(transport, collector)

    @property
    def port(self) -> int:
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def received(self) -> list[bytes]:
        return self._collector.received

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
