"""Relaying for servers nobody can dial (NAT, firewalls): both roles of the `pollen.v1.Relay` service.

`RelayService` runs on a reachable peer started with `--relay` (a dht-node or a shard server). A relayed
server opens one outbound `Attach` stream to it; the relay lends that server a TCP port on its own host and
answers with the public HOST:PORT. Every TCP connection a client makes to that port is carried over the stream
(swarm.relay_mux frames), and `RelayAgent` (on the relayed server) opens a connection to its own gRPC port for
each one and pumps the bytes both ways. The server announces the relay's HOST:PORT as its address, so clients
and pushing servers need no change: they dial an address, and what they speak over it is their own gRPC (TLS
end to end when the swarm uses TLS; the relay sees only ciphertext then).

The relay never dials anyone: it only listens on the ports it lends, so it cannot be used to reach third
parties. Its limits (`add_relay_args`): servers relayed at once, connections per relayed server (more are
closed at once, with a log line), bytes per second per relayed server (throttled, which backs the sender up
through the window and gRPC flow control), and the port range it lends from.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from swarm.access import peer_ip
from swarm.errors import map_errors
from swarm.handlers import add_servicer
from swarm.net import PLAINTEXT, Security, format_address, open_channel, parse_address
from swarm.pb import relay_pb2, relay_pb2_grpc
from swarm.relay_mux import CHUNK, ByteRate, Mux

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0  # an Attach that says nothing this long is dropped (it holds a server slot)
MAX_FRAME_MESSAGE_BYTES = 4 * CHUNK  # a data frame plus framing, with room to spare
RELAY_SERVICE = relay_pb2.DESCRIPTOR.services_by_name["Relay"].full_name  # "pollen.v1.Relay"


@dataclass(frozen=True)
class RelayLimits:
    """What a relaying peer lends: `max_servers` relayed at once, `max_connections` per relayed server,
    `max_bytes_per_s` per relayed server (both directions; 0 = unlimited), ports from `ports` (inclusive
    range; None = any free port)."""

    max_servers: int = 8
    max_connections: int = 32
    max_bytes_per_s: int = 16 << 20
    ports: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.max_servers < 1 or self.max_connections < 1 or self.max_bytes_per_s < 0:
            raise ValueError("relay limits: max servers and connections must be >= 1, max bytes/s >= 0")
        if self.ports is not None and not 0 < self.ports[0] <= self.ports[1] < 65536:
            raise ValueError(f"relay port range {self.ports} must be LOW-HIGH within 1..65535")

    @staticmethod
    def parse_ports(text: str) -> tuple[int, int] | None:
        """ "0" (any free port), "40000" or "40000-40099" → None or an inclusive (low, high)."""
        text = text.strip()
        low, _, high = text.partition("-")
        try:
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"--relay-ports must be 0, PORT or LOW-HIGH, got {text!r}") from None
        return None if (lo, hi) == (0, 0) else (lo, hi)


def add_relay_args(parser: argparse.ArgumentParser) -> None:
    """--relay and its limits, the same on dht-node and shard-server."""
    d = RelayLimits()
    # the shard-server's formatter appends defaults itself; the dht-node's does not
    formatter = parser.formatter_class
    appends_defaults = isinstance(formatter, type) and issubclass(formatter, argparse.ArgumentDefaultsHelpFormatter)
    dflt = "" if appends_defaults else " (default: %(default)s)"
    g = parser.add_argument_group("relaying for peers behind NAT")
    g.add_argument("--relay", action="store_true",
                   help="lend TCP ports on this host to servers that cannot be dialled (NAT): each keeps one "
                        "outbound stream here and clients reach it through the lent port")  # fmt: skip
    g.add_argument("--relay-max-servers", type=int, default=d.max_servers, help="servers relayed at once" + dflt)
    g.add_argument("--relay-max-connections", type=int, default=d.max_connections,
                   help="client connections per relayed server; more are closed (with a log line)" + dflt)  # fmt: skip
    g.add_argument("--relay-max-bytes-per-s", type=int, default=d.max_bytes_per_s,
                   help="bytes per second relayed for one server, both directions (0 = unlimited)" + dflt)  # fmt: skip
    g.add_argument("--relay-ports", default="0",
                   help="ports lent to relayed servers: LOW-HIGH, or 0 = any free port" + dflt)  # fmt: skip


def relay_limits_from_args(args: argparse.Namespace) -> RelayLimits | None:
    """None unless --relay; raises ValueError with the flag's name on a bad value."""
    if not args.relay:
        return None
    return RelayLimits(
        args.relay_max_servers,
        args.relay_max_connections,
        args.relay_max_bytes_per_s,
        RelayLimits.parse_ports(args.relay_ports),
    )


# ---- the relaying peer ----


class RelayService(relay_pb2_grpc.RelayServicer):
    """Lends ports on `bind_host` (announced as `public_host`) to attached servers, within `limits`."""

    def __init__(self, limits: RelayLimits, bind_host: str, public_host: str) -> None:
        self.limits = limits
        self.bind_host = bind_host
        self.public_host = public_host
        self.attached: dict[str, Mux] = {}  # public address lent -> the server's multiplexer
        self._slots = 0  # Attach calls holding a server slot (also those still saying hello)
        self._slots_by_ip: dict[str, int] = {}
        self._listeners: set[asyncio.Server] = set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        # frames that are not valid protobuf end the stream with INVALID_ARGUMENT (swarm.handlers)
        add_servicer(server, self, relay_pb2.DESCRIPTOR.services_by_name["Relay"])
        lim = self.limits
        log.info("relaying for up to %d servers behind NAT on %s (ports %s, %d connections and %s bytes/s each)",
                 lim.max_servers, self.public_host, "any" if lim.ports is None else f"{lim.ports[0]}-{lim.ports[1]}",
                 lim.max_connections, lim.max_bytes_per_s or "unlimited")  # fmt: skip

    async def close(self) -> None:
        for listener in list(self._listeners):
            listener.close()
        await asyncio.gather(*(mux.close_all() for mux in list(self.attached.values())), return_exceptions=True)

    @map_errors
    async def Attach(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        if self._slots >= self.limits.max_servers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"this peer relays {self.limits.max_servers} servers already"
            )
        # One address may hold at most half the slots (several servers behind one NAT are fine, one caller
        # taking every slot is not).
        ip = peer_ip(context.peer() or "")
        if self._slots_by_ip.get(ip, 0) >= max(1, self.limits.max_servers // 2):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{ip} has its share of relayed servers here")
        self._slots += 1
        self._slots_by_ip[ip] = self._slots_by_ip.get(ip, 0) + 1
        try:
            await self._attach(context)
        finally:
            self._slots -= 1
            self._slots_by_ip[ip] -= 1
            if not self._slots_by_ip[ip]:
                del self._slots_by_ip[ip]

    async def _attach(self, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello frame")
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame of Attach must be a hello")
        name = f"{first.hello.peer_id[:12] or '?'}@{peer_ip(context.peer() or '')}"
        limits = self.limits
        mux = Mux(context.write, name, ByteRate(limits.max_bytes_per_s) if limits.max_bytes_per_s else None)
        ids = itertools.count(1)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if len(mux.conns) >= limits.max_connections:
                log.warning("relay %s: %d connections already; closing a new one from %s", name,
                            limits.max_connections, writer.get_extra_info("peername"))  # fmt: skip
                writer.close()
                return
            conn_id = next(ids)

            async def accepted() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                return reader, writer

            try:
                mux.add(conn_id, accepted, announce=True)  # registered, then the peer is told
            except ValueError:  # the stream just ended
                writer.close()
                return
            await asyncio.gather(*mux.conns[conn_id].tasks[:1], return_exceptions=True)  # keep the handler alive
            writer.close()  # already closed unless the open frame could not be sent

        listener = await self._listen(on_client)
        if listener is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free port in {limits.ports} to lend")
            return  # not reached: abort raises
        port = int(listener.sockets[0].getsockname()[1])
        address = format_address(self.public_host, port)
        self.attached[address] = mux
        try:
            attached = relay_pb2.RelayAttached(
                address=address, max_connections=limits.max_connections, max_bytes_per_s=limits.max_bytes_per_s
            )
            await mux.send(relay_pb2.RelayFrame(attached=attached))
            log.info("relaying server %s at %s", name, address)
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    break
                mux.on_frame(frame)
        finally:
            listener.close()
            self._listeners.discard(listener)
            self.attached.pop(address, None)
            await mux.close_all()
            log.info("stopped relaying server %s at %s (%d bytes in, %d out)", name, address, mux.bytes_in,
                     mux.bytes_out)  # fmt: skip

    async def _listen(self, on_client: Callable[..., Awaitable[None]]) -> asyncio.Server | None:
        lo, hi = self.limits.ports or (0, 0)
        for port in range(lo, hi + 1):
            try:
                listener = await asyncio.start_server(on_client, self.bind_host, port, reuse_address=True)
            except OSError:
                continue  # taken (by another relayed server or something else): the next one
            self._listeners.add(listener)
            return listener
        return None


# ---- the relayed server ----


@dataclass(frozen=True)
class RelayEndpoint:
    relay: str  # the relaying peer's gRPC address
    address: str  # HOST:PORT clients dial (on the relay's host)


class RelayAgent:
    """Keeps one Attach stream to a relay and replays its connections on `local_address` (our gRPC port).

    `candidates()` lists relay addresses to try in order; `attach()` takes the first that accepts; `run()`
    serves the stream and, when it breaks, attaches again (same or another relay, backing off while none
    accepts) and calls `on_change` with the new endpoint so the server re-announces itself."""

    def __init__(
        self,
        local_address: str,
        candidates: Callable[[], Awaitable[Sequence[str]]],
        *,
        peer_id: str = "",
        security: Security = PLAINTEXT,
        on_change: Callable[[RelayEndpoint], Awaitable[object]] | None = None,
        attach_timeout_s: float = 5.0,
    ) -> None:
        self.local_host, self.local_port = parse_address(local_address)
        self._candidates = candidates
        self.peer_id = peer_id
        self.security = security
        self.on_change = on_change
        self.attach_timeout_s = attach_timeout_s
        self.endpoint: RelayEndpoint | None = None
        self._call: Any = None
        self._channel: grpc.aio.Channel | None = None

    async def attach(self) -> RelayEndpoint | None:
        """Attach to the first candidate that relays for us; None if none does."""
        for address in await self._candidates():
            channel = open_channel(address, MAX_FRAME_MESSAGE_BYTES, self.security)
            call = relay_pb2_grpc.RelayStub(channel).Attach()
            try:
                await call.write(relay_pb2.RelayFrame(hello=relay_pb2.RelayHello(peer_id=self.peer_id)))
                first = await asyncio.wait_for(call.read(), self.attach_timeout_s)
                if first is grpc.aio.EOF or first.WhichOneof("kind") != "attached":
                    raise ValueError("the relay did not answer with its endpoint")
            except (grpc.aio.AioRpcError, TimeoutError, ValueError) as e:
                reason = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e) or type(e).__name__
                log.info("relay %s did not take us: %s", address, reason)
                call.cancel()
                await channel.close()
                continue
            self._call, self._channel = call, channel
            self.endpoint = RelayEndpoint(address, first.attached.address)
            log.info("attached to relay %s: clients reach us at %s (up to %d connections)", address,
                     self.endpoint.address, first.attached.max_connections)  # fmt: skip
            return self.endpoint
        return None

    async def run(self, max_backoff_s: float = 30.0) -> None:
        """Serve the stream; re-attach when it breaks. Runs until cancelled."""
        backoff = 1.0
        try:
            while True:
                if self._call is not None:
                    await self._serve(self._call)
                    log.warning(
                        "relay stream to %s ended; attaching again", self.endpoint.relay if self.endpoint else "?"
                    )
                    await self._drop()
                if await self.attach() is None:
                    log.warning("no relay takes us; retrying in %.0f s", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, max_backoff_s)
                    continue
                backoff = 1.0
                if self.on_change is not None and self.endpoint is not None:
                    await self.on_change(self.endpoint)
        finally:
            await self._drop()

    async def close(self) -> None:
        await self._drop()

    async def _drop(self) -> None:
        call, channel = self._call, self._channel
        self._call = self._channel = None
        if call is not None:
            call.cancel()
        if channel is not None:
            await channel.close()

    async def _serve(self, call: Any) -> None:
        relay = self.endpoint.relay if self.endpoint else "?"
        mux = Mux(call.write, relay)

        async def local() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(self.local_host, self.local_port)

        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    return
                if frame.WhichOneof("kind") == "open":
                    if frame.conn_id not in mux.conns:
                        mux.add(frame.conn_id, local)
                else:
                    mux.on_frame(frame)
        except grpc.aio.AioRpcError as e:
            log.info("relay stream to %s failed: %s %s", relay, e.code().name, e.details())
        finally:
            await mux.close_all()
