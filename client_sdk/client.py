"""SwarmClient: generate text with a model whose blocks run on a swarm of shard servers.

`AsyncSwarmClient` does the work on an asyncio loop: local embeddings -> one InferenceSession across the
cheapest chain of servers -> local norm + LM head -> sampling, one stream write/read per server per token.
`SwarmClient` is the blocking facade for plain scripts: it owns a private event-loop thread (the only
thread the client ever starts) and runs every call there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, TypeVar

import torch

from client_sdk.directory import SwarmView
from client_sdk.head import LocalModel, load_local_model
from client_sdk.routing import missing_ranges
from client_sdk.sampling import SamplingParams, make_generator, sample
from client_sdk.session import InferenceSession
from client_sdk.transport import DEFAULT_MAX_MESSAGE_BYTES, ChannelPool
from swarm.dht_client import DhtClient, parse_peers
from swarm.errors import InvalidRequest, PollenError
from swarm.records import ServerRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int] | torch.Tensor
EosArg = int | Sequence[int] | None | EllipsisType


@dataclass(frozen=True)
class ClientConfig:
    """Client options; every wait and retry is bounded."""

    dht_timeout_s: float = 5.0  # one DHT call to one dht-node
    open_timeout_s: float = 30.0  # a server answering `open` (it may have to allocate the KV cache)
    step_timeout_s: float = 60.0  # one step on one server (a long prefill on a slow CPU takes a while)
    max_retries: int = 3  # re-route + re-prefill attempts per generate call after retryable errors
    retry_backoff_s: float = 0.25  # first backoff, doubled per attempt
    max_view_age_s: float = 10.0  # re-read the DHT at the start of a generate call if the view is older
    ban_s: float = 30.0  # how long to route around a server that failed
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        for name in ("dht_timeout_s", "open_timeout_s", "step_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite positive number of seconds")


@dataclass(frozen=True)
class SwarmInfo:
    """Who serves the model: live servers and how many of them hold each block."""

    model_id: str
    num_blocks: int
    servers: list[ServerRecord]
    coverage: list[int]  # coverage[i] = live servers holding block i
    missing: list[tuple[int, int]]  # half-open block ranges nobody serves

    def __str__(self) -> str:
        lines = [f"model {self.model_id}: {self.num_blocks} blocks, {len(self.servers)} live servers"]
        for r in self.servers:
            lines.append(f"  {r.start}:{r.end} {r.address} peer={r.peer_id[:12]} {r.throughput_tps:.1f} tok/s")
        lines.append("  coverage per block: " + " ".join(map(str, self.coverage)))
        if self.missing:
            lines.append("  MISSING: " + ", ".join(f"{a}:{b}" for a, b in self.missing))
        return "\n".join(lines)


class AsyncSwarmClient:
    """The asyncio client. Construct, then `await connect()` (or `async with`), `generate`, `aclose()`."""

    def __init__(
        self,
        initial_peers: str | Sequence[str],
        model: str | os.PathLike[str],
        model_id: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        config: ClientConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = dataclasses.replace(config or ClientConfig(), **options)
        peers = parse_peers(initial_peers)
        self.local: LocalModel = load_local_model(model, model_id, dtype)
        self.tokenizer = self.local.tokenizer
        self.dht = DhtClient(peers, timeout_s=self.config.dht_timeout_s)
        self.pool = ChannelPool(self.config.max_message_bytes)
        self.view = SwarmView(self.dht, self.local.model_id, self.local.num_blocks, self.local.model_hash)

    @property
    def model_id(self) -> str:
        return self.local.model_id

    async def connect(self) -> None:
        """Read the swarm's records once (raises DhtUnavailable if no dht-node answers)."""
        records = await self.view.refresh()
        holes = missing_ranges(records.servers(), 0, self.local.num_blocks)
        if holes:
            log.warning("no live server holds blocks %s of %s yet", holes, self.model_id)

    async def info(self) -> SwarmInfo:
        records = await self.view.refresh()
        servers = records.servers()
        return SwarmInfo(
            model_id=self.model_id,
            num_blocks=self.local.num_blocks,
            servers=servers,
            coverage=[len(block) for block in records.per_block],
            missing=missing_ranges(servers, 0, self.local.num_blocks),
        )

    async def generate(
        self,
        inputs: Prompt,
        max_new_tokens: int = 32,
        *,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: EosArg = ...,
    ) -> Any:
        """Generate up to `max_new_tokens` after `inputs` and return only the new tokens.

        Text in -> text out (needs a tokenizer in the model folder); list[int] -> list[int]; a 1-D or
        2-D LongTensor -> a LongTensor of the same rank. `eos_token_id=...` uses the model's EOS ids,
        None never stops early; EOS cannot be drawn before `min_new_tokens`. Rows that finished early
        are padded (pad_token_id, else EOS). Sampling follows transformers: temperature, top-k, top-p.
        """
        ids, kind = self._encode(inputs)
        tokens: list[torch.Tensor] = []
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        agen = self._generate_ids(ids, max_new_tokens, min_new_tokens, params, seed, eos_token_id)
        async with contextlib.aclosing(agen):
            async for token in agen:
                tokens.append(token)
        new = torch.stack(tokens, dim=1) if tokens else ids.new_empty((ids.shape[0], 0))  # [batch, new]
        return self._decode(new, kind)

    async def stream(
        self,
        inputs: Prompt,
        max_new_tokens: int = 32,
        *,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: EosArg = ...,
    ) -> AsyncGenerator[Any, None]:
        """Like generate, yielding each new token as it arrives: an int for one sequence, else a
        LongTensor [batch]. Wrap in `contextlib.aclosing` if you may stop early."""
        ids, _ = self._encode(inputs)
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        agen = self._generate_ids(ids, max_new_tokens, min_new_tokens, params, seed, eos_token_id)
        async with contextlib.aclosing(agen):
            async for token in agen:
                yield int(token[0]) if token.shape[0] == 1 else token

    async def _generate_ids(
        self,
        ids: torch.Tensor,  # [batch, prompt_len] int64
        max_new_tokens: int,
        min_new_tokens: int,
        params: SamplingParams,
        seed: int | None,
        eos_token_id: EosArg,
    ) -> AsyncGenerator[torch.Tensor, None]:  # yields [batch] int64 per new token
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        generator = make_generator(seed) if params.do_sample else None
        eos = self._eos_ids(eos_token_id)
        eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
        pad_id = getattr(self.local.config, "pad_token_id", None)
        pad = int(pad_id) if pad_id is not None else (eos[0] if eos else 0)
        batch, prompt_len = ids.shape
        finished = torch.zeros(batch, dtype=torch.bool)
        produced: list[torch.Tensor] = []
        head = self.local.head
        session: InferenceSession | None = None
        attempts = 0
        try:
            while len(produced) < max_new_tokens:
                try:
                    if session is None:
                        session = await self._open_session(prompt_len + max_new_tokens, batch)
                        # Prefill; after a failure, re-prefill everything so far on the new route.
                        feed = torch.cat([ids, torch.stack(produced, dim=1)], dim=1) if produced else ids
                    else:
                        feed = produced[-1].unsqueeze(1)  # [batch, 1]
                    with torch.inference_mode():
                        hidden = head.embed(feed)  # [batch, seq, hidden]
                    hidden = await session.step(hidden)
                except PollenError as e:
                    if not e.retryable or attempts >= self.config.max_retries:
                        raise
                    attempts += 1
                    await self._recover(session, e, attempts)
                    session = None
                    continue
                with torch.inference_mode():
                    logits = head.logits(hidden[:, -1:].to(self.local.dtype))[:, -1]  # [batch, vocab]
                    if eos and len(produced) < min_new_tokens:
                        logits[:, eos] = float("-inf")  # as transformers' MinNewTokensLengthLogitsProcessor
                    token = sample(logits, params, generator)  # [batch]
                    if eos_t is not None:
                        token = token.masked_fill(finished, pad)
                        finished |= torch.isin(token, eos_t)
                produced.append(token)
                yield token
                if eos_t is not None and bool(finished.all()):
                    break
        finally:
            if session is not None:
                await session.close()

    async def _open_session(self, max_length: int, batch: int) -> InferenceSession:
        if self.view.age_s() > self.config.max_view_age_s:
            await self.view.refresh()
        route = self.view.route()
        for span in route:
            if max_length > span.record.inference_max_length:
                raise InvalidRequest(
                    f"prompt + max_new_tokens = {max_length} tokens is over the inference_max_length "
                    f"({span.record.inference_max_length}) of the server for blocks {span.start}:{span.end} "
                    f"({span.address}); generate fewer tokens"
                )
        session = InferenceSession(
            self.pool,
            self.model_id,
            route,
            max_length=max_length,
            batch_size=batch,
            step_timeout_s=self.config.step_timeout_s,
            open_timeout_s=self.config.open_timeout_s,
        )
        try:
            await session.open()
        except PollenError:
            self._avoid_failed(session)
            raise
        return session

    def _avoid_failed(self, session: InferenceSession) -> None:
        if session.failed_span is not None:
            self.view.ban(session.failed_span.peer_id, self.config.ban_s)

    async def _recover(self, session: InferenceSession | None, error: PollenError, attempt: int) -> None:
        """After a retryable error: drop the session, avoid the failing server, back off, re-read the DHT."""
        if session is not None:
            self._avoid_failed(session)
            await session.close()
        delay = self.config.retry_backoff_s * 2 ** (attempt - 1)
        log.warning("%s; retry %d/%d in %.2f s", error, attempt, self.config.max_retries, delay)
        await asyncio.sleep(delay)
        await self.view.refresh()

    def _eos_ids(self, eos_token_id: EosArg) -> list[int]:
        if eos_token_id is ...:
            return self.local.eos_token_ids
        if eos_token_id is None:
            return []
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]

    def _encode(self, inputs: Prompt) -> tuple[torch.Tensor, str]:
        """Prompt -> ([batch, seq] int64 ids, kind to return in)."""
        if isinstance(inputs, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.local.path} has no tokenizer files: pass token ids instead of text")
            ids = self.tokenizer(inputs, return_tensors="pt").input_ids
            kind = "text"
        elif isinstance(inputs, torch.Tensor):
            if inputs.dim() not in (1, 2) or inputs.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"token ids must be a 1-D or 2-D integer tensor, got {inputs.dtype} {list(inputs.shape)}"
                )
            ids = inputs.long().cpu().reshape(-1, inputs.shape[-1])
            kind = f"tensor{inputs.dim()}d"
        elif isinstance(inputs, list) and all(isinstance(t, int) for t in inputs):
            ids = torch.tensor([inputs], dtype=torch.long)
            kind = "list"
        else:
            raise TypeError(f"inputs must be str, list[int] or a LongTensor, got {type(inputs).__name__}")
        vocab = int(self.local.config.vocab_size)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
        return ids, kind

    def _decode(self, new: torch.Tensor, kind: str) -> Any:  # new: [batch, new_tokens]
        if kind == "text" and self.tokenizer is not None:
            return self.tokenizer.decode(new[0], skip_special_tokens=True)
        if kind == "list":
            return new[0].tolist()
        return new[0] if kind == "tensor1d" else new

    async def aclose(self) -> None:
        await self.pool.close()
        await self.dht.close()

    async def __aenter__(self) -> AsyncSwarmClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
        self._thread = threading.Thread(target=self._loop.run_forever, name="pollen-client-loop", daemon=True)
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
    def tokenizer(self) -> Any | None:
        return self._client.tokenizer

    def generate(self, inputs: Prompt, max_new_tokens: int = 32, **kwargs: Any) -> Any:
        """See AsyncSwarmClient.generate."""
        return self._call(self._client.generate(inputs, max_new_tokens, **kwargs))

    def stream(self, inputs: Prompt, max_new_tokens: int = 32, **kwargs: Any) -> Iterator[Any]:
        """Blocking iterator over new tokens; see AsyncSwarmClient.stream."""
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
        try:
            self._call(self._client.aclose())
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
