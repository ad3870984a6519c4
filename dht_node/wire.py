"""The datagram layer of a dht-node: requests out and their replies, requests in and what we answer.

Replaces rpcudp's task-per-datagram code. Every datagram is sealed/opened by DatagramSeal (the swarm key's
MAC, if any), then:
* `REQUEST  | msg_id(20) | msgpack([name, args(, token)])` — over 8 KiB or over the sender IP's request rate
  it is dropped before it is parsed; the handler's reply goes back only if it is at most 3x the request or
  the sender's address is proven (AddressGuard); otherwise a `RETRY | msg_id | token` goes back instead;
* `RESPONSE | msg_id | msgpack(reply)` — accepted only for a request in flight to that very address (checked
  before parsing: unsolicited replies cost nothing); it proves the address and gives a round-trip sample;
* `RETRY    | msg_id | token(16)` — the requester keeps the token for that address and repeats the request.
A request that gets no reply within `rpc_timeout_s` fails with (False, None) and the contact is reported dead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import umsgpack
from kademlia.node import Node

from dht_node.datagram import TOKEN_BYTES, AddressGuard, DatagramSeal
from dht_node.liveness import Liveness
from dht_node.storage import DATAGRAM_LIMIT_BYTES
from swarm.access import RateLimiter

log = logging.getLogger(__name__)

Address = tuple[str, int]
REQUEST, RESPONSE, RETRY = b"\x00", b"\x01", b"\x02"
HEADER_BYTES = 21  # kind byte + 20-byte message id
TOKEN_OVERHEAD_BYTES = TOKEN_BYTES + 2  # a token rides in the request as a msgpack bin
MAX_REQUEST_BYTES = HEADER_BYTES + DATAGRAM_LIMIT_BYTES + TOKEN_OVERHEAD_BYTES
MAX_RETRIES = 2  # a token can expire between the RETRY and the repeat once; twice means something is wrong
MAX_LATE_IDS = 4096  # ids of timed-out requests: a late reply still proves the contact alive


@dataclass
class Outgoing:
    """One request in flight."""

    future: asyncio.Future[tuple[bool, Any]]
    timer: asyncio.TimerHandle
    address: Address
    name: str
    args: tuple[Any, ...]
    node: Node | None  # the contact asked, when it is one (liveness and routing-table upkeep)
    sent_at: float = 0.0
    retries: int = 0


class RpcEndpoint(asyncio.DatagramProtocol):
    """Subclasses implement `handle_request` and may override the `on_answer`/`on_timeout` hooks."""

    def __init__(
        self,
        rpc_timeout_s: float,
        seal: DatagramSeal,
        request_limiter: RateLimiter | None,
        guard: AddressGuard | None = None,
    ) -> None:
        self.rpc_timeout_s = rpc_timeout_s
        self.seal = seal
        self.guard = guard or AddressGuard()
        self.liveness = Liveness(max_rto_s=rpc_timeout_s)
        self.request_limiter = request_limiter
        self.transport: asyncio.DatagramTransport | None = None
        self._outgoing: dict[bytes, Outgoing] = {}
        self._late: OrderedDict[bytes, Address] = OrderedDict()
        self._tokens: OrderedDict[Address, bytes] = OrderedDict()  # tokens peers gave us, by their address
        self.rpcs_sent = 0  # outgoing requests, for benchmarks and the upkeep log
        self.bytes_in = self.bytes_out = 0
        self.requests_throttled = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    # ---- hooks ----

    def handle_request(self, name: str, args: list[Any], sender: Address, proven: bool) -> Any:
        """The reply to a request (None: no reply). `proven`: the sender's address answered us before."""
        raise NotImplementedError

    def on_answer(self, request: Outgoing, reply: Any) -> None:
        """A request of ours was answered (the future is already resolved)."""

    def on_timeout(self, request: Outgoing) -> None:
        """A request of ours got no answer within rpc_timeout_s."""

    # ---- outgoing requests ----

    def request(self, address: Address, name: str, args: tuple[Any, ...], node: Node | None = None) -> asyncio.Future:
        """Send `name(*args)` to `address`; the future resolves to (True, reply) or (False, None) after the
        timeout. Never raises for network reasons."""
        loop = asyncio.get_running_loop()
        msg_id = os.urandom(20)
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        timer = loop.call_later(self.rpc_timeout_s, self._expire, msg_id)
        outgoing = self._outgoing[msg_id] = Outgoing(future, timer, address, name, args, node)
        self.rpcs_sent += 1
        self._send_request(msg_id, outgoing)
        return future

    def has_outgoing(self, address: Address) -> bool:
        return any(o.address == address for o in self._outgoing.values())

    def _send_request(self, msg_id: bytes, outgoing: Outgoing) -> None:
        token = self._tokens.get(outgoing.address)
        payload = [outgoing.name, list(outgoing.args), *([token] if token else [])]
        outgoing.sent_at = time.monotonic()
        self._send(REQUEST + msg_id + umsgpack.packb(payload), outgoing.address)

    def _send(self, datagram: bytes, address: Address) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        sealed = self.seal.seal(datagram)
        self.bytes_out += len(sealed)
        self.transport.sendto(sealed, address)

    def _expire(self, msg_id: bytes) -> None:
        outgoing = self._outgoing.pop(msg_id, None)
        if outgoing is None:
            return
        self._late[msg_id] = outgoing.address
        if len(self._late) > MAX_LATE_IDS:
            self._late.popitem(last=False)
        if not outgoing.future.done():  # the caller may have been cancelled (lookup deadline)
            outgoing.future.set_result((False, None))
        self.on_timeout(outgoing)

    def close(self) -> None:
        """Fail every pending request now (stock rpcudp leaves them to their timeouts after stop)."""
        pending = list(self._outgoing.values())
        self._outgoing.clear()
        for outgoing in pending:
            outgoing.timer.cancel()
            if not outgoing.future.done():
                outgoing.future.set_result((False, None))

    # ---- incoming datagrams ----

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.bytes_in += len(data)
        address = (str(addr[0]), int(addr[1]))
        datagram = self.seal.open(data)
        if datagram is None or len(datagram) <= HEADER_BYTES:
            log.debug("dropped a %d-byte datagram from %s: not an rpc message of this swarm", len(data), address)
            return
        kind, msg_id, body = datagram[:1], datagram[1:HEADER_BYTES], datagram[HEADER_BYTES:]
        try:
            if kind == REQUEST:
                self._on_request(msg_id, datagram, len(data), address)
            elif kind == RESPONSE:
                self._on_response(msg_id, body, address)
            elif kind == RETRY:
                self._on_retry(msg_id, body, address)
        except Exception as e:  # noqa: BLE001 - a peer's garbage must never reach the event loop
            log.debug("dropped a malformed datagram from %s: %s", address, f"{type(e).__name__}: {e}"[:200])

    def _answered(self, msg_id: bytes, address: Address) -> Outgoing | None:
        """The request a reply from `address` answers, if it is ours and was sent there."""
        outgoing = self._outgoing.get(msg_id)
        if outgoing is None or outgoing.address != address:
            if self._late.pop(msg_id, None) == address:
                self.liveness.heard(address)  # it answered after all: slow, not dead
            return None
        self.liveness.sample(address, time.monotonic() - outgoing.sent_at)
        self.liveness.heard(address)
        self.guard.verify(address)  # it echoed our random id: it receives what we send there
        return outgoing

    def _on_response(self, msg_id: bytes, body: bytes, address: Address) -> None:
        if msg_id not in self._outgoing:
            self._answered(msg_id, address)
            return
        reply = umsgpack.unpackb(body)  # only now: a reply nobody asked for is never parsed
        outgoing = self._answered(msg_id, address)
        if outgoing is None:
            return
        del self._outgoing[msg_id]
        outgoing.timer.cancel()
        if not outgoing.future.done():
            outgoing.future.set_result((True, reply))
        self.on_answer(outgoing, reply)

    def _on_retry(self, msg_id: bytes, token: bytes, address: Address) -> None:
        if len(token) != TOKEN_BYTES:
            return
        outgoing = self._answered(msg_id, address)
        if outgoing is None or outgoing.retries >= MAX_RETRIES:
            return
        outgoing.retries += 1
        self._tokens.pop(address, None)
        self._tokens[address] = token
        if len(self._tokens) > 4 * MAX_LATE_IDS:
            self._tokens.popitem(last=False)
        self._send_request(msg_id, outgoing)

    def _on_request(self, msg_id: bytes, datagram: bytes, wire_bytes: int, address: Address) -> None:
        if len(datagram) > MAX_REQUEST_BYTES:
            log.debug("dropped a %d-byte request from %s: over the 8 KiB limit", len(datagram), address)
            return
        if self.request_limiter is not None and not self.request_limiter.allow(address[0]):
            self.requests_throttled += 1
            if self.requests_throttled & (self.requests_throttled - 1) == 0:
                log.warning("request flood from %s: %d requests dropped so far", address[0], self.requests_throttled)
            return
        payload = umsgpack.unpackb(datagram[HEADER_BYTES:])
        if not isinstance(payload, list) or len(payload) not in (2, 3) or not isinstance(payload[1], list | tuple):
            log.debug("dropped a request of the wrong shape from %s", address)
            return
        name, args = payload[0], list(payload[1])
        if not isinstance(name, str):
            return
        proven = self.guard.verified(address)
        if not proven and len(payload) == 3 and self.guard.token_valid(address, payload[2]):
            self.guard.verify(address)
            proven = True
        if proven:
            self.liveness.heard(address)
        reply = self.handle_request(name, args, address, proven)
        if reply is None:
            return
        datagram_out = RESPONSE + msg_id + umsgpack.packb(reply)
        if not self.guard.may_send(address, wire_bytes, len(datagram_out) + self.seal.overhead):
            # Unproven address and a big reply: it may be a forged source. Send a token it must echo instead.
            datagram_out = RETRY + msg_id + self.guard.token_for(address)
            self.guard.retries_sent += 1
        self._send(datagram_out, address)
