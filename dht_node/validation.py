"""What a dht-node checks before it holds or returns a sub-key: owner signatures and record schemas.

Every sub-key whose name is a peer id, and every sub-key at all on a strict node (the default), must carry
the writer's Ed25519 public key and a signature over (key, subkey, value, expiration), and the sub-key must
equal peer_id_of(public key). So only the holder of a private key can write, replace (with a later
expiration) or retract its own sub-key: a node cannot forge, overwrite or delete another server's
announcement. Values under the known key families must parse as their swarm.records schema.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

from dht_node.storage import Entry, Record
from swarm.identity import looks_like_peer_id, verify
from swarm.records import is_known_key, validate_value

log = logging.getLogger(__name__)

VERIFY_CACHE_SIZE = 16_384  # verified entries remembered: lookups see the same copy from k nodes


class RecordValidator:
    """Filters records to the sub-keys this node may accept; remembers recent verdicts (Ed25519 verify costs
    ~50 µs and a lookup meets each copy up to k times)."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self._verdicts: OrderedDict[bytes, str | None] = OrderedDict()

    def check_key(self, key: str) -> str | None:
        if self.strict and not is_known_key(key):
            return f"key {key[:64]!r} is not a Pollen record key (<model>.block.<i>, <model>.model, pollen.models)"
        return None

    def check_entry(self, key: str, subkey: str, entry: Entry) -> str | None:
        """None if the entry may be held, else why not."""
        fingerprint = hashlib.sha256(
            b"\0".join(
                [
                    key.encode(),
                    subkey.encode(),
                    entry.value,
                    repr(entry.expiration).encode(),
                    entry.public_key,
                    entry.signature,
                ]
            )  # fmt: skip
        ).digest()
        if fingerprint in self._verdicts:
            self._verdicts.move_to_end(fingerprint)
            return self._verdicts[fingerprint]
        verdict = self._check_uncached(key, subkey, entry)
        self._verdicts[fingerprint] = verdict
        if len(self._verdicts) > VERIFY_CACHE_SIZE:
            self._verdicts.popitem(last=False)
        return verdict

    def _check_uncached(self, key: str, subkey: str, entry: Entry) -> str | None:
        signed = bool(entry.public_key or entry.signature)
        if signed or self.strict or looks_like_peer_id(subkey):
            reason = verify(key, subkey, entry.value, entry.expiration, entry.public_key, entry.signature)
            if reason is not None:
                return reason
            signed = True
        return validate_value(key, subkey, entry.value, owned=signed)

    def filter(self, key: str, record: Record) -> tuple[Record, list[str]]:
        """(the acceptable sub-keys, reasons for those refused)."""
        key_reason = self.check_key(key)
        if key_reason is not None:
            return {}, [key_reason] if record else []
        good: Record = {}
        reasons = []
        for subkey, entry in record.items():
            reason = self.check_entry(key, subkey, entry)
            if reason is None:
                good[subkey] = entry
            else:
                reasons.append(f"{subkey[:16]}: {reason}")
        return good, reasons
