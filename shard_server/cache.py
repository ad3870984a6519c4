"""SessionCache: the open inference sessions of one server and its KV-cache token budget.

A session reserves `max_length × batch_size` tokens when it opens and gives them back when its stream
ends. Reservation is up front so a session that was admitted never fails mid-generation for lack of room.
Only the event loop touches this object; the KV tensors themselves are created and mutated on the worker.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from swarm.blocks import BlockRange
from swarm.errors import CacheExhausted, ServerDraining

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    """One inference stream's state on this server."""

    handle: int  # server-unique; client session ids may repeat (a client reopening after a failure)
    session_id: str  # chosen by the client; used in logs and error messages
    blocks: BlockRange  # a prefix [server.start, b) of the held range
    max_length: int
    batch_size: int
    reserved_tokens: int
    length: int = 0  # tokens in the KV cache; the next step's position must be <= this
    cache: Any = field(default=None, repr=False)  # created on the worker at the first step


class SessionCache:
    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self._used_tokens = 0
        self._sessions: dict[int, Session] = {}
        self._handles = itertools.count(1)
        self._draining = False

    @property
    def tokens_left(self) -> int:
        return self.budget_tokens - self._used_tokens

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, blocks: BlockRange, max_length: int, batch_size: int) -> Session:
        """Admit a session or raise CacheExhausted/ServerDraining; the caller must `release` it."""
        if self._draining:
            raise ServerDraining("server is shutting down and accepts no new sessions; use another server")
        need = max_length * batch_size
        free = self.tokens_left
        if need > free:
            raise CacheExhausted(
                f"session {session_id!r} asks for {need} cache tokens (max_length {max_length} x batch "
                f"{batch_size}) but only {free} of {self.budget_tokens} are free"
            )
        session = Session(next(self._handles), session_id, blocks, max_length, batch_size, need)
        self._sessions[session.handle] = session
        self._used_tokens += need
        log.info(
            "session %s opened: blocks %s, max_length %d, batch %d, %d cache tokens left",
            session_id, blocks, max_length, batch_size, self.tokens_left,
        )  # fmt: skip
        return session

    def release(self, session: Session) -> None:
        """Free the session's reservation and drop its KV tensors; idempotent."""
        if self._sessions.pop(session.handle, None) is None:
            return
        self._used_tokens -= session.reserved_tokens
        session.cache = None
        log.info("session %s closed after %d tokens; %d cache tokens left", session.session_id, session.length,
                 self.tokens_left)  # fmt: skip

    def start_draining(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining
