"""The client's step path (InferenceSession) against toy shard servers on loopback: push and sequential modes,
failover replay (also beam-search reorders and one span replaced by two), push_failed notices, and a server
that dies right after replying.

The toy servers keep the `InferenceStep`/`Push` contract of proto/shard.proto but compute a toy model whose
every block depends on all earlier tokens, as attention does: block j maps x[batch, T, H] to
x + w_j * cumsum(x over all tokens so far). A replay that lost or duplicated a token, or applied a beam reorder
to the wrong rows, changes every later output. The reference runs the same blocks over whole sequences in plain
torch, and beam runs are compared with the same run without failures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
import torch

from client_sdk.routing import Span
from client_sdk.session import InferenceSession, SessionRouter
from client_sdk.transport import ChannelPool
from swarm.errors import ServerDraining
from swarm.net import ChannelCache, server_options
from swarm.pb import shard_pb2, shard_pb2_grpc
from swarm.records import ServerRecord
from swarm.tensors import from_proto, to_proto

HIDDEN = 4
NUM_BLOCKS = 4
MODEL = "toy"


def weight(block: int) -> float:
    return 0.05 * (block + 1)


def reference(x: torch.Tensor, start: int = 0, end: int = NUM_BLOCKS) -> torch.Tensor:
    """Blocks [start, end) over a whole sequence [batch, T, H] at once."""
    for j in range(start, end):
        x = x + weight(j) * x.cumsum(dim=1)
    return x


@dataclass
class ToySession:
    sums: list[torch.Tensor] | None = None  # per block: running sum of its inputs [batch, H]
    position: int = 0
    seen: set[str] = field(default_factory=set)
    queue: asyncio.Queue[shard_pb2.InferenceStepInput | None] = field(default_factory=asyncio.Queue)


class ToyShard(shard_pb2_grpc.ShardServicer):
    """Blocks [start, end) of the toy model. `die_at_step=k` aborts the stream when step k (0-based, per
    session) arrives; `die_after_reply=k` aborts right after replying to step k; `fail_push` reports
    push_failed instead of pushing."""

    def __init__(self, start: int, end: int, die_at_step: int = -1, die_after_reply: int = -1) -> None:
        self.start, self.end = start, end
        self.die_at_step, self.die_after_reply = die_at_step, die_after_reply
        self.fail_push = False
        self.sessions: dict[str, ToySession] = {}
        self.client_steps = 0  # steps that came on the client's stream (not pushed)
        self.dead = False
        self.address = ""
        self.channels = ChannelCache()

    async def InferenceStep(self, request_iterator: AsyncIterator[shard_pb2.InferenceRequest], context):  # type: ignore[no-untyped-def]
        if self.dead:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dead")
        first = await anext(aiter(request_iterator))
        sid = first.open.session_id
        session = self.sessions[sid] = ToySession()
        yield shard_pb2.InferenceResponse(opened=shard_pb2.InferenceOpened(session_id=sid))

        async def read_client() -> None:
            async for request in request_iterator:
                self.client_steps += 1
                session.queue.put_nowait(request.step)
            session.queue.put_nowait(None)

        reader = asyncio.ensure_future(read_client())
        try:
            steps = 0
            while (step := await session.queue.get()) is not None:
                if step.step_id in session.seen:
                    continue  # pushed and then sent by the client too: computed once
                if steps == self.die_at_step or self.dead:
                    self.dead = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server died")
                session.seen.add(step.step_id)
                out = self.compute(session, step)
                yield shard_pb2.InferenceResponse(
                    step=shard_pb2.InferenceStepOutput(
                        step_id=step.step_id, hidden=to_proto(out), position=session.position
                    )
                )
                if step.next_servers:
                    if self.fail_push or not await self.push(step, out):
                        yield shard_pb2.InferenceResponse(push_failed=shard_pb2.PushFailed(step_id=step.step_id))
                if steps == self.die_after_reply:
                    self.dead = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server died after replying")
                steps += 1
        finally:
            reader.cancel()

    def compute(self, session: ToySession, step: shard_pb2.InferenceStepInput) -> torch.Tensor:
        x = from_proto(step.hidden)  # [batch, t, H]
        if step.position != session.position and step.position != 0:
            raise ValueError(f"step at {step.position}, cache holds {session.position}")
        if step.position == 0 or session.sums is None:
            session.sums = [torch.zeros(x.shape[0], HIDDEN) for _ in range(self.start, self.end)]
        if step.HasField("hypo_ids"):
            rows = from_proto(step.hypo_ids)
            session.sums = [s.index_select(0, rows) for s in session.sums]
        for k, j in enumerate(range(self.start, self.end)):
            c = session.sums[k].unsqueeze(1) + x.cumsum(dim=1)  # [batch, t, H]
            session.sums[k] = c[:, -1]
            x = x + weight(j) * c
        session.position = step.position + x.shape[1]
        return x

    async def push(self, step: shard_pb2.InferenceStepInput, out: torch.Tensor) -> bool:
        hop = step.next_servers[0]
        nxt = shard_pb2.InferenceStepInput(step_id=step.step_id, position=step.position, hidden=to_proto(out))
        nxt.next_servers.extend(step.next_servers[1:])
        if step.HasField("hypo_ids"):  # the next span reorders its cache rows too
            nxt.hypo_ids.CopyFrom(step.hypo_ids)
        stub = shard_pb2_grpc.ShardStub(self.channels.get(hop.address))
        try:
            await stub.Push(shard_pb2.PushRequest(session_id=hop.session_id, step=nxt))
        except grpc.aio.AioRpcError:
            return False
        return True

    async def Push(self, request: shard_pb2.PushRequest, context):  # type: ignore[no-untyped-def]
        session = self.sessions.get(request.session_id)
        if session is None or self.dead:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
        session.queue.put_nowait(request.step)
        return shard_pb2.PushResponse()


@dataclass
class Swarm:
    servers: dict[str, ToyShard]  # by address
    grpc_servers: list[grpc.aio.Server]
    banned: list[str] = field(default_factory=list)

    def span(self, shard: ToyShard) -> Span:
        record = ServerRecord(
            peer_id=shard.address, address=shard.address, model_id=MODEL, start=shard.start, end=shard.end
        )
        return Span(shard.address, shard.address, shard.start, shard.end, record)

    def chain(self, *shards: ToyShard) -> list[Span]:
        return [self.span(s) for s in shards]

    def router(self, replacements: dict[tuple[int, int], list[ToyShard]]) -> SessionRouter:
        async def route(start: int, end: int) -> list[Span]:
            return self.chain(*replacements[(start, end)])

        return SessionRouter(route=route, on_failure=self.banned.append)


@pytest_asyncio.fixture
async def toy() -> AsyncIterator[tuple[Swarm, ChannelPool]]:
    swarm = Swarm({}, [])
    pool = ChannelPool()

    async def add(shard: ToyShard) -> ToyShard:
        server = grpc.aio.server(options=server_options())
        shard_pb2_grpc.add_ShardServicer_to_server(shard, server)
        shard.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        swarm.servers[shard.address] = shard
        swarm.grpc_servers.append(server)
        return shard

    swarm.add = add  # type: ignore[attr-defined]
    try:
        yield swarm, pool
    finally:
        await pool.close()
        await asyncio.gather(*(s.stop(None) for s in swarm.grpc_servers))
        await asyncio.gather(*(s.channels.close() for s in swarm.servers.values()))


def inputs(batch: int = 2, steps: int = 6, seed: int = 0) -> Iterator[torch.Tensor]:
    """A 5-token prefill, then one token per step: [batch, t, H] each."""
    gen = torch.Generator().manual_seed(seed)
    yield torch.randn(batch, 5, HIDDEN, generator=gen)
    for _ in range(steps):
        yield torch.randn(batch, 1, HIDDEN, generator=gen)


async def run(
    session: InferenceSession, xs: list[torch.Tensor], hypos: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    outs = []
    async with session:
        for k, x in enumerate(xs):
            outs.append(await session.step(x, hypo_ids=hypos[k] if hypos else None))
    return torch.cat(outs, dim=1)


def new_session(
    pool: ChannelPool,
    route: list[Span],
    router: SessionRouter | None = None,
    push: bool = True,
    failover_budget_s: float = 60.0,
) -> InferenceSession:
    return InferenceSession(
        pool, MODEL, route, max_length=64, batch_size=2, step_timeout_s=20, open_timeout_s=20,
        router=router, push=push, failover_budget_s=failover_budget_s,
    )  # fmt: skip


@pytest.mark.parametrize("push", [True, False])
async def test_chain_equals_reference(toy: tuple[Swarm, ChannelPool], push: bool) -> None:
    swarm, pool = toy
    a, b = await swarm.add(ToyShard(0, 2)), await swarm.add(ToyShard(2, 4))  # type: ignore[attr-defined]
    xs = list(inputs())
    out = await run(new_session(pool, swarm.chain(a, b), push=push), xs)
    assert torch.allclose(out, reference(torch.cat(xs, dim=1)), atol=1e-5)
    # With push the client writes every step to the first server only.
    assert (a.client_steps, b.client_steps) == ((len(xs), 0) if push else (len(xs), len(xs)))


@pytest.mark.parametrize("push", [True, False])
@pytest.mark.parametrize("which", ["first", "second"])
async def test_dead_server_is_replaced_and_replayed(toy: tuple[Swarm, ChannelPool], push: bool, which: str) -> None:
    """The failed span is re-routed to two servers that split its blocks; the outputs do not change."""
    swarm, pool = toy
    add = swarm.add  # type: ignore[attr-defined]
    a = await add(ToyShard(0, 2, die_at_step=3 if which == "first" else -1))
    b = await add(ToyShard(2, 4, die_at_step=3 if which == "second" else -1))
    lost = (0, 2) if which == "first" else (2, 4)
    halves = [await add(ToyShard(lost[0], lost[0] + 1)), await add(ToyShard(lost[0] + 1, lost[1]))]
    session = new_session(pool, swarm.chain(a, b), swarm.router({lost: halves}), push=push)
    xs = list(inputs())
    out = await run(session, xs)
    assert torch.allclose(out, reference(torch.cat(xs, dim=1)), atol=1e-5)
    dead = a if which == "first" else b
    assert swarm.banned == [dead.address]
    assert [f.span for f in session.failovers] == [f"{lost[0]}:{lost[1]}@{dead.address}"]
    assert session.failovers[0].at_position == 5 + 2  # prefill + two one-token steps before step 3
    # The first replacement got the whole history in one step (replay), the second its predecessor's output.
    assert all(len(s.sessions) == 1 for s in halves)


async def test_beam_reorders_survive_failover(toy: tuple[Swarm, ChannelPool]) -> None:
    swarm, pool = toy
    add = swarm.add  # type: ignore[attr-defined]
    xs = list(inputs(batch=3, steps=6, seed=1))
    hypos: list[torch.Tensor | None] = [None] + [
        torch.randint(0, 3, (3,), generator=torch.Generator().manual_seed(k)) for k in range(6)
    ]
    a, b = await add(ToyShard(0, 2)), await add(ToyShard(2, 4))
    expected = await run(new_session(pool, swarm.chain(a, b), push=False), xs, hypos)
    a2, spare = await add(ToyShard(0, 2, die_at_step=5)), await add(ToyShard(0, 2))
    b2 = await add(ToyShard(2, 4))
    session = new_session(pool, swarm.chain(a2, b2), swarm.router({(0, 2): [spare]}))
    session.batch_size = 3
    out = await run(session, xs, hypos)
    assert len(session.failovers) == 1
    assert torch.allclose(out, expected, atol=1e-5)


async def test_push_failed_notice_makes_the_client_send(toy: tuple[Swarm, ChannelPool]) -> None:
    swarm, pool = toy
    a, b, c = [await swarm.add(ToyShard(i, i + 1 if i < 2 else 4)) for i in (0, 1, 2)]  # type: ignore[attr-defined]
    b.fail_push = True
    xs = list(inputs())
    out = await run(new_session(pool, swarm.chain(a, b, c)), xs)
    assert torch.allclose(out, reference(torch.cat(xs, dim=1)), atol=1e-5)
    assert (a.client_steps, b.client_steps, c.client_steps) == (len(xs), 0, len(xs))


async def test_server_dying_after_its_reply_is_replaced_at_the_next_step(toy: tuple[Swarm, ChannelPool]) -> None:
    swarm, pool = toy
    add = swarm.add  # type: ignore[attr-defined]
    a, b, spare = await add(ToyShard(0, 2, die_after_reply=2)), await add(ToyShard(2, 4)), await add(ToyShard(0, 2))
    session = new_session(pool, swarm.chain(a, b), swarm.router({(0, 2): [spare]}))
    xs = list(inputs())
    out = await run(session, xs)
    assert torch.allclose(out, reference(torch.cat(xs, dim=1)), atol=1e-5)
    assert swarm.banned == [a.address] and len(spare.sessions) == 1


async def test_out_of_failover_time_raises_the_servers_error(toy: tuple[Swarm, ChannelPool]) -> None:
    swarm, pool = toy
    add = swarm.add  # type: ignore[attr-defined]
    a, b = await add(ToyShard(0, 2, die_at_step=2)), await add(ToyShard(2, 4))
    spare = await add(ToyShard(0, 2, die_at_step=0))
    session = new_session(pool, swarm.chain(a, b), swarm.router({(0, 2): [spare]}), failover_budget_s=1.0)
    with pytest.raises(ServerDraining):  # UNAVAILABLE maps to "the server is going away"
        await run(session, list(inputs()))
    with contextlib.suppress(Exception):
        await session.close()
