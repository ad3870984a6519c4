"""RecordStorage and the record wire form: merge, expiry, caps, validation, chunking. No sockets."""

from __future__ import annotations

import math

import pytest
import umsgpack

from dht_node.storage import (
    DATAGRAM_LIMIT_BYTES,
    MAX_VALUE_BYTES_LIMIT,
    Entry,
    InvalidRecord,
    RecordStorage,
    StorageLimits,
    merge_into,
    parse_wire_record,
    to_wire,
    wire_chunks,
)

KEY = b"k" * 20
T0 = 1_000_000.0  # explicit wall clock, so expiry needs no sleeping


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(limits: StorageLimits | None = None) -> tuple[RecordStorage, Clock]:
    clock = Clock()
    return RecordStorage(limits, clock=clock), clock


def test_merge_unions_subkeys() -> None:
    storage, _ = make()
    assert storage.merge(KEY, {"a": Entry(b"1", T0 + 10)})
    assert storage.merge(KEY, {"b": Entry(b"2", T0 + 10)})
    assert storage.get_record(KEY) == {"a": Entry(b"1", T0 + 10), "b": Entry(b"2", T0 + 10)}


def test_later_expiration_wins_in_either_order() -> None:
    storage, _ = make()
    storage.merge(KEY, {"a": Entry(b"new", T0 + 20)})
    # an older expiration is not a refusal: the node already holds something newer
    assert storage.merge(KEY, {"a": Entry(b"old", T0 + 10)})
    assert storage.get_record(KEY)["a"].value == b"new"
    storage.merge(KEY, {"a": Entry(b"newer", T0 + 30)})
    assert storage.get_record(KEY)["a"] == Entry(b"newer", T0 + 30)


def test_equal_expiration_ties_break_the_same_way_everywhere() -> None:
    x, y = Entry(b"x", T0 + 5), Entry(b"y", T0 + 5)
    one: dict[str, Entry] = {}
    two: dict[str, Entry] = {}
    merge_into(one, {"a": x}, T0)
    merge_into(one, {"a": y}, T0)
    merge_into(two, {"a": y}, T0)
    merge_into(two, {"a": x}, T0)
    assert one == two


def test_expired_subkeys_vanish() -> None:
    storage, clock = make()
    storage.merge(KEY, {"short": Entry(b"s", T0 + 1), "long": Entry(b"l", T0 + 100)})
    clock.now = T0 + 1  # expiration is exclusive: at T0+1 "short" is gone
    assert set(storage.get_record(KEY)) == {"long"}
    clock.now = T0 + 100
    assert storage.get_record(KEY) == {}
    assert storage.get(KEY) is None
    with pytest.raises(KeyError):
        storage[KEY]
    assert len(storage) == 0


def test_already_expired_store_is_ignored_not_refused() -> None:
    storage, _ = make()
    assert storage.merge(KEY, {"a": Entry(b"1", T0 - 1)})
    assert storage.get_record(KEY) == {}


def test_cull_drops_expired_keys() -> None:
    storage, clock = make()
    storage.merge(b"a" * 20, {"x": Entry(b"1", T0 + 1)})
    storage.merge(b"b" * 20, {"x": Entry(b"1", T0 + 50)})
    clock.now = T0 + 2
    assert storage.cull() == 1
    assert [key for key, _ in storage] == [b"b" * 20]


def test_subkey_cap_refuses_new_subkeys_but_allows_updates() -> None:
    storage, _ = make(StorageLimits(max_subkeys_per_key=2))
    assert storage.merge(KEY, {"a": Entry(b"1", T0 + 10), "b": Entry(b"2", T0 + 10)})
    assert not storage.merge(KEY, {"c": Entry(b"3", T0 + 10)})
    assert storage.merge(KEY, {"a": Entry(b"1+", T0 + 20)})
    assert storage.get_record(KEY) == {"a": Entry(b"1+", T0 + 20), "b": Entry(b"2", T0 + 10)}


def test_key_cap_refuses_new_keys_until_one_expires() -> None:
    storage, clock = make(StorageLimits(max_keys=2))
    assert storage.merge(b"a" * 20, {"x": Entry(b"1", T0 + 5)})
    assert storage.merge(b"b" * 20, {"x": Entry(b"1", T0 + 50)})
    assert not storage.merge(b"c" * 20, {"x": Entry(b"1", T0 + 50)})
    assert storage.merge(b"a" * 20, {"y": Entry(b"1", T0 + 5)})  # existing keys still take sub-keys
    clock.now = T0 + 6
    assert storage.merge(b"c" * 20, {"x": Entry(b"1", T0 + 50)})
    assert len(storage) == 2


def test_record_byte_cap() -> None:
    storage, _ = make(StorageLimits(max_value_bytes=1000, max_record_bytes=2500))
    assert storage.merge(KEY, {"a": Entry(b"x" * 1000, T0 + 10), "b": Entry(b"x" * 1000, T0 + 10)})
    assert not storage.merge(KEY, {"c": Entry(b"x" * 1000, T0 + 10)})
    assert set(storage.get_record(KEY)) == {"a", "b"}


def test_iter_older_than_lists_untouched_keys() -> None:
    storage, _ = make()
    storage.merge(KEY, {"a": Entry(b"1", T0 + 10)})
    assert storage.iter_older_than(3600) == []
    assert storage.iter_older_than(0) == [(KEY, {"a": Entry(b"1", T0 + 10)})]


def test_wire_round_trip() -> None:
    record = {"a": Entry(b"1", T0 + 10, b"pk", b"sig"), "b": Entry(b"2", T0 + 20)}
    wire = umsgpack.unpackb(umsgpack.packb(to_wire(record)))  # tuples come back as lists
    assert parse_wire_record(wire, StorageLimits(), T0) == record
    # the 2-element form is accepted too
    assert parse_wire_record({"a": [b"1", T0 + 10]}, StorageLimits(), T0) == {"a": Entry(b"1", T0 + 10)}


@pytest.mark.parametrize(
    "wire",
    [
        None,
        [1, 2],
        b"bytes",
        {"a": b"not a list"},
        {"a": [b"v"]},
        {"a": [b"v", T0 + 1, b"", b"", b"extra"]},
        {"a": ["str value", T0 + 1]},
        {"a": [b"v", "soon"]},
        {"a": [b"v", True]},
        {"a": [b"v", math.nan]},
        {"a": [b"v", math.inf]},
        {"a": [b"v", T0 + 10 * 365 * 24 * 3600]},
        {"a": [b"v" * 5000, T0 + 1]},
        {"a": [b"v", T0 + 1, "pk", b""]},
        {"a": [b"v", T0 + 1, b"", b"s" * 1000]},
        {"": [b"v", T0 + 1]},
        {1: [b"v", T0 + 1]},
        {"x" * 300: [b"v", T0 + 1]},
        {f"s{i}": [b"v", T0 + 1] for i in range(200)},
    ],
)
def test_malformed_wire_records_are_refused(wire: object) -> None:
    with pytest.raises(InvalidRecord):
        parse_wire_record(wire, StorageLimits(), T0)


def test_wire_chunks_fit_one_datagram() -> None:
    record = {f"peer-{i:03d}": Entry(b"x" * 900, T0 + 60, b"p" * 32, b"s" * 64) for i in range(40)}
    chunks = wire_chunks(record)
    assert len(chunks) > 1
    merged: dict[str, list[object]] = {}
    for chunk in chunks:
        request = umsgpack.packb(["store", (b"n" * 20, KEY, chunk)])
        assert len(request) <= DATAGRAM_LIMIT_BYTES
        merged.update(chunk)
    assert parse_wire_record(merged, StorageLimits(max_value_bytes=1000), T0) == record
    # the largest value the node accepts still fits, next to a maximal sub-key name
    big = {"s" * 256: Entry(b"v" * MAX_VALUE_BYTES_LIMIT, T0 + 1, b"p" * 128, b"s" * 128)}
    (chunk,) = wire_chunks(big)
    assert len(umsgpack.packb(["store", (b"n" * 20, KEY, chunk)])) <= DATAGRAM_LIMIT_BYTES


def test_limits_refuse_values_that_cannot_fit_a_datagram() -> None:
    with pytest.raises(ValueError, match="8 KiB"):
        StorageLimits(max_value_bytes=9000)
