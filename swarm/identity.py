"""Persistent Ed25519 peer identities and signed DHT sub-keys.

A peer's id is derived from its public key, and a signed sub-key must be that id: so only the holder of
the private key can write, replace or delete its own announcement, and no DHT node can forge one.
The signature covers (key, subkey, value, expiration) in an unambiguous length-prefixed encoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_DOMAIN = b"pollen-dht-record-v1"


def peer_id_of(public_key: bytes) -> str:
    """Peer id = first 20 bytes of sha256(public key), hex (40 characters)."""
    return hashlib.sha256(public_key).hexdigest()[:40]


def looks_like_peer_id(subkey: str) -> bool:
    """40 lowercase hex characters: the shape of peer_id_of(); such sub-keys are only valid when signed."""
    return len(subkey) == 40 and all(c in "0123456789abcdef" for c in subkey)


def signing_payload(key: str, subkey: str, value: bytes, expiration: float) -> bytes:
    parts = [_DOMAIN, key.encode(), subkey.encode(), value, struct.pack(">d", expiration)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


class Identity:
    """A peer's Ed25519 key pair."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Read the raw 32-byte private key at `path`, or create it there with mode 0600."""
        path = Path(path).expanduser()
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                log.warning("identity file %s is readable by others (mode %o); chmod 600 it", path, mode)
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ValueError(f"identity file {path} must hold a raw 32-byte Ed25519 private key, has {len(raw)}")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = identity._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        log.info("created identity %s at %s", identity.peer_id, path)
        return identity

    def sign(self, key: str, subkey: str, value: bytes, expiration: float) -> bytes:
        return self._private_key.sign(signing_payload(key, subkey, value, expiration))


def verify(key: str, subkey: str, value: bytes, expiration: float, public_key: bytes, signature: bytes) -> str | None:
    """None if the sub-key is validly signed by its owner, else the reason it is not."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
    if len(signature) != SIGNATURE_BYTES:
        return f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}"
    if subkey != peer_id_of(public_key):
        return f"sub-key {subkey[:48]!r} is not owned by this key (owner id {peer_id_of(public_key)})"
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, signing_payload(key, subkey, value, expiration)
        )
    except InvalidSignature:
        return "signature does not match (key, subkey, value, expiration)"
    return None
