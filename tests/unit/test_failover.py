"""client_sdk.failover: a time budget from the first failure, routes on re-read records past recent bans, and
polling while no route exists until the budget is spent (a fake view and a fake clock; no sleeps that matter)."""

from __future__ import annotations

from typing import Any

import pytest

from client_sdk import failover
from client_sdk.failover import FailoverBudget, fresh_route, refresh_view, reroute
from swarm.errors import DhtUnavailable, InvalidRequest, MissingBlocks, ServerDraining


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeView:
    """Routes become available after `ready_after` refreshes; before that only banned servers hold the blocks
    when `banned_only`, else none at all."""

    def __init__(self, ready_after: int = 0, banned_only: bool = False, dht_down: bool = False) -> None:
        self.ready_after = ready_after
        self.banned_only = banned_only
        self.dht_down = dht_down
        self.refreshes = 0
        self.routes: list[tuple[int, int, bool]] = []

    async def refresh(self) -> None:
        if self.dht_down:
            raise DhtUnavailable("no dht-node answered")
        self.refreshes += 1

    def age_s(self) -> float:
        return 5.0

    def route(self, start: int, end: int, costs: Any = None, mode: str = "", ignore_bans: bool = False) -> list[str]:
        self.routes.append((start, end, ignore_bans))
        if self.refreshes >= self.ready_after:
            return [f"live {start}:{end}"]
        if self.banned_only and ignore_bans:
            return [f"recently failed {start}:{end}"]
        raise MissingBlocks(f"no server holds blocks {start}:{end}")


def test_budget_counts_time_from_the_first_failure() -> None:
    clock = Clock()
    budget = FailoverBudget(10.0, clock)
    clock.now += 50  # time before the first failure is not counted
    assert budget.fail(ServerDraining("gone")) == 10.0 and budget.failures == 1
    clock.now += 9.5
    assert budget.fail(ServerDraining("gone")) == pytest.approx(0.5) and budget.failures == 2
    clock.now += 1
    with pytest.raises(ServerDraining):
        budget.fail(ServerDraining("gone again"))
    with pytest.raises(InvalidRequest):  # never retried, whatever is left
        FailoverBudget(10.0, clock).fail(InvalidRequest("bad shape"))


async def test_fresh_route_rereads_and_falls_back_to_recently_failed_servers() -> None:
    view = FakeView(ready_after=5, banned_only=True)
    assert await fresh_route(view, 0, 2, mode="max_throughput") == ["recently failed 0:2"]  # type: ignore[arg-type]
    assert view.refreshes == 1 and view.routes == [(0, 2, False), (0, 2, True)]
    down = FakeView(dht_down=True)
    await refresh_view(down)  # type: ignore[arg-type]  # logged, not raised: routing goes on on old records
    assert await fresh_route(down, 1, 3, mode="max_throughput") == ["live 1:3"]  # type: ignore[arg-type]


async def test_reroute_polls_until_a_route_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failover, "MIN_ROUTE_POLL_S", 0.001)
    clock = Clock()
    budget = FailoverBudget(60.0, clock)
    budget.fail(ServerDraining("gone"))
    view = FakeView(ready_after=3)
    route = await reroute(view, 2, 4, budget, mode="max_throughput", backoff_s=lambda attempt: 0.0)  # type: ignore[arg-type]
    assert route == ["live 2:4"] and view.refreshes == 3


async def test_reroute_gives_up_when_the_budget_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failover, "MIN_ROUTE_POLL_S", 0.001)
    clock = Clock()
    budget = FailoverBudget(1.0, clock)
    budget.fail(ServerDraining("gone"))
    view = FakeView(ready_after=10**6)

    def backoff(attempt: int) -> float:
        clock.now += 0.4  # each poll "takes" 0.4 s of the budget
        return 0.0

    with pytest.raises(MissingBlocks):
        await reroute(view, 0, 4, budget, mode="max_throughput", backoff_s=backoff)  # type: ignore[arg-type]
    assert view.refreshes == 4  # polled at 0, 0.4 and 0.8 s, and a last time once the sleep reached the end
