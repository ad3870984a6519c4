"""swarm.relay with real sockets on 127.0.0.1: a RelayService on a gRPC server, a RelayAgent attached to it,
an echo server standing in for the relayed server's gRPC port. Bytes through the lent port must come back
unchanged (large transfers exercise the per-connection window), and the relay's limits must hold."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import grpc
import pytest

from swarm.auth import SwarmKey
from swarm.net import PLAINTEXT, Security, bind_server, create_server, format_address, open_channel
from swarm.pb import relay_pb2, relay_pb2_grpc
from swarm.relay import RelayAgent, RelayEndpoint, RelayLimits, RelayService
from swarm.relay_mux import WINDOW, ByteRate


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Relay:
    def __init__(self, limits: RelayLimits, security: Security = PLAINTEXT) -> None:
        self.service = RelayService(limits, "127.0.0.1", "127.0.0.1")
        self.server = create_server(security=security)
        self.service.add_to_server(self.server)
        self.address = format_address("127.0.0.1", bind_server(self.server, "127.0.0.1:0"))

    async def __aenter__(self) -> Relay:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)
        await self.service.close()


async def _wait(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield format_address("127.0.0.1", server.sockets[0].getsockname()[1])
    server.close()


async def _roundtrip(address: str, payload: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        writer.write(payload)
        await writer.drain()

    sender = asyncio.create_task(send())
    got = await reader.readexactly(len(payload))
    await sender
    writer.close()
    return got


async def test_bytes_cross_the_relay_unchanged(echo: str) -> None:
    async with Relay(RelayLimits(max_bytes_per_s=0)) as relay:
        agent = RelayAgent(echo, lambda: _const([relay.address]), peer_id="p1")
        endpoint = await agent.attach()
        assert endpoint is not None and endpoint.relay == relay.address
        runner = asyncio.create_task(agent.run())
        try:
            # 4 MiB each way on 3 connections at once: many windows' worth, interleaved on one stream
            payloads = [os.urandom(8 * WINDOW) for _ in range(3)]
            results = await asyncio.gather(*(_roundtrip(endpoint.address, p) for p in payloads))
            assert [hashlib.sha256(r).hexdigest() for r in results] == [hashlib.sha256(p).hexdigest() for p in payloads]
            mux = relay.service.attached[endpoint.address]
            await _wait(lambda: not mux.conns)  # closed connections leave no state behind
            assert mux.bytes_in == mux.bytes_out == sum(len(p) for p in payloads)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_a_client_that_does_not_read_holds_back_only_its_own_connection(echo: str) -> None:
    async with Relay(RelayLimits(max_bytes_per_s=0)) as relay:
        agent = RelayAgent(echo, lambda: _const([relay.address]))
        endpoint = await agent.attach()
        assert endpoint is not None
        runner = asyncio.create_task(agent.run())
        host, _, port = endpoint.address.rpartition(":")
        try:
            _, stalled = await asyncio.open_connection(host, int(port))
            # echoed back to a client that never reads: more than the socket buffers hold
            stalled.write(os.urandom(48 * WINDOW))
            mux = relay.service.attached[endpoint.address]
            await _wait(lambda: bool(mux.conns) and next(iter(mux.conns.values())).queued_bytes > 0)
            # the other connection still gets through at once
            assert await _roundtrip(endpoint.address, b"x" * 1000) == b"x" * 1000
            # and nothing queues past the window on the relay or the agent, however much the client sent
            assert all(c.queued_bytes <= WINDOW for c in mux.conns.values())
            stalled.close()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_connections_over_the_limit_are_closed(echo: str) -> None:
    async with Relay(RelayLimits(max_connections=2, max_bytes_per_s=0)) as relay:
        agent = RelayAgent(echo, lambda: _const([relay.address]))
        endpoint = await agent.attach()
        assert endpoint is not None
        runner = asyncio.create_task(agent.run())
        host, _, port = endpoint.address.rpartition(":")
        try:
            held = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
            mux = relay.service.attached[endpoint.address]
            await _wait(lambda: len(mux.conns) == 2)
            reader, writer = await asyncio.open_connection(host, int(port))
            assert await reader.read(10) == b""  # the third is closed at once
            writer.close()
            for r, w in held:  # the first two still work
                w.write(b"ping")
                assert await r.readexactly(4) == b"ping"
                w.close()
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_servers_over_the_limit_try_the_next_relay(echo: str) -> None:
    # 4 slots, at most half of them for one IP (everyone is 127.0.0.1 here)
    async with Relay(RelayLimits(max_servers=4)) as full, Relay(RelayLimits()) as spare:
        agents = [RelayAgent(echo, lambda: _const([full.address, spare.address])) for _ in range(3)]
        endpoints = [await agent.attach() for agent in agents]
        assert [e.relay if e else None for e in endpoints] == [full.address, full.address, spare.address]
        for agent in agents:
            await agent.close()
        await _wait(lambda: full.service._slots == 0 and not full.service._slots_by_ip)


async def test_a_broken_stream_attaches_again_and_reports_the_new_endpoint(echo: str) -> None:
    changes: list[RelayEndpoint] = []

    async def on_change(endpoint: RelayEndpoint) -> None:
        changes.append(endpoint)

    async with Relay(RelayLimits()) as second:
        first = Relay(RelayLimits())
        await first.__aenter__()
        agent = RelayAgent(echo, lambda: _const([first.address, second.address]), on_change=on_change)
        endpoint = await agent.attach()
        assert endpoint is not None and endpoint.relay == first.address
        runner = asyncio.create_task(agent.run())
        try:
            await first.__aexit__()  # the relay goes away: its stream breaks
            await _wait(lambda: bool(changes))
            assert changes[0].relay == second.address
            assert await _roundtrip(changes[0].address, b"hello") == b"hello"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_a_private_swarms_relay_takes_only_its_members(echo: str) -> None:
    key = Security(SwarmKey.generate())
    async with Relay(RelayLimits(), key) as relay:
        stranger = RelayAgent(echo, lambda: _const([relay.address]))  # no key: UNAUTHENTICATED
        assert await stranger.attach() is None and not relay.service.attached
        member = RelayAgent(echo, lambda: _const([relay.address]), security=key)
        endpoint = await member.attach()
        assert endpoint is not None
        runner = asyncio.create_task(member.run())
        try:  # the lent port carries the client's own bytes (here not gRPC at all): no key needed there
            assert await _roundtrip(endpoint.address, b"members only") == b"members only"
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def test_a_peer_without_the_relay_service_is_skipped(echo: str) -> None:
    server = create_server()  # no Relay service: UNIMPLEMENTED
    address = format_address("127.0.0.1", bind_server(server, "127.0.0.1:0"))
    await server.start()
    try:
        agent = RelayAgent(echo, lambda: _const([address]))
        assert await agent.attach() is None
    finally:
        await server.stop(0)


async def test_attach_refuses_garbage_and_a_missing_hello() -> None:
    async with Relay(RelayLimits()) as relay:
        async with open_channel(relay.address) as channel:
            raw = channel.stream_stream("/pollen.v1.Relay/Attach", request_serializer=None,
                                        response_deserializer=None)  # fmt: skip
            call = raw()
            await call.write(b"\xff\xff\xff")  # not a RelayFrame
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            call = relay_pb2_grpc.RelayStub(channel).Attach()
            await call.write(relay_pb2.RelayFrame(conn_id=1, data=b"x"))  # data before hello
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in (err.value.details() or "")
        assert not relay.service.attached and relay.service._slots == 0


class _SlowWriteContext:
    """The relay side of an Attach stream whose writes complete late: the relayed server's answer to an `open`
    frame (a gRPC server speaks first) is read off the stream before the write of that frame returns, as
    happens on a loaded machine when both completions arrive together."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.frames: asyncio.Queue[relay_pb2.RelayFrame] = asyncio.Queue()
        self.frames.put_nowait(relay_pb2.RelayFrame(hello=relay_pb2.RelayHello(peer_id="p1")))
        self.address: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def read(self) -> relay_pb2.RelayFrame:
        return await self.frames.get()

    async def write(self, frame: relay_pb2.RelayFrame) -> None:
        if frame.WhichOneof("kind") == "attached":
            self.address.set_result(frame.attached.address)
        elif frame.WhichOneof("kind") == "open":
            self.frames.put_nowait(relay_pb2.RelayFrame(conn_id=frame.conn_id, data=self.greeting))
            for _ in range(10):  # the write's completion comes after the read loop took the answer
                await asyncio.sleep(0)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"Attach aborted: {code} {details}")


async def test_the_relayed_servers_first_bytes_are_not_lost_when_they_come_back_fast() -> None:
    service = RelayService(RelayLimits(max_bytes_per_s=0), "127.0.0.1", "127.0.0.1")
    context = _SlowWriteContext(b"server speaks first")
    attach = asyncio.create_task(service.Attach(None, context))  # type: ignore[arg-type]
    try:
        host, _, port = (await asyncio.wait_for(context.address, 10)).rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await asyncio.wait_for(reader.readexactly(19), 10) == b"server speaks first"
        writer.close()
    finally:
        attach.cancel()
        await asyncio.gather(attach, return_exceptions=True)
        await service.close()


async def test_byte_rate_waits_for_the_cost_of_what_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    rate = ByteRate(1000)
    await rate.spend(1000)  # the burst: free
    assert not slept
    await rate.spend(500)  # half a second's worth over the burst
    assert slept and 0.4 < slept[0] <= 0.5


def test_relay_ports_parse() -> None:
    assert RelayLimits.parse_ports("0") is None
    assert RelayLimits.parse_ports("40000-40009") == (40000, 40009)
    assert RelayLimits.parse_ports("40000") == (40000, 40000)
    with pytest.raises(ValueError, match="relay-ports"):
        RelayLimits.parse_ports("a-b")
    with pytest.raises(ValueError):
        RelayLimits(ports=(5, 4))


async def _const(items: list[str]) -> list[str]:
    return items


def test_relay_flags_on_both_commands() -> None:
    from dht_node.cli import parse_config
    from shard_server.cli import build_parser, config_from_args

    node = parse_config(["--bootstrap", "--relay", "--relay-ports", "40000-40009", "--relay-max-servers", "4"])
    assert node.relay == RelayLimits(max_servers=4, ports=(40000, 40009))
    assert parse_config(["--bootstrap"]).relay is None
    with pytest.raises(SystemExit):  # argparse's usage error, exit 2
        parse_config(["--bootstrap", "--relay", "--relay-ports", "9-1"])
    flags = ["--model", "m", "--relay", "--relay-max-bytes-per-s", "0", "--use-relay", "never"]
    args = build_parser().parse_args(flags)
    server = config_from_args(args)
    assert server.relay == RelayLimits(max_bytes_per_s=0) and server.use_relay == "never"
