"""Fuzz every RPC of a gRPC service with mutated messages sent as raw bytes (generic calls, no serializer), so
malformed bytes reach the server's own parsing. Each case is one call; its final status is counted by code.

The RPCs are read from the service's descriptor, so an RPC added later is fuzzed too (from an empty message
when no builder in messages.py knows it). A case that ends in UNKNOWN/INTERNAL, or in an error without a
message, is listed with its mutation label. Our own deadline expiring counts as CLIENT_TIMEOUT (a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tests.soak.messages import ShardMessages
from tests.soak.mutate import Mutator
from tests.soak.report import BAD_CODES, FuzzResult, status_kind

CALL_TIMEOUT_S = 60.0  # far above any server-side wait (alloc timeout 10 s): expiring means a hang
REPLY_WAIT_S = 0.5  # in a bidi stream, how long a message may go without a reply before the next is written
# grpc.aio's stand-in for the server's status when a write raced the end of the call (grpc/grpc#36066)
MASKED = "Internal error from Core"


def service_methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, payloads: list[bytes]) -> tuple[str, str]:
    """Send the raw payloads as one call; (status code name, details)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            return await _lockstep(channel.stream_stream(path)(timeout=CALL_TIMEOUT_S), payloads)
        if method.client_streaming:
            call = channel.stream_unary(path)(iter(payloads), timeout=CALL_TIMEOUT_S)
        else:
            unary = channel.unary_stream(path) if method.server_streaming else channel.unary_unary(path)
            call = unary(payloads[0], timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
        return "OK", ""
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        if code == "DEADLINE_EXCEEDED" and "Deadline Exceeded" == (e.details() or ""):
            code = "CLIENT_TIMEOUT"  # grpc's own text: our deadline, not a server's StepTimeout
        return code, e.details() or ""


async def _lockstep(call: grpc.aio.StreamStreamCall, payloads: list[bytes]) -> tuple[str, str]:
    """Bidi streams: write one message, read its reply, then the next. grpc.aio replaces the server's status by
    "INTERNAL: Internal error from Core" when a write fails because the server already ended the call
    (grpc/grpc#36066); in lockstep we never write after the server's status, so we see its real one."""
    replies: asyncio.Queue[object] = asyncio.Queue()

    async def read_all() -> None:
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.put_nowait(reply)
        except grpc.aio.AioRpcError:
            pass
        replies.put_nowait(grpc.aio.EOF)

    reader = asyncio.create_task(read_all())
    try:
        for payload in payloads:
            await call.write(payload)
            try:  # a message may rightly get no reply (a repeated step id is dropped): then go on after a while
                if await asyncio.wait_for(replies.get(), REPLY_WAIT_S) is grpc.aio.EOF:
                    break
            except TimeoutError:
                continue
        await call.done_writing()
    except grpc.aio.AioRpcError:
        pass
    except (grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # writing after the call ended: its status below is the server's
    await reader
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        return "CLIENT_TIMEOUT", details
    if code == grpc.StatusCode.INTERNAL and details == MASKED:
        return "MASKED_BY_CLIENT", details  # the server's status is unknown, not INTERNAL
    return code.name, details or ""


async def fuzz_method(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    valid: Callable[[], list[Message]],
    mutator: Mutator,
    cases: int,
    process: str,
    concurrency: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> FuzzResult:
    """`cases` calls, each a valid call of `method` with one of its messages mutated."""
    result = FuzzResult(f"{method.containing_service.name}.{method.name}", process)
    rng = mutator.rng
    queue: asyncio.Queue[tuple[str, list[bytes]] | None] = asyncio.Queue(maxsize=2 * concurrency)

    async def produce() -> None:
        for i in range(cases):
            msgs = valid()
            # Streams: mostly the first message (open/request), else any later one.
            index = 0 if len(msgs) == 1 or rng.random() < 0.4 else rng.randrange(1, len(msgs))
            label, data = mutator.mutate(msgs[index])
            payloads = [m.SerializeToString() for m in msgs]
            payloads[index] = data
            if method.client_streaming and rng.random() < 0.05:
                payloads = payloads + [data] * rng.choice([2, 20])  # the same bad message again and again
            await queue.put((label, payloads))
            if on_progress is not None and i % 1000 == 999:
                on_progress(i + 1)
        for _ in range(concurrency):
            await queue.put(None)

    async def consume() -> None:
        while (item := await queue.get()) is not None:
            label, payloads = item
            code, details = await _call(channel, method, payloads)
            result.cases += 1
            result.statuses[code] += 1
            unclear = code != "OK" and not details.strip()
            if code in BAD_CODES or code == "CLIENT_TIMEOUT" or unclear:
                kind = status_kind(code, details or "(no message)")
                result.bad[kind] += 1
                result.examples.setdefault(kind, label)
                result.unclear += unclear

    await asyncio.gather(produce(), *(consume() for _ in range(concurrency)))
    if result.statuses["CLIENT_TIMEOUT"]:
        result.notes.append(f"FAIL: {result.statuses['CLIENT_TIMEOUT']} calls got no status in {CALL_TIMEOUT_S} s")
    return result


def builders_for(
    service: ServiceDescriptor, known: dict[str, Callable[[], list[Message]]]
) -> dict[str, Callable[[], list[Message]]]:
    """A valid-call builder for every RPC of the service: the known ones, else an empty request message."""
    out: dict[str, Callable[[], list[Message]]] = {}
    for method in service.methods:
        if method.name in known:
            out[method.name] = known[method.name]
        else:
            cls = message_factory.GetMessageClass(method.input_type)
            out[method.name] = lambda cls=cls: [cls()]  # type: ignore[misc]
    return out


class PushVictim:
    """A real session kept open on the Push target, so that pushes name a live session; reopened (under a new
    session id) whenever a pushed message ends it. `killed` counts how often someone else's push did."""

    def __init__(self, channel: grpc.aio.Channel, messages: ShardMessages) -> None:
        self.channel = channel
        self.messages = messages
        self.session_id = "fuzz-victim-0"
        self.killed = 0
        self.opened = 0
        self.replies = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.session_id = f"fuzz-victim-{self.opened}"
            self.opened += 1
            open_bytes = self.messages.open_request(self.session_id).SerializeToString()

            async def requests(data: bytes = open_bytes, stop: asyncio.Event = self._stop) -> AsyncIterator[bytes]:
                yield data
                await stop.wait()  # keep the stream (and the session) open until the fuzzing ends

            call = self.channel.stream_stream("/pollen.v1.Shard/InferenceStep")(requests())
            try:
                async for _ in call:
                    self.replies += 1
            except grpc.aio.AioRpcError:
                if not self._stop.is_set():
                    self.killed += 1
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._task, 10)


def seeded(seed: int, name: str) -> random.Random:
    """An independent stream of draws per target: a target's cases do not depend on which ran before it."""
    return random.Random(f"{seed}:{name}")
