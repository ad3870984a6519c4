"""Seeded mutations of valid protobuf messages, for fuzzing the servers' RPCs with malformed bytes.

`Mutator.mutate(msg)` returns (label, bytes): one to three structured edits of a copy of the message (a field set
to an extreme value, a tensor given a huge or negative shape or an unknown dtype, a repeated field blown up, a
field cleared) and/or a byte-level edit of its serialization (bit flips, truncation, unknown fields, random bytes,
another message type's bytes). The label names the edits, so a bad status can be traced to its cause.
Everything is drawn from the given `random.Random`: the same seed gives the same cases.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from swarm.pb import common_pb2

FD = FieldDescriptor
INT_TYPES = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_SINT32, FD.TYPE_SINT64, FD.TYPE_SFIXED32, FD.TYPE_SFIXED64}
UINT_TYPES = {FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64}
FLOAT_TYPES = {FD.TYPE_FLOAT, FD.TYPE_DOUBLE}
# Values a careless parser mishandles: zero, one, sign and width boundaries.
EXTREME_INTS = [0, 1, -1, 2, 7, 255, 2**15, 2**16, 2**31 - 1, -(2**31), 2**32 - 1, 2**40, 2**62, -(2**63), 2**63 - 1]
EXTREME_FLOATS = [0.0, -0.0, 1e-300, -1.0, 1e300, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e20]
DTYPE_VALUES = [0, 1, 2, 3, 4, 5, 6, 7, 99, 2**31 - 1, -1]
NASTY_STRINGS = ["", " ", "\x00", "../../etc/passwd", "é" * 300, "\u202e\ud7ff", "a" * 70_000, "%s%n{}", "0:4",
                 "127.0.0.1:1", "[::1]:1", "a:b:c", "x" * 40, "ﬀ" * 2000]  # fmt: skip


class Mutator:
    def __init__(self, rng: random.Random, other_messages: list[Message] | None = None) -> None:
        self.rng = rng
        self.other_messages = other_messages or []  # valid messages of other types ("wrong type" cases)
        self._structured: list[tuple[str, Callable[[Message], bool]]] = [
            ("shape", self._tensor_shape),
            ("dtype", self._tensor_dtype),
            ("data", self._tensor_data),
            ("int", self._scalar_int),
            ("float", self._scalar_float),
            ("string", self._scalar_string),
            ("bytes", self._scalar_bytes),
            ("repeat", self._repeat),
            ("clear", self._clear),
        ]
        self._raw: list[tuple[str, Callable[[bytes], bytes]]] = [
            ("bitflip", self._bitflip),
            ("truncate", self._truncate),
            ("unknown", self._unknown_fields),
            ("splice", self._splice),
        ]

    def mutate(self, msg: Message) -> tuple[str, bytes]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.03:
            return "random", rng.randbytes(rng.choice([1, 3, 16, 200, 5000]))
        if roll < 0.05 and self.other_messages:
            other = rng.choice(self.other_messages)
            return f"wrongtype:{other.DESCRIPTOR.name}", other.SerializeToString()
        labels: list[str] = []
        copy = type(msg)()
        copy.CopyFrom(msg)
        if roll < 0.75:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                name, edit = rng.choice(self._structured)
                if edit(copy):
                    labels.append(name)
        data = copy.SerializeToString()
        if roll >= 0.55 or not labels:
            name, raw = rng.choice(self._raw)
            data = raw(data)
            labels.append(name)
        return "+".join(labels), data

    # ---- field access ----

    def _fields(self, msg: Message, want: Callable[[FieldDescriptor], bool]) -> list[tuple[Message, FieldDescriptor]]:
        """(message, field) pairs of `msg` and its set sub-messages (recursively) for which `want` holds."""
        found: list[tuple[Message, FieldDescriptor]] = []
        for field in msg.DESCRIPTOR.fields:
            if want(field):
                found.append((msg, field))
            if field.type == FD.TYPE_MESSAGE:
                if _is_repeated(field):
                    for sub in getattr(msg, field.name):
                        found += self._fields(sub, want)
                elif msg.HasField(field.name):
                    found += self._fields(getattr(msg, field.name), want)
        return found

    def _tensors(self, msg: Message) -> list[Message]:
        found = [msg] if msg.DESCRIPTOR.full_name == common_pb2.Tensor.DESCRIPTOR.full_name else []
        for owner, field in self._fields(msg, lambda f: f.type == FD.TYPE_MESSAGE):
            if field.message_type.full_name != common_pb2.Tensor.DESCRIPTOR.full_name:
                continue
            if _is_repeated(field):
                found += list(getattr(owner, field.name))
            elif owner.HasField(field.name):
                found.append(getattr(owner, field.name))
        return found

    # ---- structured edits (True if something was changed) ----

    def _tensor_shape(self, msg: Message) -> bool:
        tensors = self._tensors(msg)
        if not tensors:
            return False
        t = self.rng.choice(tensors)
        shape = list(t.shape)  # type: ignore[attr-defined]
        rng = self.rng
        choice = rng.randrange(7)
        if choice == 0:
            shape = [rng.choice([2**31, 2**40, 2**62, 2**63 - 1]) for _ in shape or [0]]  # huge
        elif choice == 1 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([-1, -(2**63), 0])  # negative or empty
        elif choice == 2:
            shape = [1] * rng.choice([0, 1, 5, 64, 1000])  # wrong rank, same element count
        elif choice == 3:
            shape = shape[::-1]
        elif choice == 4 and shape:
            i = rng.randrange(len(shape))
            shape[i] *= rng.choice([2, 1024, 2**20])
        elif choice == 5:
            shape = [2**32 + 1, 2**32 + 1]  # overflows a 64-bit element count when multiplied
        else:
            shape = shape + [1]
        del t.shape[:]  # type: ignore[attr-defined]
        t.shape.extend(max(-(2**63), min(2**63 - 1, d)) for d in shape)  # type: ignore[attr-defined]  # int64
        return True

    def _tensor_dtype(self, msg: Message) -> bool:
        tensors = self._tensors(msg)
        if not tensors:
            return False
        value = self.rng.choice(DTYPE_VALUES)
        # An open proto3 enum keeps unknown values, but the Python API refuses negatives: serialize them raw.
        self.rng.choice(tensors).dtype = value if value >= 0 else 2**31 - 2  # type: ignore[attr-defined]
        return True

    def _tensor_data(self, msg: Message) -> bool:
        tensors = self._tensors(msg)
        if not tensors:
            return False
        t = self.rng.choice(tensors)
        data = bytes(t.data)  # type: ignore[attr-defined]
        choice = self.rng.randrange(5)
        if choice == 0:
            data = b""
        elif choice == 1:
            data = data[: self.rng.randrange(len(data) + 1)]
        elif choice == 2:
            data = data + self.rng.randbytes(self.rng.choice([1, 2, 4, 1024]))
        elif choice == 3:  # NaN / inf payloads of the right length (float32 patterns)
            pattern = self.rng.choice([struct.pack("<f", float("nan")), struct.pack("<f", float("inf")), b"\xff" * 4])
            data = pattern * (len(data) // 4) + data[len(data) // 4 * 4 :]
        else:
            data = self.rng.randbytes(len(data))
        t.data = data  # type: ignore[attr-defined]
        return True

    def _scalar_int(self, msg: Message) -> bool:
        fields = self._fields(msg, lambda f: f.type in INT_TYPES | UINT_TYPES | {FD.TYPE_ENUM})
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        value = self.rng.choice(EXTREME_INTS)
        if field.type in UINT_TYPES or field.type == FD.TYPE_ENUM:
            limit = 2**32 - 1 if field.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32) else 2**64 - 1
            value = abs(value) % (limit + 1)
            if field.type == FD.TYPE_ENUM:
                value = value % 2**31
        elif field.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            value = max(-(2**31), min(2**31 - 1, value))
        _set(owner, field, value, self.rng)
        return True

    def _scalar_float(self, msg: Message) -> bool:
        fields = self._fields(msg, lambda f: f.type in FLOAT_TYPES)
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        _set(owner, field, self.rng.choice(EXTREME_FLOATS), self.rng)
        return True

    def _scalar_string(self, msg: Message) -> bool:
        fields = self._fields(msg, lambda f: f.type == FD.TYPE_STRING)
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        _set(owner, field, self.rng.choice(NASTY_STRINGS), self.rng)
        return True

    def _scalar_bytes(self, msg: Message) -> bool:
        fields = self._fields(msg, lambda f: f.type == FD.TYPE_BYTES)
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        _set(owner, field, self.rng.randbytes(self.rng.choice([0, 1, 31, 32, 64, 65, 4096, 100_000])), self.rng)
        return True

    def _repeat(self, msg: Message) -> bool:
        """Blow a repeated field up: many copies of its first element (or of a fresh one)."""
        fields = self._fields(msg, _is_repeated)
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        values = getattr(owner, field.name)
        count = self.rng.choice([2, 17, 300, 3000])
        if field.type == FD.TYPE_MESSAGE:
            template = values[0] if len(values) else field.message_type._concrete_class()
            for _ in range(count):
                values.add().CopyFrom(template)
        else:
            template = values[0] if len(values) else _default(field)
            values.extend([template] * count)
        return True

    def _clear(self, msg: Message) -> bool:
        fields = self._fields(msg, lambda f: True)
        if not fields:
            return False
        owner, field = self.rng.choice(fields)
        owner.ClearField(field.name)
        return True

    # ---- byte-level edits ----

    def _bitflip(self, data: bytes) -> bytes:
        if not data:
            return b"\x80"  # a varint that never ends
        buf = bytearray(data)
        for _ in range(self.rng.choice([1, 1, 2, 4, 8, 32])):
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(8)
        return bytes(buf)

    def _truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data))] if data else b""

    def _unknown_fields(self, data: bytes) -> bytes:
        """Append fields the schema does not have (or known numbers with the wrong wire type)."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.choice([1, 2, 5])):
            number = rng.choice([1, 2, 3, 15, 16, 99, 1000, 2**29 - 1])
            wire = rng.choice([0, 1, 2, 5, 3, 4, 6, 7])  # 3/4: deprecated groups, 6/7: invalid
            out += _varint(number << 3 | wire)
            if wire == 0:
                out += _varint(rng.choice([0, 1, 2**63, 2**64 - 1]))
            elif wire == 1:
                out += rng.randbytes(8)
            elif wire == 2:
                n = rng.choice([0, 5, 300, 2**31, 2**62])  # the last two claim more bytes than follow
                out += _varint(n) + rng.randbytes(min(n, 300))
            elif wire == 5:
                out += rng.randbytes(4)
        return bytes(out)

    def _splice(self, data: bytes) -> bytes:
        """Two messages concatenated (proto merge: later scalars win, repeated fields add up) or a slice moved."""
        if self.rng.random() < 0.5 or len(data) < 4:
            return data + data
        a, b = sorted(self.rng.sample(range(len(data)), 2))
        return data[:a] + data[b:] + data[a:b]


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _default(field: FieldDescriptor) -> object:
    if field.type == FD.TYPE_STRING:
        return ""
    if field.type == FD.TYPE_BYTES:
        return b""
    if field.type in FLOAT_TYPES:
        return 0.0
    if field.type == FD.TYPE_BOOL:
        return False
    return 0


def _set(owner: Message, field: FieldDescriptor, value: object, rng: random.Random) -> None:
    """Set a scalar field, or one element of a repeated one (appending if it is empty)."""
    try:
        if _is_repeated(field):
            values = getattr(owner, field.name)
            if len(values):
                values[rng.randrange(len(values))] = value
            else:
                values.append(value)
        else:
            setattr(owner, field.name, value)
    except (ValueError, TypeError):
        pass  # out of the field's range for the Python API (e.g. a float32 overflow): skip this edit


def _varint(n: int) -> bytes:
    n &= 2**64 - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
