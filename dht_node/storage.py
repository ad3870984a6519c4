"""Dictionary records held by one dht-node: key digest → {subkey: Entry(value, expiration, ...)}.

A store *merges* sub-keys (for one sub-key the later expiration wins), expired sub-keys vanish on read,
and caps bound what one peer can make us hold. This module also owns the record's UDP wire form and its
validation: everything that arrives over the overlay passes `parse_wire_record` before it is merged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import umsgpack
from kademlia.storage import IStorage

KEY_DIGEST_BYTES = 20  # sha1, Kademlia's id space
MAX_SUBKEY_BYTES = 256  # UTF-8 bytes of one sub-key name
MAX_PUBLIC_KEY_BYTES = 128
MAX_SIGNATURE_BYTES = 128
# rpcudp refuses requests over 8 KiB of packed (name, args); one store request carries the node id, the key
# digest and a chunk of sub-keys. This margin covers the non-record part of the request.
DATAGRAM_LIMIT_BYTES = 8192
STORE_OVERHEAD_BYTES = 128
STORE_CHUNK_BYTES = DATAGRAM_LIMIT_BYTES - STORE_OVERHEAD_BYTES
# The largest value that still fits one store request next to a maximal sub-key name and signature fields.
MAX_VALUE_BYTES_LIMIT = STORE_CHUNK_BYTES - MAX_SUBKEY_BYTES - MAX_PUBLIC_KEY_BYTES - MAX_SIGNATURE_BYTES - 64
# A find_value reply carries a whole record in one UDP datagram (at most 65,507 bytes on IPv4), next to
# k contacts; keeping a record below this leaves room for the contact list.
MAX_RECORD_BYTES = 56_000
# Expirations further ahead than this are refused: nothing in Pollen lives a week without a refresh, and
# an unbounded expiration would let one writer pin a sub-key forever.
MAX_TTL_S = 7 * 24 * 3600.0
# Tolerated clock skew between writer and node for "expiration too far ahead".
CLOCK_SKEW_S = 300.0
ENTRY_OVERHEAD_BYTES = 32  # msgpack headers and the float of one entry (an upper bound)


class Entry(NamedTuple):
    """One sub-key's payload. Expiration is absolute unix time: it must mean the same on every machine."""

    value: bytes
    expiration: float
    public_key: bytes = b""
    signature: bytes = b""

    def wins_over(self, other: Entry) -> bool:
        """Later expiration wins; ties break on content so that every node converges to the same entry."""
        return (self.expiration, self.value, self.signature) > (other.expiration, other.value, other.signature)


Record = dict[str, Entry]


class InvalidRecord(ValueError):
    """A record (from a peer or a client) with the wrong shape, types or sizes."""


@dataclass(frozen=True)
class StorageLimits:
    max_value_bytes: int = 4096  # one sub-key's value; fits ServerRecord's 4 KiB bound
    max_subkeys_per_key: int = 128  # e.g. servers announcing one block
    max_keys: int = 10_000  # distinct keys held by this node
    max_record_bytes: int = MAX_RECORD_BYTES  # one key's record, so a find_value reply fits a datagram
    max_ttl_s: float = MAX_TTL_S
    max_total_bytes: int = 64 << 20  # everything this node holds (upper bound of packed sizes)

    def __post_init__(self) -> None:
        if not 1 <= self.max_value_bytes <= MAX_VALUE_BYTES_LIMIT:
            raise ValueError(f"max_value_bytes must be in [1, {MAX_VALUE_BYTES_LIMIT}] (8 KiB UDP request limit)")
        if self.max_subkeys_per_key < 1 or self.max_keys < 1:
            raise ValueError("max_subkeys_per_key and max_keys must be at least 1")
        if not 1 <= self.max_record_bytes <= MAX_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be in [1, {MAX_RECORD_BYTES}]")
        if self.max_total_bytes < self.max_record_bytes:
            raise ValueError("max_total_bytes must be at least max_record_bytes")


def entry_bytes(subkey: str, entry: Entry) -> int:
    """Upper bound of the packed size of one sub-key, used for the per-record byte cap."""
    return len(subkey.encode()) + len(entry.value) + len(entry.public_key) + len(entry.signature) + ENTRY_OVERHEAD_BYTES


def merge_into(dst: Record, src: Record, now: float) -> None:
    """Merge `src` into `dst` in place, without caps: the winner per sub-key, expired entries skipped."""
    for subkey, entry in src.items():
        if entry.expiration <= now:
            continue
        current = dst.get(subkey)
        if current is None or entry.wins_over(current):
            dst[subkey] = entry


def live(record: Record, now: float) -> Record:
    return {subkey: entry for subkey, entry in record.items() if entry.expiration > now}


# ---- wire form: {subkey: [value, expiration, public_key, signature]} (msgpack turns tuples into lists) ----


def to_wire(record: Record) -> dict[str, list[Any]]:
    return {subkey: list(entry) for subkey, entry in record.items()}


def parse_wire_record(obj: object, limits: StorageLimits, now: float) -> Record:
    """Validate a record that came off the wire; raises InvalidRecord. Expired entries are dropped silently
    (a race with the clock, not an error)."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"record must be a map, got {type(obj).__name__}")
    if len(obj) > limits.max_subkeys_per_key:
        raise InvalidRecord(f"{len(obj)} sub-keys, over the cap of {limits.max_subkeys_per_key}")
    record: Record = {}
    for subkey, raw in obj.items():
        entry = _parse_wire_entry(subkey, raw, limits, now)
        if entry.expiration > now:
            record[subkey] = entry
    return record


def _parse_wire_entry(subkey: object, raw: object, limits: StorageLimits, now: float) -> Entry:
    if not isinstance(subkey, str) or not subkey or len(subkey.encode()) > MAX_SUBKEY_BYTES:
        raise InvalidRecord(f"sub-key must be a non-empty str of at most {MAX_SUBKEY_BYTES} bytes")
    if not isinstance(raw, list | tuple) or len(raw) not in (2, 4):
        raise InvalidRecord(f"entry of {subkey!r} must be [value, expiration(, public_key, signature)]")
    value, expiration = raw[0], raw[1]
    public_key, signature = (raw[2], raw[3]) if len(raw) == 4 else (b"", b"")
    if not isinstance(value, bytes) or len(value) > limits.max_value_bytes:
        raise InvalidRecord(f"value of {subkey!r} must be bytes of at most {limits.max_value_bytes}")
    # bool is an int subclass; a True expiration is garbage, not 1970-01-01T00:00:01.
    if isinstance(expiration, bool) or not isinstance(expiration, int | float) or not math.isfinite(expiration):
        raise InvalidRecord(f"expiration of {subkey!r} must be a finite number")
    if expiration > now + limits.max_ttl_s + CLOCK_SKEW_S:
        raise InvalidRecord(f"expiration of {subkey!r} is more than {limits.max_ttl_s:.0f} s ahead")
    if not isinstance(public_key, bytes) or len(public_key) > MAX_PUBLIC_KEY_BYTES:
        raise InvalidRecord(f"public_key of {subkey!r} must be bytes of at most {MAX_PUBLIC_KEY_BYTES}")
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE_BYTES:
        raise InvalidRecord(f"signature of {subkey!r} must be bytes of at most {MAX_SIGNATURE_BYTES}")
    return Entry(value, float(expiration), public_key, signature)


def wire_chunks(record: Record, budget_bytes: int = STORE_CHUNK_BYTES) -> list[dict[str, list[Any]]]:
    """Split a record into wire dicts that each pack to at most `budget_bytes`, so every store request stays
    under rpcudp's 8 KiB limit however many sub-keys the record has (republish sends whole records)."""
    chunks: list[dict[str, list[Any]]] = []
    current: dict[str, list[Any]] = {}
    used = 0
    for subkey, entry in sorted(record.items()):
        wire_entry = list(entry)
        size = len(umsgpack.packb(subkey)) + len(umsgpack.packb(wire_entry))
        if size > budget_bytes:
            raise InvalidRecord(f"sub-key {subkey!r} alone packs to {size} bytes, over {budget_bytes}")
        if current and used + size > budget_bytes:
            chunks.append(current)
            current, used = {}, 0
        current[subkey] = wire_entry
        used += size
    if current:
        chunks.append(current)
    return chunks


def record_bytes(record: Record) -> int:
    return sum(entry_bytes(subkey, entry) for subkey, entry in record.items())


@dataclass
class _Slot:
    record: Record
    touched: float  # monotonic time of the last store received or republish sent for this key
    name: str = ""  # the key itself (we index by its digest): republish and signature checks need it
    size: int = 0  # record_bytes(record), kept for the total-bytes cap
    due_at: float = math.inf  # monotonic time at which a holder's departure makes it due for republishing


class RecordStorage(IStorage):
    """This node's share of the DHT. Implements kademlia's IStorage so the stock protocol code can iterate it,
    but stores go through `merge`, which applies the caps and reports whether the record was accepted."""

    def __init__(self, limits: StorageLimits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or StorageLimits()
        self.clock = clock  # wall clock: expirations are absolute unix times
        self._slots: dict[bytes, _Slot] = {}
        self.total_bytes = 0

    def _set(self, key: bytes, slot: _Slot, record: Record) -> None:
        """Replace a slot's record, keeping the byte total right; an emptied slot is dropped."""
        size = record_bytes(record)
        self.total_bytes += size - slot.size
        slot.record, slot.size = record, size
        if not record:
            self._slots.pop(key, None)

    def merge(self, key: bytes, record: Record, name: str = "") -> bool:
        """Merge a validated record. Returns False if a cap refused any sub-key (the rest is still merged):
        the store then does not count as a replica."""
        now = self.clock()
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self.limits.max_keys or self.total_bytes >= self.limits.max_total_bytes:
                self.cull()
            if len(self._slots) >= self.limits.max_keys:
                return False
            slot = self._slots[key] = _Slot({}, time.monotonic())
        if name and not slot.name:
            slot.name = name
        current = live(slot.record, now)
        self._set(key, slot, current)
        if not current:
            self._slots[key] = slot  # _set dropped the empty slot; we are about to fill it
        size = slot.size
        accepted = True
        for subkey, entry in record.items():
            if entry.expiration <= now:
                continue
            old = current.get(subkey)
            if old is not None and not entry.wins_over(old):
                continue  # we already hold a newer entry: the store is satisfied, not refused
            grow = entry_bytes(subkey, entry) - (entry_bytes(subkey, old) if old is not None else 0)
            if (
                (old is None and len(current) >= self.limits.max_subkeys_per_key)
                or size + grow > self.limits.max_record_bytes
                or self.total_bytes + (size - slot.size) + grow > self.limits.max_total_bytes
            ):
                accepted = False
                continue
            current[subkey] = entry
            size += grow
        slot.touched, slot.due_at = time.monotonic(), math.inf
        self._set(key, slot, current)
        return accepted

    def get_record(self, key: bytes) -> Record:
        """Live sub-keys of `key` (a copy); {} if none."""
        slot = self._slots.get(key)
        if slot is None:
            return {}
        record = live(slot.record, self.clock())
        if len(record) != len(slot.record):
            self._set(key, slot, record)
        return dict(record)

    def name_of(self, key: bytes) -> str:
        slot = self._slots.get(key)
        return slot.name if slot is not None else ""

    def mark_due(self, key: bytes, delay_s: float = 0.0) -> None:
        """Make `key` due for republishing `delay_s` from now (one of its holders left). Every holder of the
        key notices the departure: random delays let the first one re-store it everywhere, and a store
        received in the meantime (that first holder's) cancels the others' republish (see `merge`)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.due_at = min(slot.due_at, time.monotonic() + delay_s)

    def cull(self) -> int:
        """Drop expired sub-keys and emptied keys; returns how many keys were dropped."""
        now = self.clock()
        dropped = 0
        for key in list(self._slots):
            slot = self._slots[key]
            record = live(slot.record, now)
            if len(record) != len(slot.record):
                self._set(key, slot, record)
            if not record:
                dropped += 1
        return dropped

    def mark_republished(self, key: bytes) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.touched, slot.due_at = time.monotonic(), math.inf

    def __len__(self) -> int:
        return len(self._slots)

    # ---- kademlia's IStorage interface ----

    def __setitem__(self, key: bytes, value: Record) -> None:
        self.merge(key, value)

    def __getitem__(self, key: bytes) -> Record:
        record = self.get_record(key)
        if not record:
            raise KeyError(key)
        return record

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.get_record(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, Record]]:
        """(key, record) for keys nobody stored or republished in the last `seconds_old` seconds, and keys
        made due by `mark_due` whose delay has passed."""
        now = time.monotonic()
        stale = [key for key, slot in self._slots.items() if slot.touched <= now - seconds_old or slot.due_at <= now]
        return [(key, record) for key in stale if (record := self.get_record(key))]

    def __iter__(self) -> Iterator[tuple[bytes, Record]]:  # type: ignore[override]
        return iter([(key, record) for key in list(self._slots) if (record := self.get_record(key))])
