"""What a caller may ask of a gRPC server: the swarm key's proof (swarm.auth) and per-IP limits.

`AccessInterceptor` (installed by swarm.net.create_server) answers UNAUTHENTICATED to a call without a valid
proof of the swarm key and RESOURCE_EXHAUSTED to an IP over its call rate or with too many unary calls in
flight. Health checks stay open. `RateLimiter` (token buckets per IP, LRU-bounded) is also what the dht-node
uses on UDP.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from swarm.auth import AUTH_METADATA, OPEN_METHODS, CallVerifier, SwarmKey

log = logging.getLogger(__name__)

MAX_TRACKED_IPS = 8192


class RateLimiter:
    """Token buckets by key (an IP address), in a bounded LRU: `allow(ip)` spends one token if there is one."""

    def __init__(self, rate_per_s: float, burst: float, max_tracked: int = MAX_TRACKED_IPS) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate, self.burst, self.max_tracked = rate_per_s, burst, max_tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.dropped = 0

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        if not ok:
            self.dropped += 1
        return ok


@dataclass(frozen=True)
class CallLimits:
    """What one IP may ask of a gRPC server: calls per second (burst: 5 s worth) and unary calls in flight."""

    calls_per_s: float = 200.0
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        if self.calls_per_s <= 0 or self.max_in_flight < 1:
            raise ValueError("calls_per_s must be positive and max_in_flight at least 1")


def peer_ip(peer: str) -> str:
    """gRPC's context.peer() ("ipv4:1.2.3.4:5", "ipv6:[::1]:5", "unix:...") → the IP (or the whole string)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


@dataclass
class _Gate:
    """The per-IP state of one server: rate buckets and unary calls in flight."""

    limits: CallLimits
    rates: RateLimiter = field(init=False)
    in_flight: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = RateLimiter(self.limits.calls_per_s, 5 * self.limits.calls_per_s)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Server side of private swarms and per-IP limits. Either part may be off (key=None, limits=None)."""

    def __init__(
        self, key: SwarmKey | None = None, limits: CallLimits | None = None, open_methods: frozenset[str] = OPEN_METHODS
    ) -> None:
        self.verifier = CallVerifier(key) if key is not None else None
        self.gate = _Gate(limits) if limits is not None else None
        self.open_methods = open_methods
        self.refused: dict[str, int] = {}  # status code name -> calls refused (for logs and tests)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method in self.open_methods:
            return handler
        denial = None
        if self.verifier is not None:
            proof = next((v for k, v in details.invocation_metadata or () if k == AUTH_METADATA), None)
            reason = self.verifier.problem(details.method, proof)
            if reason is not None:
                denial = (grpc.StatusCode.UNAUTHENTICATED, reason)
        if denial is None and self.gate is None:
            return handler  # nothing to check per call: the handler runs untouched
        return _guarded(handler, self, denial)

    def admit(
        self, context: grpc.aio.ServicerContext, denial: tuple[grpc.StatusCode, str] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """The refusal for this call, if any: the rate limit first (cheapest for a flood), then the proof."""
        if self.gate is not None:
            ip = peer_ip(context.peer() or "")
            if not self.gate.rates.allow(ip):
                denial = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many calls from {ip}; slow down")
        if denial is not None:
            name = denial[0].name
            self.refused[name] = self.refused.get(name, 0) + 1
            if self.refused[name] & (self.refused[name] - 1) == 0:  # 1st, 2nd, 4th...: a line, not a flood
                log.warning("refused a call from %s: %s (%d so far)", context.peer(), denial[1], self.refused[name])
        return denial

    def enter(self, context: grpc.aio.ServicerContext) -> str | None:
        """Count a unary call in flight; None if its IP has too many already."""
        if self.gate is None:
            return ""
        ip = peer_ip(context.peer() or "")
        n = self.gate.in_flight.get(ip, 0)
        if n >= self.gate.limits.max_in_flight:
            return None
        self.gate.in_flight[ip] = n + 1
        return ip

    def leave(self, ip: str) -> None:
        if self.gate is not None and ip:
            n = self.gate.in_flight.get(ip, 1) - 1
            if n:
                self.gate.in_flight[ip] = n
            else:
                self.gate.in_flight.pop(ip, None)


def _guarded(
    handler: grpc.RpcMethodHandler, access: AccessInterceptor, denial: tuple[grpc.StatusCode, str] | None
) -> grpc.RpcMethodHandler:
    """The same handler with the admission check in front. Unary calls are also counted in flight per IP;
    streams pass through an async generator (one extra hop per message, no copy)."""
    too_many = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in flight from your address")

    async def unary(behavior: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal = access.admit(context, denial)
        if refusal is not None:
            await context.abort(*refusal)
        ip = access.enter(context)
        if ip is None:
            await context.abort(*too_many)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            access.leave(ip or "")

    def streaming(behavior: Any) -> Any:
        if inspect.iscoroutinefunction(behavior):  # writes with context.write and returns None

            async def write_style(request: Any, context: grpc.aio.ServicerContext) -> None:
                refusal = access.admit(context, denial)
                if refusal is not None:
                    await context.abort(*refusal)
                await behavior(request, context)

            return write_style

        async def generator_style(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refusal = access.admit(context, denial)
            if refusal is not None:
                await context.abort(*refusal)
            async for response in behavior(request, context):
                yield response

        return generator_style

    def unary_style(behavior: Any) -> Any:
        # a coroutine function, so that gRPC awaits it instead of running it on a thread
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await unary(behavior, request, context)

        return call

    serde = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_style(handler.unary_unary), **serde)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary_style(handler.stream_unary), **serde)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serde)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serde)
