"""Private swarms: the swarm key, per-call proofs of it on gRPC, and per-IP limits on what a caller may ask.

A private swarm shares one secret file (`--swarm-key FILE` or `POLLEN_SWARM_KEY=FILE`, >= 32 random bytes,
hex or raw). The secret itself never travels: each use derives its own key (HKDF), so the gRPC proofs and the
DHT datagram MACs (dht_node/datagram.py) can never be confused with each other.

gRPC: `AuthClientInterceptor` adds to every call the metadata `pollen-auth: v1.<ms>.<nonce>.<mac>`, an HMAC over
(method, timestamp, nonce). `AccessInterceptor` on the server answers UNAUTHENTICATED to a call without a
valid, fresh, never-seen proof (nonces are remembered for the freshness window, in a bounded cache), and
RESOURCE_EXHAUSTED to an IP over its call rate. The gRPC health service stays open so that orchestrators can
probe a keyed server. Use both through swarm.net (open_channel, create_server), the one place that builds
channels and servers.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import secrets
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

SWARM_KEY_ENV = "POLLEN_SWARM_KEY"
MIN_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096
MIN_DISTINCT_BYTES = 12  # 32 random bytes have ~30 distinct values; fewer than 12 is a pattern, not a secret
AUTH_METADATA = "pollen-auth"
PROOF_VERSION = "v1"
FRESHNESS_S = 120.0  # a proof is accepted this long before and after its timestamp (clock skew between hosts)
REPLAY_CACHE_ENTRIES = 200_000  # ~30 MB at most; see ReplayCache for what happens when it is full
# Open without a proof: orchestrators (Kubernetes, compose) probe health without knowing the swarm key.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MAX_TRACKED_IPS = 8192


class SwarmKeyError(ValueError):
    """A missing, unreadable or weak swarm key file (the message says what to do)."""


def _keygen_hint() -> str:
    return "create one with `python -m swarm.auth FILE` (32 random bytes, hex, mode 0600)"


@dataclass(frozen=True, repr=False)
class SwarmKey:
    """The shared secret of a private swarm. repr and logs show only `key_id`, never the secret."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key needs at least {MIN_KEY_BYTES} bytes, got {len(self.secret)}")
        if len(set(self.secret)) < MIN_DISTINCT_BYTES:
            raise SwarmKeyError(f"the swarm key is a repetitive pattern, not random bytes; {_keygen_hint()}")

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(secrets.token_bytes(MIN_KEY_BYTES))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SwarmKey:
        """Read a key file: >= 64 hex digits (whitespace ignored), or >= 32 raw bytes that are not text."""
        p = Path(path).expanduser()
        try:
            size = p.stat().st_size
            if size > MAX_KEY_FILE_BYTES:
                raise SwarmKeyError(f"swarm key file {p} is {size} bytes; a key file holds 32-2048 bytes")
            raw = p.read_bytes()
        except FileNotFoundError:
            raise SwarmKeyError(f"swarm key file {p} does not exist; {_keygen_hint()}") from None
        except OSError as e:
            raise SwarmKeyError(f"cannot read swarm key file {p}: {e.strerror or e}") from None
        if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("swarm key file %s is readable by others; chmod 600 it", p)
        text = b"".join(raw.split())
        try:
            hex_text = text.decode("ascii")
            secret = bytes.fromhex(hex_text) if hex_text and len(hex_text) % 2 == 0 else None
        except ValueError:  # not ASCII, or not hex
            secret = None
        if secret is None:
            if raw.isascii() and all(32 <= b < 127 or b in b"\t\r\n" for b in raw):
                raise SwarmKeyError(
                    f"swarm key file {p} holds text that is not hex (a passphrase?); a key must be random: "
                    + _keygen_hint()
                )
            secret = raw
        try:
            return cls(secret)
        except SwarmKeyError as e:
            raise SwarmKeyError(f"swarm key file {p}: {e}") from None

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the key as hex to a new file with mode 0600 (refuses to overwrite)."""
        fd = os.open(Path(path).expanduser(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.secret.hex() + "\n")

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for one use (HKDF-SHA256): a MAC key for datagrams cannot forge call proofs."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"pollen-v1 {purpose}".encode())
        return hkdf.derive(self.secret)

    @property
    def key_id(self) -> str:
        """8 hex digits naming the key in logs: two processes with different ids are in different swarms."""
        return self.derive("key-id")[:4].hex()

    def __repr__(self) -> str:
        return f"SwarmKey(id={self.key_id})"


def load_swarm_key(path: str | None, env: Mapping[str, str] | None = None) -> SwarmKey | None:
    """The key from `path`, else from the file named by $POLLEN_SWARM_KEY, else None (an open swarm)."""
    env = os.environ if env is None else env
    if path:
        return SwarmKey.from_file(path)
    from_env = env.get(SWARM_KEY_ENV, "").strip()
    if not from_env:
        return None
    if not Path(from_env).expanduser().is_file():
        raise SwarmKeyError(f"${SWARM_KEY_ENV} must name a key file; {from_env[:64]!r} is not a file")
    return SwarmKey.from_file(from_env)


# ---- per-call proofs ----


class CallSigner:
    """Makes the `pollen-auth` value of one call."""

    def __init__(self, key: SwarmKey, clock: Callable[[], float] = time.time) -> None:
        self._mac_key = key.derive("grpc-call")
        self._clock = clock

    def proof(self, method: str) -> str:
        stamp = str(int(self._clock() * 1000))
        nonce = secrets.token_hex(16)
        return f"{PROOF_VERSION}.{stamp}.{nonce}.{_call_mac(self._mac_key, method, stamp, nonce)}"


def _call_mac(mac_key: bytes, method: str, stamp: str, nonce: str) -> str:
    message = f"{method}\n{stamp}\n{nonce}".encode()
    return hmac.digest(mac_key, message, hashlib.sha256)[:16].hex()


class ReplayCache:
    """Nonces seen within the freshness window. Bounded: when full, the oldest entry is dropped and every
    proof not newer than it is refused from then on (`floor_ms`), so a dropped nonce can never be replayed."""

    def __init__(self, max_entries: int = REPLAY_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> proof timestamp (ms), in arrival order
        self.floor_ms = 0

    def add(self, nonce: str, stamp_ms: int, now_ms: int, window_ms: int) -> bool:
        """False if the nonce was seen (a replay) or the proof is not newer than an evicted one."""
        while self._seen:  # forget nonces whose proofs can no longer pass the freshness check anyway
            oldest, ts = next(iter(self._seen.items()))
            if ts + window_ms >= now_ms:
                break
            del self._seen[oldest]
        if stamp_ms <= self.floor_ms or nonce in self._seen:
            return False
        self._seen[nonce] = stamp_ms
        if len(self._seen) > self.max_entries:
            _, evicted = self._seen.popitem(last=False)
            self.floor_ms = max(self.floor_ms, evicted)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class CallVerifier:
    """Checks `pollen-auth` values; `problem()` returns None for a valid proof, else why it is refused."""

    def __init__(
        self,
        key: SwarmKey,
        window_s: float = FRESHNESS_S,
        clock: Callable[[], float] = time.time,
        cache_entries: int = REPLAY_CACHE_ENTRIES,
    ) -> None:
        self._mac_key = key.derive("grpc-call")
        self.window_ms = int(window_s * 1000)
        self._clock = clock
        self.replays = ReplayCache(cache_entries)

    def problem(self, method: str, value: str | bytes | None) -> str | None:
        if value is None:
            return "this swarm needs a swarm key: the call carries no proof (pollen-auth metadata)"
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != PROOF_VERSION or not parts[1].isdigit() or len(parts[2]) != 32:
            return "malformed pollen-auth proof"
        _, stamp, nonce, mac = parts
        if not hmac.compare_digest(mac, _call_mac(self._mac_key, method, stamp, nonce)):
            return "wrong swarm key (the call's proof does not verify)"
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - int(stamp)) > self.window_ms:
            return f"stale proof: its timestamp is {abs(now_ms - int(stamp)) / 1000:.0f} s off (check the clocks)"
        if not self.replays.add(nonce, int(stamp), now_ms, self.window_ms):
            return "replayed proof (this nonce was used before)"
        return None


class AuthClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds a fresh proof of the swarm key to every call of the channel it is installed on."""

    def __init__(self, key: SwarmKey) -> None:
        self.signer = CallSigner(key)

    def _with_proof(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(AUTH_METADATA, self.signer.proof(method))
        return details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_proof(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_proof(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_proof(details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_proof(details), request_iterator)


# ---- per-IP limits ----


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


def main(argv: list[str] | None = None) -> int:
    """`python -m swarm.auth FILE`: write a new random swarm key (hex, mode 0600) to FILE."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: python -m swarm.auth FILE   (writes a new swarm key; never overwrites)\n")
        return 2
    key = SwarmKey.generate()
    try:
        key.write(args[0])
    except FileExistsError:
        sys.stderr.write(f"{args[0]} exists; not overwriting a swarm key\n")
        return 1
    sys.stdout.write(f"wrote swarm key {key.key_id} to {args[0]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
