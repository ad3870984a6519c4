"""The session cache's eviction of idle sessions for newcomers (issue 14 part 3): the pure rule (`pick_evictions`)
on plain sessions with `now` given, and SessionCache.open with its clock passed in. Budgets are in bytes with one
byte per token and one block, so a session's max_length is its reservation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shard_server.backend import KvHandle
from shard_server.cache import SessionCache
from shard_server.session import Session, pick_evictions
from swarm.blocks import BlockRange
from swarm.errors import CacheExhausted, SessionEvicted
from tests.servers import wait_until

ONE = BlockRange(0, 1)


class Running:
    """Stands in for a session's stream handler task: running until cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


def session(handle: int, nbytes: int, last_active: float, **kw: object) -> Session:
    s = Session(handle, f"s{handle}", ONE, nbytes, 1, nbytes, nbytes, KvHandle(ONE, 1, nbytes), last_active=last_active)
    s.task = Running()  # type: ignore[assignment]
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def ids(sessions: list[Session] | None) -> list[str] | None:
    return None if sessions is None else [s.session_id for s in sessions]


def test_rule_idle_longest_first_and_only_as_many_as_needed() -> None:
    sessions = [session(1, 30, last_active=50), session(2, 30, last_active=10), session(3, 30, last_active=30)]
    # need 50 with 0 free: the two idle longest (idle 90 and 70 s), not the third
    assert ids(pick_evictions(sessions, 50, 0, 10, idle_after_s=60, now=100)) == ["s2", "s3"]
    assert ids(pick_evictions(sessions, 30, 0, 10, idle_after_s=60, now=100)) == ["s2"]
    assert ids(pick_evictions(sessions, 45, 20, 10, idle_after_s=60, now=100)) == ["s2"]  # free room counts
    assert ids(pick_evictions(sessions, 30, 30, 10, idle_after_s=60, now=100)) == []  # fits already


def test_rule_evicts_nobody_when_that_cannot_make_room() -> None:
    sessions = [session(1, 30, last_active=0), session(2, 30, last_active=0), session(3, 30, last_active=95)]
    # s3 is idle only 5 s: s1 + s2 free 60 < 70, so evicting them would cost them a replay for nothing
    assert pick_evictions(sessions, 70, 0, 10, idle_after_s=60, now=100) is None
    assert ids(pick_evictions(sessions, 70, 10, 10, idle_after_s=60, now=100)) == ["s1", "s2"]
    assert pick_evictions(sessions, 10, 0, 10, idle_after_s=0, now=100) is None  # eviction off


def test_rule_never_evicts_a_session_mid_step_closing_or_without_a_stream() -> None:
    busy = session(1, 50, last_active=0, in_step=True)  # its last step ended long ago, but one runs now
    closing = session(2, 50, last_active=0, closed_reason="idle")
    setting_up = session(3, 50, last_active=0, task=None)  # between open and its handler taking over
    ended = session(4, 50, last_active=0)
    ended.task.cancel()  # type: ignore[union-attr]
    assert pick_evictions([busy, closing, setting_up, ended], 10, 0, 10, idle_after_s=1, now=100) is None
    exactly = session(5, 50, last_active=40)
    assert ids(pick_evictions([exactly], 10, 0, 10, idle_after_s=60, now=100)) == ["s5"]  # idle exactly 60 s


def test_rule_counts_the_session_limit() -> None:
    sessions = [session(1, 10, last_active=20), session(2, 10, last_active=10)]
    # bytes are free but no session slot is: one eviction gives one slot
    assert ids(pick_evictions(sessions, 10, 1000, 0, idle_after_s=60, now=100)) == ["s2"]
    assert ids(pick_evictions(sessions, 10, 1000, 1, idle_after_s=60, now=100)) == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def tasks() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Stand-in stream handlers (sleep until cancelled), cancelled at the end of the test."""
    made: list[asyncio.Task[None]] = []
    yield made
    for t in made:
        t.cancel()
    await asyncio.gather(*made, return_exceptions=True)


async def opened(cache: SessionCache, name: str, tokens: int, tasks: list[asyncio.Task[None]]) -> Session:
    """Open a session as the servicer does: admitted, then its handler task attached."""
    s = await cache.open(name, ONE, tokens, 1)
    s.task = asyncio.create_task(asyncio.sleep(3600))
    tasks.append(s.task)
    return s


async def test_open_evicts_the_longest_idle_session_and_its_stream_ends_with_session_evicted(
    tasks: list[asyncio.Task[None]],
) -> None:
    clock = Clock()
    cache = SessionCache(budget_bytes=100, alloc_timeout_s=0, evict_idle_after_s=60, clock=clock)
    evicted: list[str] = []
    cache.on_evict = lambda s: evicted.append(s.session_id)
    a = await opened(cache, "a", 40, tasks)
    clock.now += 10
    b = await opened(cache, "b", 40, tasks)
    clock.now += 10
    c = await opened(cache, "c", 20, tasks)
    with pytest.raises(CacheExhausted):  # nobody idle for 60 s yet: the old behaviour
        await cache.open("d", ONE, 40, 1)
    clock.now += 55  # a idle 75 s, b 65 s, c 55 s
    c.in_step = True
    d = await cache.open("d", ONE, 40, 1)
    assert evicted == ["a"] and cache.evictions == 1 and cache.used_bytes == 100
    assert a.closed_as is SessionEvicted and "evicted" in a.closed_reason and a.kv.cache is None
    with pytest.raises(asyncio.CancelledError):
        await a.task  # type: ignore[misc]
    cache.release(a)  # what its handler does on the way out: a no-op, the bytes went back at eviction
    assert cache.used_bytes == 100 and cache.active_sessions == 3
    # 60 more: b (65 s idle) would free only 40, c is mid-step, d has no handler: nobody is evicted
    with pytest.raises(CacheExhausted):
        await cache.open("e", ONE, 60, 1)
    assert not b.closed_reason and evicted == ["a"]
    for s in (b, c, d):
        cache.release(s)
    assert cache.used_bytes == 0


async def test_session_limit_is_made_room_for_too(tasks: list[asyncio.Task[None]]) -> None:
    clock = Clock()
    cache = SessionCache(budget_bytes=10**6, max_sessions=2, evict_idle_after_s=5, clock=clock)
    a = await opened(cache, "a", 4, tasks)
    clock.now += 1
    await opened(cache, "b", 4, tasks)
    clock.now += 10
    await cache.open("c", ONE, 4, 1)
    assert a.closed_as is SessionEvicted and cache.active_sessions == 2 and cache.evictions == 1


async def test_eviction_off_keeps_the_fifo_wait(tasks: list[asyncio.Task[None]]) -> None:
    clock = Clock()
    cache = SessionCache(budget_bytes=100, alloc_timeout_s=5, evict_idle_after_s=0, clock=clock)
    a = await opened(cache, "a", 100, tasks)
    clock.now += 10**6
    waiting = asyncio.create_task(cache.open("b", ONE, 100, 1))
    await wait_until(lambda: cache.waiting == 1, "the open to queue")
    cache.release(a)  # granted when room appears, as before
    b = await asyncio.wait_for(waiting, 5)
    assert b.session_id == "b" and cache.evictions == 0 and not a.closed_reason


async def test_a_waiting_open_is_served_once_a_session_has_been_idle_long_enough(
    tasks: list[asyncio.Task[None]],
) -> None:
    """The real clock: the newcomer waits (FIFO) and the cache wakes it when the session becomes evictable."""
    cache = SessionCache(budget_bytes=100, alloc_timeout_s=30, evict_idle_after_s=0.2)
    a = await opened(cache, "a", 100, tasks)
    newcomer = await asyncio.wait_for(cache.open("b", ONE, 100, 1), 30)
    assert a.closed_as is SessionEvicted and newcomer.session_id == "b" and cache.evictions == 1


async def test_free_room_plus_an_idle_session_serve_the_head_of_the_queue(tasks: list[asyncio.Task[None]]) -> None:
    clock = Clock()
    cache = SessionCache(budget_bytes=100, alloc_timeout_s=30, evict_idle_after_s=60, clock=clock)
    idle = await opened(cache, "idle", 50, tasks)
    busy = await opened(cache, "busy", 50, tasks)
    busy.in_step = True
    clock.now += 100
    waiting = asyncio.create_task(cache.open("new", ONE, 60, 1))
    await wait_until(lambda: cache.waiting == 1, "the open to queue")  # 50 evictable bytes are not enough
    assert not idle.closed_reason
    busy.in_step = False
    cache.release(busy)  # 50 free + the idle session's 50: the head is served at once
    new = await asyncio.wait_for(waiting, 5)
    assert idle.closed_as is SessionEvicted and new.session_id == "new" and cache.used_bytes == 60


async def test_the_idle_timeout_spares_a_session_mid_step(tasks: list[asyncio.Task[None]]) -> None:
    clock = Clock()
    cache = SessionCache(budget_bytes=100, clock=clock)
    busy, idle = await opened(cache, "busy", 10, tasks), await opened(cache, "idle", 10, tasks)
    busy.in_step = True  # a long prefill on a slow server
    assert cache.close_idle(timeout_s=300, now=clock.now + 301) == 1
    assert idle.closed_reason and not busy.closed_reason
