"""Many TCP connections over one Relay.Attach stream: the frame multiplexer both ends of a relay share.

Each relayed connection has a conn_id. Bytes read from its socket travel as `data` frames (<= CHUNK bytes);
the receiver queues them for its own socket and answers `ack` frames once they are written out (in batches). A sender
never has more than WINDOW unacknowledged bytes per connection (a per-connection window, as SSH channels
have), so one slow reader holds back only its own connection, never the shared stream, and every buffer is
bounded: at most WINDOW bytes queued per connection and direction. A peer that sends past the window breaks
the protocol and loses that connection (one log line). `close` ends a connection on both sides.

The whole stream shares gRPC's own HTTP/2 flow control on top: when the link is full, `send` waits, and so
does every socket reader behind it. An optional `ByteRate` (the relay's --relay-max-bytes-per-s) throttles
the bytes of all connections of one relayed server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from swarm.pb import relay_pb2

log = logging.getLogger(__name__)

CHUNK = 64 << 10  # bytes per data frame: well under every gRPC message limit of the swarm
WINDOW = 512 << 10  # unacknowledged bytes per connection and direction (= the most queued at the receiver)
# Written bytes are acknowledged in batches of this many, not per frame: a decode step is a few KiB, so per-frame
# acks would double the frames per token. No deadlock: a sender blocked on a full window has >= WINDOW bytes out,
# all of which the receiver writes out (its queue holds them), so its unacknowledged count passes this.
ACK_EVERY = WINDOW // 4

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
SendFrame = Callable[[relay_pb2.RelayFrame], Awaitable[None]]


class ByteRate:
    """A token bucket over bytes (burst: one second's worth): `await spend(n)` waits until n bytes may pass."""

    def __init__(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.rate = float(bytes_per_s)
        self._tokens = self.rate
        self._last = time.monotonic()
        self._lock = asyncio.Lock()  # one waiter at a time, so waiters are served in order

    async def spend(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # may go negative: a chunk larger than the burst waits for its whole cost
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


@dataclass
class _Conn:
    conn_id: int
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0  # received, not yet written to our socket (bounded by the peer's window)
    written_unacked: int = 0  # written to our socket, not yet acknowledged to the peer
    unacked: int = 0  # sent, not yet acknowledged by the peer
    window: asyncio.Event = field(default_factory=asyncio.Event)
    peer_closed: bool = False
    writer: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Mux:
    """One side of an Attach stream. The owner reads frames from the stream and hands them to `on_frame`
    (which never blocks); it registers connections with `add` (the relay: an accepted client socket; the
    relayed server: a connection to its own gRPC port, opened lazily so frames arriving meanwhile queue up)."""

    def __init__(self, send: SendFrame, name: str, rate: ByteRate | None = None) -> None:
        self._send = send
        self._send_lock = asyncio.Lock()  # one write at a time on a gRPC stream
        self.name = name  # for log lines: which relayed server
        self.rate = rate
        self.conns: dict[int, _Conn] = {}
        self.bytes_in = self.bytes_out = 0  # from / to our sockets (tests, logs)
        self._closed = False

    async def send(self, frame: relay_pb2.RelayFrame) -> None:
        async with self._send_lock:
            await self._send(frame)

    def add(self, conn_id: int, connect: Connect, *, announce: bool = False) -> None:
        """Relay `conn_id` to the socket `connect()` returns; frames for it may arrive before it connects.
        `announce`: first send the peer the `open` frame for it (the relay, for an accepted client)."""
        if self._closed or conn_id in self.conns:
            raise ValueError(f"connection {conn_id} cannot be added to {self.name}")
        conn = self.conns[conn_id] = _Conn(conn_id)
        conn.window.set()
        run = self._run(conn, connect, announce)
        conn.tasks.append(asyncio.create_task(run, name=f"relay-conn-{conn_id}"))

    def on_frame(self, frame: relay_pb2.RelayFrame) -> None:
        """Data, ack and close frames of known connections; frames of unknown (already closed) ones are dropped."""
        conn = self.conns.get(frame.conn_id)
        if conn is None:
            return
        kind = frame.WhichOneof("kind")
        if kind == "data":
            conn.queued_bytes += len(frame.data)
            if conn.queued_bytes > WINDOW:
                log.warning("relay %s: connection %d sent past its window; closing it", self.name, conn.conn_id)
                self._abort(conn)
                return
            conn.queue.put_nowait(frame.data)
        elif kind == "ack":
            conn.unacked = max(0, conn.unacked - frame.ack)
            if conn.unacked < WINDOW:
                conn.window.set()
        elif kind == "close":
            conn.peer_closed = True
            conn.queue.put_nowait(None)  # written out what came before, then closed

    async def close_all(self) -> None:
        """The stream ended: close every connection (no frames are sent any more)."""
        self._closed = True
        conns = list(self.conns.values())
        for conn in conns:
            conn.peer_closed = True  # nobody to tell
            self._abort(conn)
        await asyncio.gather(*(t for c in conns for t in c.tasks), return_exceptions=True)

    # ---- one connection ----

    def _abort(self, conn: _Conn) -> None:
        for task in conn.tasks:
            task.cancel()

    async def _run(self, conn: _Conn, connect: Connect, announce: bool) -> None:
        writer = None
        try:
            if announce:
                # Registered before the open frame leaves: the peer's first bytes (a gRPC server speaks first)
                # can be read off the stream before this write returns, and must find the connection.
                try:
                    await self.send(relay_pb2.RelayFrame(conn_id=conn.conn_id, open=True))
                except Exception as e:  # noqa: BLE001 - the stream is gone: this connection goes with it
                    log.debug("relay %s: connection %d: open not sent: %s", self.name, conn.conn_id, e)
                    conn.peer_closed = True  # nothing to tell the peer
                    return
            reader, writer = await connect()
            conn.writer = writer
            downstream = asyncio.create_task(self._downstream(conn, writer), name=f"relay-down-{conn.conn_id}")
            conn.tasks.append(downstream)
            upstream = asyncio.create_task(self._upstream(conn, reader), name=f"relay-up-{conn.conn_id}")
            conn.tasks.append(upstream)
            # Either direction ending ends the connection: gRPC never half-closes a TCP connection.
            done, _ = await asyncio.wait({downstream, upstream}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # a send on a stream that just ended: the connection ends with it, quietly
                if not task.cancelled() and task.exception() is not None:
                    log.debug("relay %s: connection %d: %s", self.name, conn.conn_id, task.exception())
        except (TimeoutError, OSError) as e:
            log.info("relay %s: connection %d failed: %s", self.name, conn.conn_id, e)
        finally:
            for task in conn.tasks[1:]:
                task.cancel()
            self.conns.pop(conn.conn_id, None)
            if writer is not None:
                writer.close()
            if not conn.peer_closed and not self._closed:
                with contextlib.suppress(Exception):  # the stream may be gone too
                    await self.send(relay_pb2.RelayFrame(conn_id=conn.conn_id, close=True))

    async def _upstream(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Our socket -> data frames, at most WINDOW bytes ahead of the peer's acks."""
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return
                self.bytes_in += len(data)
                if self.rate is not None:
                    await self.rate.spend(len(data))
                while conn.unacked >= WINDOW:
                    conn.window.clear()
                    await conn.window.wait()
                conn.unacked += len(data)
                await self.send(relay_pb2.RelayFrame(conn_id=conn.conn_id, data=data))

    async def _downstream(self, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        """Queued data frames -> our socket, each acknowledged once written out."""
        with contextlib.suppress(OSError):
            while True:
                data = await conn.queue.get()
                if data is None:
                    return
                if self.rate is not None:
                    await self.rate.spend(len(data))
                writer.write(data)
                await writer.drain()
                conn.queued_bytes -= len(data)
                self.bytes_out += len(data)
                conn.written_unacked += len(data)
                if conn.written_unacked >= ACK_EVERY:
                    ack, conn.written_unacked = conn.written_unacked, 0
                    await self.send(relay_pb2.RelayFrame(conn_id=conn.conn_id, ack=ack))
