"""What a node knows about its contacts' health: measured round trips, who is slow, who is dead.

* Round trips (RFC 6298's SRTT/RTTVAR per address, plus one estimate over all of them for addresses never
  measured): `rto(address)` is how long a lookup waits for an answer before it asks someone else. Waiting
  longer than that does not make an answer more likely, only the lookup slower.
* Suspect: a contact that let a lookup's wait run out. It is neither asked again nor handed out to others
  until it answers something (then it is healthy again) or its request times out for good (then it is dead).
* Dead: a contact whose request got no answer within the full rpc timeout. Remembered for DEAD_TTL_S, so
  that contacts other nodes still hand out are skipped without paying a timeout each, unless the contact
  talks to us again (a restart at the same address), which clears it at once.
* Last heard: when an address last answered or asked us something; the upkeep pings contacts silent for
  longer than STALE_AFTER_S, so that a node that died quietly leaves the routing table (and is no longer
  handed out) within about STALE_AFTER_S + the rpc timeout, even if nobody looked it up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Address = tuple[str, int]

MIN_RTO_S = 0.05  # a loaded event loop delays replies by tens of ms; below this, waits only cause extra requests
MAX_RTO_S = 1.0  # a contact slower than this is not waited for, whatever its history (its answer still counts)
INITIAL_RTT_S = 0.1  # before any sample: loopback to a continent away is 0.1-0.3 s
DEAD_TTL_S = 600.0
SUSPECT_TTL_S = 30.0  # a suspect whose request outlived this is treated normally again (bounded memory)
STALE_AFTER_S = 30.0
MAX_TRACKED = 16_384  # addresses per map, LRU-bounded: a flood of contacts cannot grow memory


class _Rtt:
    """RFC 6298 smoothing (alpha 1/8, beta 1/4)."""

    __slots__ = ("srtt", "rttvar")

    def __init__(self, sample: float) -> None:
        self.srtt, self.rttvar = sample, sample / 2

    def update(self, sample: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
        self.srtt = 0.875 * self.srtt + 0.125 * sample

    def rto(self) -> float:
        return self.srtt + 4 * self.rttvar


def _bounded_set(table: OrderedDict[Address, float], address: Address, value: float) -> None:
    table.pop(address, None)
    table[address] = value
    if len(table) > MAX_TRACKED:
        table.popitem(last=False)


class Liveness:
    def __init__(self, max_rto_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_rto_s = min(max_rto_s, MAX_RTO_S)  # never wait longer than the hard rpc timeout
        self._clock = clock
        self._rtts: OrderedDict[Address, _Rtt] = OrderedDict()
        self._overall = _Rtt(INITIAL_RTT_S)
        self._dead: OrderedDict[Address, float] = OrderedDict()  # address -> dead until
        self._suspect: OrderedDict[Address, float] = OrderedDict()  # address -> suspect since
        self._heard: OrderedDict[Address, float] = OrderedDict()  # address -> last heard

    # ---- round trips ----

    def sample(self, address: Address, rtt_s: float) -> None:
        rtt = self._rtts.pop(address, None)
        if rtt is None:
            rtt = _Rtt(rtt_s)
        else:
            rtt.update(rtt_s)
        self._rtts[address] = rtt
        if len(self._rtts) > MAX_TRACKED:
            self._rtts.popitem(last=False)
        self._overall.update(rtt_s)

    def rto(self, address: Address) -> float:
        """How long to wait for `address` before asking someone else (its own history, else everyone's)."""
        rtt = self._rtts.get(address) or self._overall
        return min(self.max_rto_s, max(MIN_RTO_S, rtt.rto()))

    # ---- health ----

    def heard(self, address: Address) -> None:
        """`address` answered us or asked us something: alive, not suspect, not dead."""
        self._dead.pop(address, None)
        self._suspect.pop(address, None)
        _bounded_set(self._heard, address, self._clock())

    def mark_suspect(self, address: Address) -> None:
        if address not in self._suspect:
            _bounded_set(self._suspect, address, self._clock())

    def mark_dead(self, address: Address) -> None:
        self._suspect.pop(address, None)
        _bounded_set(self._dead, address, self._clock() + DEAD_TTL_S)

    def is_dead(self, address: Address) -> bool:
        until = self._dead.get(address)
        if until is None:
            return False
        if until < self._clock():
            del self._dead[address]
            return False
        return True

    def is_suspect(self, address: Address) -> bool:
        since = self._suspect.get(address)
        if since is None:
            return False
        if self._clock() - since > SUSPECT_TTL_S:
            del self._suspect[address]
            return False
        return True

    def avoid(self, address: Address) -> bool:
        """Neither ask nor hand out this contact now."""
        return self.is_dead(address) or self.is_suspect(address)

    def silent_for(self, address: Address) -> float:
        """Seconds since `address` was last heard (inf if never)."""
        last = self._heard.get(address)
        return float("inf") if last is None else self._clock() - last

    @property
    def dead_count(self) -> int:
        return len(self._dead)
