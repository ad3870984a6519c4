"""What an open UDP port does before it answers: the swarm key's MAC on every datagram, and address validation.

Datagram MAC (private swarms): `tag(16) || stamp(8) || datagram`, tag = HMAC-SHA256(derived key, stamp ||
datagram)[:16], stamp = sender's unix time in ms. A node with a swarm key drops every datagram whose tag does
not verify or whose stamp is more than FRESHNESS_S away from its clock, so a node without the key can neither
ask (read) nor store (write), and two swarms with different keys on one machine never see each other. Without
a key datagrams go out as they are (the open-swarm wire of this version).

Address validation (QUIC's anti-amplification rule, RFC 9000 section 8): a UDP source address can be forged,
so a reply to an address that has not proven it receives our datagrams must not be more than 3x the request
that asked for it. An address is proven (`AddressGuard.verified`) when it answered a request we sent it, or
when its request carries a token we gave it: a reply that would be too large is replaced by a small RETRY
datagram carrying `token_for(address)`, and the requester repeats its request with the token (dht_node/wire.py).
Tokens are HMACs of the address under a per-process secret and expire after one or two TOKEN_EPOCH_S.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable

from swarm.auth import SwarmKey

log = logging.getLogger(__name__)

TAG_BYTES = 16
STAMP_BYTES = 8
FRESHNESS_S = 120.0  # a datagram older (or newer) than this by the receiver's clock is a replay or a bad clock
AMPLIFICATION_FACTOR = 3  # bytes out per byte in towards an unproven address (QUIC: 3)
TOKEN_BYTES = 16
TOKEN_EPOCH_S = 300.0  # a token is valid in the epoch it was made and the next one: 5 to 10 minutes
VERIFIED_TTL_S = 1800.0  # an address that proved itself is trusted to receive this long after it last did
MAX_VERIFIED = 65_536  # bounded LRU: the least recently proven address is forgotten first

Address = tuple[str, int]


class DatagramSeal:
    """Seals and opens datagrams with the swarm key's MAC; a no-op without a key."""

    def __init__(self, key: SwarmKey | None, clock: Callable[[], float] = time.time) -> None:
        self._mac_key = key.derive("dht-datagram") if key is not None else None
        self._clock = clock
        self.dropped = 0  # datagrams that failed the MAC or the freshness check
        self.stale = 0  # of those, datagrams with a valid MAC but a time stamp out of the window

    @property
    def keyed(self) -> bool:
        return self._mac_key is not None

    @property
    def overhead(self) -> int:
        return TAG_BYTES + STAMP_BYTES if self._mac_key is not None else 0

    def seal(self, datagram: bytes) -> bytes:
        if self._mac_key is None:
            return datagram
        body = struct.pack(">Q", int(self._clock() * 1000)) + datagram
        return hmac.digest(self._mac_key, body, hashlib.sha256)[:TAG_BYTES] + body

    def open(self, data: bytes) -> bytes | None:
        """The datagram inside `data`, or None if it is not sealed with our key or is not fresh."""
        if self._mac_key is None:
            return data
        if len(data) <= TAG_BYTES + STAMP_BYTES:
            self.dropped += 1
            return None
        tag, body = data[:TAG_BYTES], data[TAG_BYTES:]
        if not hmac.compare_digest(tag, hmac.digest(self._mac_key, body, hashlib.sha256)[:TAG_BYTES]):
            self.dropped += 1
            return None
        (stamp_ms,) = struct.unpack(">Q", body[:STAMP_BYTES])
        skew_s = self._clock() - stamp_ms / 1000
        if abs(skew_s) > FRESHNESS_S:
            self.dropped += 1
            self.stale += 1
            if self.stale & (self.stale - 1) == 0:  # 1st, 2nd, 4th...: a replay, or a clock that is off
                log.warning("dropped a datagram of this swarm stamped %.0f s off our clock (%d so far); "
                            "check the clocks (NTP) of the swarm's hosts", skew_s, self.stale)  # fmt: skip
            return None
        return body[STAMP_BYTES:]


class AddressGuard:
    """Which source addresses may receive replies larger than 3x their requests (see the module docstring)."""

    def __init__(self, secret: bytes | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = secret or os.urandom(32)
        self._clock = clock
        self._verified: OrderedDict[Address, float] = OrderedDict()  # address -> when it last proved itself
        self.retries_sent = 0  # replies replaced by a RETRY (token) datagram

    def _token(self, address: Address, epoch: int) -> bytes:
        message = f"{epoch}|{address[0]}|{address[1]}".encode()
        return hmac.digest(self._secret, message, hashlib.sha256)[:TOKEN_BYTES]

    def _epoch(self) -> int:
        return int(time.time() // TOKEN_EPOCH_S)

    def token_for(self, address: Address) -> bytes:
        return self._token(address, self._epoch())

    def token_valid(self, address: Address, token: object) -> bool:
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
            return False
        epoch = self._epoch()
        return any(hmac.compare_digest(token, self._token(address, e)) for e in (epoch, epoch - 1))

    def verify(self, address: Address) -> None:
        """`address` proved that it receives what we send it (it answered us, or showed a token)."""
        self._verified.pop(address, None)
        self._verified[address] = self._clock()
        if len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)

    def verified(self, address: Address) -> bool:
        since = self._verified.get(address)
        if since is None:
            return False
        if self._clock() - since > VERIFIED_TTL_S:
            del self._verified[address]
            return False
        return True

    def may_send(self, address: Address, request_bytes: int, reply_bytes: int) -> bool:
        """Whether a reply of `reply_bytes` may go to `address`, which sent `request_bytes`."""
        return reply_bytes <= AMPLIFICATION_FACTOR * request_bytes or self.verified(address)
