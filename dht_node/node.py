"""DhtNode: one member of the Kademlia overlay (UDP) with the `Dht` gRPC front door, on one port number.

It composes kademlia's pieces instead of subclassing kademlia.network.Server: Server.listen binds
0.0.0.0 and schedules unkept refresh tasks, and its get/set are exactly what Pollen replaces (merging
lookups, chunked stores, replica counting). Routing and node ids are kademlia's.

Security comes from the config's `security` (swarm.net.Security): with a swarm key every datagram carries a
MAC (datagram.py) and every gRPC call but health checks a proof of the key; with TLS files gRPC is served over
TLS. Abuse limits: per-IP request rates on UDP (wire.py) and gRPC (swarm.auth), a cap of unary calls in flight
per IP, gRPC requests over MAX_RECEIVE_BYTES refused before they are read, UDP requests over 8 KiB dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kademlia.node import Node
from kademlia.utils import digest

from dht_node.config import DhtNodeConfig
from dht_node.crawl import LookupStats, NodeLookup, RecordLookup
from dht_node.datagram import DatagramSeal
from dht_node.liveness import STALE_AFTER_S
from dht_node.protocol import DUE_SPREAD_S, PollenProtocol
from dht_node.reachability import ReachabilityProbe
from dht_node.servicer import DhtServicer
from dht_node.storage import Record, RecordStorage, merge_into
from dht_node.validation import RecordValidator
from swarm.access import CallLimits
from swarm.aio import TaskSet
from swarm.handlers import add_servicer
from swarm.identity import Identity
from swarm.net import bind_server, create_server, format_address, parse_address
from swarm.pb import dht_pb2
from swarm.relay import RelayService

log = logging.getLogger(__name__)

DHT_SERVICE = dht_pb2.DESCRIPTOR.services_by_name["Dht"].full_name  # "pollen.v1.Dht"
BIND_ATTEMPTS = 8  # port 0: the free UDP port may be taken on TCP; pick again this many times
REJOIN_PERIOD_S = 5.0  # while no contact is known, retry the initial peers this often
REPUBLISH_CONCURRENCY = 8  # keys republished at once (each is a lookup plus k stores)
# Lookups in flight at once: a BatchGet of 80 keys would otherwise fire ~80*alpha datagrams in one burst and
# overflow the UDP receive buffers of the nodes it asks (drops look like deaths and cost a full timeout).
LOOKUP_CONCURRENCY = 16
# gRPC message caps: a BatchGet reply may carry 256 records of up to 56 KB each, but requests are small (a
# Store of 128 sub-keys of 4 KiB, a SpeedTest of 1 MiB): a larger request is refused before it is read.
MAX_MESSAGE_BYTES = 16 << 20
MAX_RECEIVE_BYTES = 2 << 20
MAX_CONCURRENT_RPCS = 1024  # in all; per IP, DhtNodeConfig.grpc_max_in_flight_per_ip
SWEEP_PINGS_PER_TICK = 32  # silent contacts pinged per upkeep tick (liveness.py)
UDP_RCVBUF_BYTES = 4 << 20  # asked of the kernel (capped by net.core.rmem_max): absorbs reply bursts


def _tcp_port_free(family: int, ip: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


class DhtNode:
    """`node = DhtNode(host="127.0.0.1", port=0, initial_peers=[...]); await node.start(); ...; await node.stop()`.

    Takes a DhtNodeConfig, keyword overrides of its fields, or both. `clock` is the wall clock that record
    expirations are compared with (absolute unix time); tests pass a controllable one.
    """

    def __init__(
        self, config: DhtNodeConfig | None = None, *, clock: Callable[[], float] = time.time, **overrides: Any
    ) -> None:
        config = config or DhtNodeConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.identity: Identity | None = None
        if self.config.identity_path:
            # The id derives from the key, so a restarted node returns to the same place in the id space and
            # its old neighbours' records are still its own.
            self.identity = Identity.load_or_create(self.config.identity_path)
            self.node = Node(bytes.fromhex(self.identity.peer_id))
        else:
            self.node = Node(os.urandom(20))  # Kademlia id: 160 random bits, like kademlia's Server
        self.storage = RecordStorage(self.config.limits, clock)
        self.validator = RecordValidator(strict=self.config.require_signatures)
        self.tasks = TaskSet()
        self.port = 0
        self._protocol: PollenProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        # --relay: lends ports on our host to servers behind NAT (swarm.relay), on the announced host
        cfg = self.config
        self.relay = RelayService(cfg.relay, cfg.host, cfg.announce_host or cfg.host) if cfg.relay else None
        self._started = self._stopped = False
        self.upkeep_rounds = 0  # completed maintenance ticks (republish, bucket refresh): progress in node time
        self._lookups = asyncio.Semaphore(LOOKUP_CONCURRENCY)
        self.lookup_stats = LookupStats()  # summed over every get's lookup (tests, benchmarks)
        self.stale_after_s = STALE_AFTER_S  # contacts silent this long are pinged at the next upkeep tick

    # ---- lifecycle ----

    @property
    def address(self) -> str:
        """HOST:PORT naming this node for both gRPC and the overlay (the announce host if one is set)."""
        return format_address(self.config.announce_host or self.config.host, self.port)

    @property
    def node_id(self) -> str:
        return str(self.node.id.hex())

    @property
    def protocol(self) -> PollenProtocol:
        if self._protocol is None:
            raise RuntimeError("DhtNode is not started")
        return self._protocol

    def peer_count(self) -> int:
        return self._protocol.router.size() if self._protocol is not None else 0

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("DhtNode.start() called twice")
        self._started = True
        await self._bind()
        assert self._grpc is not None  # set by _bind
        await self._grpc.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(DHT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "dht-node %s serving gRPC and UDP on %s (%s)%s",
            self.node_id[:12],
            self.address,
            self.config.security.describe(),
            " (client mode)" if self.config.client_mode else "",
        )
        if self.config.initial_peers:
            await self._join()
        else:
            log.info("started a new swarm (no initial peers)")
        self.tasks.spawn(self._run_maintenance_loop(), name="dht-maintenance")

    async def _bind(self) -> None:
        """Bind UDP first, then gRPC on the same number (UDP first because a datagram endpoint is cheap to
        close and retry). One number names the node everywhere: `--initial-peers` lists these ports."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        for attempt in range(1, BIND_ATTEMPTS + 1):
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: PollenProtocol(
                    self.node,
                    self.storage,
                    cfg.ksize,
                    cfg.rpc_timeout_s,
                    self.tasks,
                    self.validator,
                    cfg.client_mode,
                    seal=DatagramSeal(cfg.security.swarm_key),
                    request_rate_per_s=cfg.udp_requests_per_ip_s,
                    due_spread_s=min(DUE_SPREAD_S, cfg.republish_period_s),
                ),
                local_addr=(cfg.host, cfg.port),
            )
            sockname = transport.get_extra_info("sockname")
            port = int(sockname[1])
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF_BYTES)
            server = None
            # A plain socket tells whether TCP is free without building a gRPC server that then fails to bind.
            if _tcp_port_free(transport.get_extra_info("socket").family, sockname[0], port):
                server = self._make_grpc_server()
                try:
                    bind_server(server, format_address(cfg.host, port), cfg.security)
                except RuntimeError:  # taken between the check and the bind
                    await server.stop(None)
                    server = None
            if server is None:
                transport.close()
                if cfg.port != 0 or attempt == BIND_ATTEMPTS:
                    raise OSError(f"cannot bind gRPC on {format_address(cfg.host, port)} (TCP port taken?)")
                log.debug("TCP port %d is taken though UDP was free; picking another port", port)
                continue
            self._transport, self._protocol, self._grpc, self.port = transport, protocol, server, port
            return

    def _make_grpc_server(self) -> grpc.aio.Server:
        # server_options (in create_server) turns SO_REUSEPORT off: two nodes could otherwise share one TCP port.
        cfg = self.config
        server = create_server(
            MAX_MESSAGE_BYTES,
            security=cfg.security,
            limits=CallLimits(cfg.grpc_calls_per_ip_s, cfg.grpc_max_in_flight_per_ip),
            max_receive_bytes=MAX_RECEIVE_BYTES,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        probe = ReachabilityProbe(cfg.security)
        servicer = DhtServicer(self, self.storage.limits, self.validator, self.storage.clock, probe)
        add_servicer(server, servicer, dht_pb2.DESCRIPTOR.services_by_name["Dht"])  # undecodable: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.relay is not None:
            self.relay.add_to_server(server)
        reflection.enable_server_reflection([DHT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        return server

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving: health NOT_SERVING, gRPC drained for `grace_s`, background tasks cancelled, UDP closed."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
        if self.relay is not None:
            await self.relay.close()
        await self.tasks.cancel_all()
        if self._protocol is not None:
            self._protocol.close()
        if self._transport is not None:
            self._transport.close()
        log.info("dht-node %s stopped", self.address)

    # ---- joining and upkeep ----

    async def _join(self) -> bool:
        contacts = []
        for address, result in zip(*await self._ping_initial_peers(), strict=True):
            if result is not None:
                contacts.append(result)
            else:
                log.info("initial peer %s did not answer", address)
        if not contacts:
            log.warning("no initial peer answered; retrying every %.0f s", REJOIN_PERIOD_S)
            return False
        await NodeLookup(self.protocol, self.node, contacts, self.config.ksize, self.config.alpha).run()
        log.info("joined the swarm via %s: %d contacts", contacts[0], self.peer_count())
        return True

    async def _ping_initial_peers(self) -> tuple[list[str], list[Node | None]]:
        loop = asyncio.get_running_loop()
        assert self._transport is not None  # bound in start()
        family = self._transport.get_extra_info("socket").family
        addresses, pings = [], []
        for peer in self.config.initial_peers:
            host, port = parse_address(peer)  # config checked it already
            try:  # kademlia needs IPs: contacts are matched by (ip, port)
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except OSError as e:
                log.warning("cannot resolve initial peer %s: %s", peer, e)
                continue
            addresses.append(peer)
            ip, port_number = infos[0][4][:2]
            pings.append(self.protocol.ping_address((str(ip), int(port_number))))
        return addresses, list(await asyncio.gather(*pings))

    @property
    def upkeep_period_s(self) -> float:
        return min(REJOIN_PERIOD_S, self.config.republish_period_s / 2)

    async def _run_maintenance_loop(self) -> None:
        # Ticks are short so that each record is republished within a tick of becoming `period` old, not
        # up to two periods later; a tick with nothing due only scans the storage.
        period = self.config.republish_period_s
        while True:
            await asyncio.sleep(self.upkeep_period_s)
            if self.config.initial_peers and self.peer_count() == 0:
                await self._join()
            culled = self.storage.cull()
            self._sweep_silent_contacts()
            await self._refresh_buckets()
            republished = await self.republish(older_than_s=period)
            self.upkeep_rounds += 1
            # one line when something happened; quiet otherwise
            log.log(
                logging.INFO if culled or republished else logging.DEBUG,
                "upkeep: %d keys held (%d expired), %d republished, %d contacts",
                len(self.storage),
                culled,
                republished,
                self.peer_count(),
            )

    def _sweep_silent_contacts(self) -> None:
        """Ping contacts silent for `stale_after_s`: a node that died quietly leaves the table (and stops being
        handed out) within about stale_after_s + the rpc timeout, even if no lookup went near it."""
        stale = self.protocol.stale_contacts(self.stale_after_s)
        for node in stale[:SWEEP_PINGS_PER_TICK]:
            self.tasks.spawn(self.protocol.call_ping(node), name="dht-liveness-ping")

    async def _refresh_buckets(self) -> None:
        """Kademlia section 2.3: look up a random id in every bucket nobody touched for an hour."""
        lookups = []
        for node_id in self.protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = self.protocol.router.find_neighbors(target, self.config.alpha)
            lookups.append(NodeLookup(self.protocol, target, nearest, self.config.ksize, self.config.alpha).run())
        await asyncio.gather(*lookups)

    async def republish(self, older_than_s: float = 0.0) -> int:
        """Re-store the records nobody stored or republished for `older_than_s` on the current k closest
        nodes, so they survive churn among their holders. Returns how many keys were republished."""
        semaphore = asyncio.Semaphore(REPUBLISH_CONCURRENCY)

        async def one(key: bytes, record: Record) -> None:
            async with semaphore:
                name = self.storage.name_of(key)
                if not name:  # cannot happen for records stored through this version; never re-sent unnamed
                    return
                replicas = await self._store_digest(key, name, record, store_locally=False)
                self.storage.mark_republished(key)
                log.debug("republished %s to %d nodes", key.hex(), replicas)

        stale = self.storage.iter_older_than(older_than_s)
        await asyncio.gather(*(one(key, record) for key, record in stale))
        return len(stale)

    # ---- the operations behind the gRPC service ----

    async def store(self, key: str, record: Record) -> int:
        """Merge `record` into the k closest nodes of `key`; returns how many accepted (this node included)."""
        replicas = await self._store_digest(digest(key), key, record, store_locally=not self.config.client_mode)
        log.debug("stored %d sub-keys of %r on %d nodes", len(record), key, replicas)
        return replicas

    async def _store_digest(self, dkey: bytes, name: str, record: Record, store_locally: bool) -> int:
        target = Node(dkey)
        nearest = self.protocol.live_neighbors(target)
        found = await NodeLookup(self.protocol, target, nearest, self.config.ksize, self.config.alpha).run()
        candidates = [*found, self.node] if store_locally else found
        closest = sorted(candidates, key=lambda n: n.distance_to(target))[: self.config.ksize]
        replicas = 0
        if store_locally and any(n.id == self.node.id for n in closest):
            replicas += self.storage.merge(dkey, record, name)
        others = [n for n in closest if n.id != self.node.id]
        results = await asyncio.gather(*(self.protocol.store_record(n, dkey, record, name) for n in others))
        return replicas + sum(results)

    async def get(self, key: str, timeout_s: float | None = None) -> Record:
        """Merge the copies of `key` held here and by the k closest nodes. After `timeout_s` the lookup stops
        and returns what it merged so far (a partial answer beats none for a client's deadline)."""
        dkey = digest(key)
        record = self.storage.get_record(dkey)
        target = Node(dkey)
        # the suspects among the k closest go along: the lookup asks them only if nobody else has a copy
        nearest = self.protocol.live_neighbors(target) + self.protocol.suspect_neighbors(target)
        if nearest:
            crawl = RecordLookup(self.protocol, key, target, nearest, self.config.ksize, self.config.alpha)

            async def bounded_find() -> None:
                async with self._lookups:
                    await crawl.run()

            try:
                await asyncio.wait_for(bounded_find(), timeout_s)
            except TimeoutError:
                log.info(
                    "lookup of %r ran out of time after %.2f s; answering with %d copies", key, timeout_s, crawl.holders
                )
            self.lookup_stats.add(crawl.stats)
            merge_into(record, crawl.record, self.storage.clock())
        return record
