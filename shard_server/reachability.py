"""How the swarm reaches this shard server: checked at start, relayed when nobody can dial it.

At start (after binding, before the first ONLINE announcement) the server asks a dht-node to dial it back
(Dht.CheckReachable: the node dials the IP it sees us at, at our port). The answer is announced in
ServerRecord.reachable. A server that cannot be dialled attaches to a relay (swarm.relay): its dht-nodes
first, then other servers of the model that announce themselves reachable (a peer without the Relay service
answers UNIMPLEMENTED and the next is tried). It then announces the relay's lent HOST:PORT as its address and
the relay's gRPC address in `relay`; when the relay stream breaks it attaches again and re-announces.

`--public-address` wins: it is checked (at its port) and the answer announced, but never replaced by a relay.
`--use-relay never` skips all of this (reachable is announced as True, as before); `always` attaches even
when reachable (benchmarks, tests). With `--relay` the server also relays for others on its own host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc

from shard_server.rebalancer import fetch_records
from swarm.aio import TaskSet
from swarm.dht_client import DhtClient
from swarm.net import PLAINTEXT, Security, format_address, open_channel, parse_address
from swarm.pb import dht_pb2, dht_pb2_grpc
from swarm.records import ServerState
from swarm.relay import RelayAgent, RelayEndpoint, RelayLimits, RelayService

log = logging.getLogger(__name__)

BUSY_RETRIES, BUSY_BACKOFF_S = 4, 0.5
CHECK_TIMEOUT_S = 8.0  # the node's own dial is bounded by ~3 s (dht_node/reachability.py) plus a health check
USE_RELAY_MODES = ("auto", "never", "always")


async def check_reachable(
    dht_peers: Sequence[str], port: int, security: Security = PLAINTEXT
) -> dht_pb2.CheckReachableResponse | None:
    """The first dht-node's answer on whether it can dial us at `port`; None if no node could check (older
    nodes answer UNIMPLEMENTED, a busy one RESOURCE_EXHAUSTED: the next one is asked)."""
    for address in dht_peers:
        channel = open_channel(address, 1 << 20, security)
        stub = dht_pb2_grpc.DhtStub(channel)
        try:
            for attempt in range(BUSY_RETRIES + 1):
                try:
                    return await stub.CheckReachable(dht_pb2.CheckReachableRequest(port=port), timeout=CHECK_TIMEOUT_S)
                except grpc.aio.AioRpcError as e:
                    # RESOURCE_EXHAUSTED: another server on our IP is being checked right now (one at a time)
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == BUSY_RETRIES:
                        log.info("dht-node %s cannot check our reachability: %s %s", address, e.code().name,
                                 e.details())  # fmt: skip
                        break
                    await asyncio.sleep(BUSY_BACKOFF_S * (attempt + 1))
        finally:
            await channel.close()
    return None


class Reachability:
    """What the server announces about how it is reached (`address`, `reachable`, `relay`), and the relay
    service it offers with --relay."""

    def __init__(
        self,
        *,
        host: str,
        public_address: str | None,
        dht_peers: Sequence[str],
        dht: DhtClient | None,
        model_id: str,
        peer_id: str,
        security: Security = PLAINTEXT,
        use_relay: str = "auto",
        relay_limits: RelayLimits | None = None,
    ) -> None:
        if use_relay not in USE_RELAY_MODES:
            raise ValueError(f"use_relay must be one of {', '.join(USE_RELAY_MODES)}, not {use_relay!r}")
        self.host, self.public_address = host, public_address
        self.dht_peers, self.dht = list(dht_peers), dht
        self.model_id, self.peer_id, self.security, self.use_relay = model_id, peer_id, security, use_relay
        self.reachable = True
        self.endpoint: RelayEndpoint | None = None  # set while relayed
        public_host = parse_address(public_address)[0] if public_address else host
        self.service = RelayService(relay_limits, host, public_host) if relay_limits is not None else None
        self.num_blocks = 0  # of the model: where to look for relaying servers (set by the server)
        self._agent: RelayAgent | None = None
        self._tasks = TaskSet()

    @property
    def address(self) -> str | None:
        """The relay's lent HOST:PORT while relayed, else None (the server announces its own address)."""
        return self.endpoint.address if self.endpoint is not None else None

    @property
    def relay(self) -> str:
        return self.endpoint.relay if self.endpoint is not None else ""

    def add_services(self, server: grpc.aio.Server) -> None:
        """Before the server starts: the Relay service with --relay."""
        if self.service is not None:
            self.service.add_to_server(server)

    async def start(self, port: int, reannounce: Callable[[], Awaitable[object]]) -> None:
        """Check, and attach to a relay if needed; the relay stream is kept up by our own task until `close()`
        (not the server's background tasks: relayed sessions must keep their path while the server drains)."""
        if self.use_relay == "never" or not self.dht_peers:
            return
        own_port = parse_address(self.public_address)[1] if self.public_address else port
        if self.use_relay == "auto":
            answer = await check_reachable(self.dht_peers, own_port, self.security)
            if answer is None:
                log.warning("no dht-node could check whether we can be dialled; announcing ourselves as reachable")
                return
            announced = parse_address(self.public_address)[0] if self.public_address else self.host
            seen = parse_address(answer.observed_address)[0]
            if seen != announced:
                log.info("the dht-node sees us at %s, not at our announced host %s: it dialled %s",
                         seen, announced, answer.observed_address)  # fmt: skip
            self.reachable = answer.reachable
            if answer.reachable:
                log.info("reachable: a dht-node dialled us at %s", answer.observed_address)
                return
            if self.public_address:
                # The operator said how we are reached (port forwarding, a load balancer): that address wins.
                log.warning("NOT reachable from the swarm at the port of --public-address %s (%s); announcing "
                            "it anyway (without it, a relay would be used)", self.public_address,
                            answer.error)  # fmt: skip
                return
            log.warning("NOT reachable from the swarm (%s); attaching to a relay", answer.error)
        else:
            self.reachable = False  # --use-relay always: announced as relayed
        local = format_address("::1" if self.host == "::" else "127.0.0.1" if self.host == "0.0.0.0" else self.host,
                               port)  # fmt: skip

        async def changed(endpoint: RelayEndpoint) -> None:
            self.endpoint = endpoint
            await reannounce()

        agent = self._agent = RelayAgent(local, self._relay_candidates, peer_id=self.peer_id,
                                         security=self.security, on_change=changed)  # fmt: skip
        self.endpoint = await agent.attach()
        if self.endpoint is None:
            log.warning("no relay takes us yet: announcing our own address (unreachable) and retrying")
        self._tasks.spawn(agent.run(), name="relay-agent")

    async def _relay_candidates(self) -> list[str]:
        """Our dht-nodes, then reachable servers of the model (any of them may run with --relay)."""
        candidates = list(self.dht_peers)
        if self.dht is not None and self.num_blocks:
            try:
                records = await fetch_records(self.dht, self.model_id, self.num_blocks)
            except Exception as e:  # noqa: BLE001 - the DHT being down only narrows the choice
                log.info("cannot list servers to relay through: %s", e)
                records = []
            for r in records:
                usable = r.reachable and not r.relay and r.state == ServerState.ONLINE and r.peer_id != self.peer_id
                if usable and r.address not in candidates:
                    candidates.append(r.address)
        return candidates

    async def close(self) -> None:
        """End the relay stream (our relayed connections) and the relay service (those we relay)."""
        await self._tasks.cancel_all()
        if self._agent is not None:
            await self._agent.close()
        if self.service is not None:
            await self.service.close()
