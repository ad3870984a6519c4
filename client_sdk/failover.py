"""Failover bounded by time: what a request does after a server failed it, shared by Forward/Backward (remote.py).

Under churn a client meets servers that died a moment ago while their DHT records are still live. Each one is
banned at its first failure and skipped; the client re-reads the DHT for a route around it and keeps going as
long as some route exists, within `failover_budget_s` from the request's first failure (a count of retries runs
out after meeting a few such dead servers even though a live replica holds the blocks the whole time). When
every holder of some blocks failed recently, the recently failed ones are tried again as a last resort (a server
restarted with its identity is back; a dead one fails fast), and while there is no route at all the DHT is
polled until the budget is spent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from client_sdk.routing import RouteCosts, Span
from swarm.errors import DhtUnavailable, MissingBlocks, PollenError

if TYPE_CHECKING:
    from client_sdk.directory import SwarmView

log = logging.getLogger(__name__)

MIN_ROUTE_POLL_S = 0.2  # between two route requests that found nothing: records and bans change over seconds


class FailoverBudget:
    """The failovers of one request (a call or a hop): how many so far, and the time left of `budget_s`, counted
    from the first failure."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s = budget_s
        self.failures = 0
        self._clock = clock
        self._since: float | None = None

    def left_s(self) -> float:
        """Seconds left; the clock starts at the first call (the first failure)."""
        now = self._clock()
        if self._since is None:
            self._since = now
        return self.budget_s - (now - self._since)

    def spent_s(self) -> float:
        return 0.0 if self._since is None else self._clock() - self._since

    def fail(self, error: PollenError) -> float:
        """Count a failure; raise `error` if it cannot be retried or the budget is spent, else the time left."""
        left = self.left_s()
        if not error.retryable or left <= 0:
            raise error
        self.failures += 1
        return left

    async def backoff(self, backoff_s: Callable[[int], float]) -> None:
        """Sleep before retry number `failures` (ClientConfig.backoff_s: none before the first), within the budget."""
        delay = min(backoff_s(self.failures), max(0.0, self.left_s()))
        if delay > 0:
            await asyncio.sleep(delay)


async def refresh_view(view: SwarmView) -> None:
    """Re-read the DHT (who left, who joined, who restarted elsewhere); on DhtUnavailable keep routing on what
    the view holds (the caller tries again within its budget)."""
    try:
        await view.refresh()
    except DhtUnavailable as e:
        log.warning("could not re-read the DHT (%s); routing on records %.0f s old", e, view.age_s())


async def fresh_route(
    view: SwarmView, start: int, end: int, *, mode: str, costs: RouteCosts | None = None, refresh: bool = True
) -> list[Span]:
    """A route for blocks [start, end) on freshly read records, past recent bans if there is none without them.
    Raises MissingBlocks (or ModelMismatch) when no server holds some of the blocks at all."""
    if refresh:
        await refresh_view(view)
    try:
        return view.route(start, end, costs, mode)
    except MissingBlocks:
        return view.route(start, end, costs, mode, ignore_bans=True)


async def reroute(
    view: SwarmView,
    start: int,
    end: int,
    budget: FailoverBudget,
    *,
    mode: str,
    backoff_s: Callable[[int], float],
    costs: RouteCosts | None = None,
) -> list[Span]:
    """After a failure (the caller banned the server and slept its backoff): a `fresh_route`, asked again while
    there is none (every holder gone or failed, the DHT unreachable for a moment) and the budget lasts; then the
    last error (MissingBlocks)."""
    attempt = budget.failures
    while True:
        try:
            return await fresh_route(view, start, end, mode=mode, costs=costs)
        except PollenError as e:
            if not e.retryable or budget.left_s() <= 0:
                raise
            log.info("no route for blocks %d:%d yet (%s); trying again for %.0f s", start, end, e, budget.left_s())
        attempt += 1
        await asyncio.sleep(min(max(MIN_ROUTE_POLL_S, backoff_s(attempt)), max(0.0, budget.left_s())))
