"""User-space WAN emulation for benchmarks (no `tc netem` here): a TCP proxy on 127.0.0.1 that delays every
chunk by a fixed one-way latency in each direction. It runs on its own event-loop thread so a blocking
benchmark can use it, and its target can be set after it starts listening (a server's port is known only
once it runs, but it must announce the proxy's address: `shard-server --public-address`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class DelayProxy:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.target: tuple[str, int] | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_target(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.target = (host, int(port))

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.target is None:
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def receive() -> None:
            try:
                while data := await reader.read(1 << 16):
                    queue.put_nowait((loop.time() + self.delay_s, data))
            finally:
                queue.put_nowait(None)

        async def send() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(receive(), send(), return_exceptions=True)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
