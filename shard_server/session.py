"""One inference session's state on a shard server, and the pure rule that picks idle sessions to evict when a
newcomer does not fit the KV budget (the cache manager that applies it is cache.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shard_server.backend import KvHandle
from swarm.blocks import BlockRange
from swarm.errors import PollenError, SessionNotFound
from swarm.models.lora import LoraSet


@dataclass(eq=False)
class Session:
    """One inference stream's state on this server."""

    handle: int  # server-unique; client session ids may repeat (a client reopening after a failure)
    session_id: str  # chosen by the client; used in logs and error messages
    blocks: BlockRange  # a prefix [server.start, b) of the held range
    max_length: int
    batch_size: int
    reserved_tokens: int  # max_length × batch_size
    reserved_bytes: int  # what the preallocated KV buffers (and the client's LoRA) of this session may occupy
    kv: KvHandle = field(repr=False)  # its tensors are created on the worker at the first step
    lora: LoraSet | None = field(default=None, repr=False)  # adapter and/or client LoRA for every step
    length: int = 0  # tokens in the KV cache; the next step's position must be <= this
    last_active: float = field(default_factory=time.monotonic)  # when the last step ended (or the session opened)
    in_step: bool = False  # a step was taken and is not answered yet: never evicted meanwhile
    task: asyncio.Task[Any] | None = field(default=None, repr=False)  # the stream's handler, to end it
    closed_reason: str = ""  # set when the server ends the session (idle, evicted, moving blocks)
    closed_as: type[PollenError] = field(default=SessionNotFound, repr=False)  # the error its stream ends with

    def close(self, reason: str, error: type[PollenError] = SessionNotFound) -> None:
        """End the session's stream from outside it: the client gets `error` (NOT_FOUND) with `reason`."""
        if self.task is not None and not self.task.done():
            self.closed_reason = reason
            self.closed_as = error
            self.task.cancel()

    def evictable(self, idle_after_s: float, now: float) -> bool:
        """Idle (no step in flight, none for `idle_after_s`) and still running a stream that can be ended."""
        return (
            not self.in_step
            and not self.closed_reason
            and self.task is not None
            and not self.task.done()
            and now - self.last_active >= idle_after_s
        )


def pick_evictions(
    sessions: Iterable[Session],
    need_bytes: int,
    free_bytes: int,
    free_slots: int,
    idle_after_s: float,
    now: float,
) -> list[Session] | None:
    """The sessions to evict so that a session of `need_bytes` fits: idle at least `idle_after_s`, idle longest
    first, only as many as needed. `free_slots`: sessions the session limit still admits. None when even all
    evictable sessions would not make room (then none should go: evicting would cost them a replay for
    nothing), or when eviction is off (`idle_after_s` <= 0). An empty list: it fits already."""
    if idle_after_s <= 0:
        return None
    candidates = sorted((s for s in sessions if s.evictable(idle_after_s, now)), key=lambda s: s.last_active)
    victims: list[Session] = []
    for session in candidates:
        if free_bytes >= need_bytes and free_slots >= 1:
            break
        victims.append(session)
        free_bytes += session.reserved_bytes
        free_slots += 1
    return victims if free_bytes >= need_bytes and free_slots >= 1 else None
