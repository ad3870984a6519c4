"""Private swarms: the swarm key, per-call proofs of it on gRPC, and per-IP limits on what a caller may ask.

A private swarm shares one secret file (`--swarm-key FILE` or `POLLEN_SWARM_KEY=FILE`, >= 32 random bytes,
hex or raw). The secret itself never travels: each use derives its own key (HKDF), so the gRPC proofs and the
DHT datagram MACs (dht_node/datagram.py) can never be confused with each other.

gRPC: `auth_client_interceptors` add to every call the metadata `pollen-auth: v1.<ms>.<nonce>.<mac>`, an HMAC over
(method, timestamp, nonce). `CallVerifier` checks it on the server: a valid, fresh, never-seen proof (nonces
are remembered for the freshness window, in a bounded cache). swarm.access.AccessInterceptor answers
UNAUTHENTICATED to a call without one (the gRPC health service stays open so that orchestrators can probe a
keyed server). Use both through swarm.net (open_channel, create_server), the one place that builds channels
and servers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
        # Only access by *other* users is a leak: a group may hold the key on purpose (Kubernetes mounts secrets
        # 0440 with the pod's fsGroup, systemd's LoadCredential and Docker secrets similarly).
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & stat.S_IRWXO:
            log.warning("swarm key file %s (mode %04o) is accessible to other users; chmod o-rwx it", p, mode)
        text = b"".join(raw.split())
        if not text:
            raise SwarmKeyError(f"swarm key file {p} is empty; {_keygen_hint()}")
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


class _ProofAdder:
    """Adds a fresh proof of the swarm key to a call's metadata."""

    def __init__(self, signer: CallSigner) -> None:
        self.signer = signer

    def _with_proof(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(AUTH_METADATA, self.signer.proof(method))
        return details._replace(metadata=metadata)


# grpc.aio files each interceptor under the FIRST call kind it subclasses, so one class implementing all four
# would only ever see unary-unary calls (streams would go out without a proof): one small class per kind.
class _UnaryUnaryProof(_ProofAdder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_proof(details), request)


class _UnaryStreamProof(_ProofAdder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_proof(details), request)


class _StreamUnaryProof(_ProofAdder, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_proof(details), request_iterator)


class _StreamStreamProof(_ProofAdder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._with_proof(details), request_iterator)


def auth_client_interceptors(key: SwarmKey) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add a fresh proof of the swarm key to every call of a channel, of every kind."""
    signer = CallSigner(key)
    return [_UnaryUnaryProof(signer), _UnaryStreamProof(signer), _StreamUnaryProof(signer), _StreamStreamProof(signer)]


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
