"""SwarmClient: the blocking facade of AsyncSwarmClient for plain scripts, notebooks and pytest.

It owns a private event-loop thread (the only thread the client ever starts) and runs every call there, so it
works even inside another running loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import torch

from client_sdk.client import AsyncSwarmClient, SwarmInfo
from client_sdk.prompts import Prompt
from client_sdk.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 15.0  # closing streams and channels; past it the loop is stopped anyway (a process must exit)

T = TypeVar("T")


class SwarmClient:
    """Blocking facade: the same API as AsyncSwarmClient, run on a private event-loop thread.

    Safe to use from scripts, notebooks and pytest (even inside another running loop). Call `close()` or
    use `with SwarmClient(...) as client:` to stop the thread and close every channel.
    """

    def __init__(
        self,
        initial_peers: str | Sequence[str],
        model: str | os.PathLike[str],
        model_id: str | None = None,
        **options: Any,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        # torch's thread count is per thread (OpenMP's setting): the loop thread, which runs the local head, takes
        # the caller's, or it would use one thread per core whatever the caller set.
        threads = torch.get_num_threads()

        def run_loop() -> None:
            torch.set_num_threads(threads)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run_loop, name="pollen-client-loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._client = self._call(self._create(initial_peers, model, model_id, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _create(
        initial_peers: str | Sequence[str], model: str | os.PathLike[str], model_id: str | None, options: dict[str, Any]
    ) -> AsyncSwarmClient:
        # Built on the loop thread so every grpc.aio object binds to the loop that will use it.
        client = AsyncSwarmClient(initial_peers, model, model_id, **options)
        try:
            await client.connect()
        except BaseException:
            await client.aclose()
            raise
        return client

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop thread and wait for it (used by the torch modules)."""
        return self._call(coro)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("SwarmClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the work on the loop too
            raise

    @property
    def async_client(self) -> AsyncSwarmClient:
        return self._client

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._client.tokenizer

    def generate(self, inputs: Prompt, max_new_tokens: int = 32, **kwargs: Any) -> Any:
        """See AsyncSwarmClient.generate."""
        return self._call(self._client.generate(inputs, max_new_tokens, **kwargs))

    def stream(self, inputs: Prompt, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[Any]:
        """Blocking iterator over text pieces (text prompt) or new tokens; see AsyncSwarmClient.stream."""
        agen = self._client.stream(inputs, max_new_tokens, **kwargs)
        try:
            while True:
                try:
                    yield self._call(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._call(_aclose(agen))

    def info(self) -> SwarmInfo:
        return self._call(self._client.info())

    def close(self) -> None:
        if self._closed:
            return
        future = asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop)
        try:
            future.result(CLOSE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            try:  # read from this thread while the loop runs: a diagnostic, may race
                stuck: object = [t.get_name() for t in asyncio.all_tasks(self._loop) if not t.done()]
            except RuntimeError:
                stuck = "?"
            log.warning("closing the client took over %.0f s; stopping its loop (still running: %s)",
                        CLOSE_TIMEOUT_S, stuck)  # fmt: skip
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# run_coroutine_threadsafe takes coroutines only; an async generator's __anext__/aclose are other awaitables.
async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _aclose(agen: AsyncGenerator[Any, None]) -> None:
    await agen.aclose()
