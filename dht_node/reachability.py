"""Dial-back for `Dht.CheckReachable`: can the swarm reach a shard server at its own IP and gRPC port?

The node dials only the caller's IP as it sees it (context.peer()), never an address the caller names, so it
cannot be used to scan or flood third parties; one dial at a time per IP, a few per minute (RESOURCE_EXHAUSTED
beyond), each bounded by a short timeout. Plaintext swarms get a gRPC health check (proving a gRPC server
answers there, not just an open port); with TLS the node has no name to verify the caller's certificate
against, so a TCP connect is the test.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swarm.access import RateLimiter, peer_ip
from swarm.errors import InvalidRequest, Overloaded
from swarm.net import PLAINTEXT, Security, format_address, open_channel
from swarm.pb import dht_pb2

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 3.0
# A server asks once per start; many servers may share one IP (a lab behind one NAT, tests on loopback).
CHECKS_PER_IP_PER_MIN = 60.0
CHECKS_BURST = 20


class ReachabilityProbe:
    def __init__(self, security: Security = PLAINTEXT, timeout_s: float = DIAL_TIMEOUT_S) -> None:
        self.security = security
        self.timeout_s = timeout_s
        self._rates = RateLimiter(CHECKS_PER_IP_PER_MIN / 60.0, burst=CHECKS_BURST)
        self._busy: set[str] = set()  # IPs with a dial in progress

    async def check(self, peer: str, port: int) -> dht_pb2.CheckReachableResponse:
        """Dial `port` at the IP of `peer` (gRPC's context.peer() of the caller)."""
        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be in 1..65535, got {port}")
        ip = peer_ip(peer)
        if not peer.startswith(("ipv4:", "ipv6:")):
            raise InvalidRequest(f"reachability is checked over TCP/IP only, not for {peer!r}")
        if ip in self._busy:
            raise Overloaded(f"a reachability check of {ip} is already running")
        if not self._rates.allow(ip):
            raise Overloaded(f"too many reachability checks from {ip}; at most {CHECKS_PER_IP_PER_MIN:.0f} a minute")
        address = format_address(ip, port)
        self._busy.add(ip)
        try:
            error = await self._dial(ip, port, address)
        finally:
            self._busy.discard(ip)
        log.info("reachability of %s: %s", address, error or "reachable")
        return dht_pb2.CheckReachableResponse(reachable=not error, observed_address=address, error=error)

    async def _dial(self, ip: str, port: int, address: str) -> str:
        """'' if reachable, else why not."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), self.timeout_s)
        except TimeoutError:
            return f"no answer from {address} within {self.timeout_s:.0f} s (filtered: NAT or a firewall)"
        except OSError as e:
            return f"cannot connect to {address}: {e.strerror or e}"
        writer.close()
        if self.security.tls is not None:
            return ""
        channel = open_channel(address, 1 << 20, self.security)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            # Any gRPC answer (NOT_FOUND for an unknown service...) shows a gRPC server; no answer does not.
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"{address} accepts TCP but no gRPC server answers there: {e.code().name}"
        finally:
            await channel.close()
        return ""
