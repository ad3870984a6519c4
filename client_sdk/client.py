"""SwarmClient: generate text with a model whose blocks run on a swarm of shard servers.

`AsyncSwarmClient` does the work on an asyncio loop: local embeddings -> one InferenceSession across the
cheapest chain of servers (which survives servers dying: see session.py) -> local norm + LM head ->
sampling. With push, one stream write per token and one read per server.
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

from client_sdk.config import ClientConfig
from client_sdk.directory import SwarmView
from client_sdk.head import LocalModel, load_local_model
from client_sdk.remote import RemoteCalls
from client_sdk.routing import RouteCosts, Span, missing_ranges
from client_sdk.sampling import SamplingParams, make_generator, sample
from client_sdk.session import Failover, InferenceSession, SessionRouter
from client_sdk.transport import ChannelPool
from swarm.aio import TaskSet
from swarm.dht_client import DhtClient, parse_peers
from swarm.errors import InvalidRequest
from swarm.records import ServerRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int] | torch.Tensor
EosArg = int | Sequence[int] | None | EllipsisType


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
        cfg = self.config
        self.view = SwarmView(
            self.dht,
            self.local.model_id,
            self.local.num_blocks,
            self.local.model_hash,
            ban_s=cfg.ban_s,
            max_ban_s=cfg.max_ban_s,
            rtt_ema_alpha=cfg.rtt_ema_alpha,
            min_precision=cfg.min_precision,
        )
        # Hidden states travel in this dtype (servers reply in it); logits are computed in the local dtype.
        self.wire_dtype = getattr(torch, cfg.wire_dtype) if cfg.wire_dtype else self.local.dtype
        self.remote = RemoteCalls(self.pool, self.view, self.local.model_id, cfg)
        self.last_failovers: list[Failover] = []  # recoveries during the last generate call
        self.active_session: InferenceSession | None = None  # the session of the running generate call
        self._tasks = TaskSet()

    @property
    def model_id(self) -> str:
        return self.local.model_id

    async def connect(self) -> None:
        """Read the swarm's records once (raises DhtUnavailable if no dht-node answers), measure RTTs to
        the servers, and keep both fresh in the background."""
        records = await self.view.refresh()
        cfg = self.config
        await self.view.ping(self.pool, cfg.ping_timeout_s, cfg.max_pinged)
        if cfg.refresh_period_s > 0 and not len(self._tasks):
            loop = self.view.run_refresh_loop(self.pool, cfg.refresh_period_s, cfg.ping_timeout_s, cfg.max_pinged)
            self._tasks.spawn(loop, name="swarm-view-refresh")
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
        head = self.local.head
        if max_new_tokens == 0:
            return
        session = self.active_session = await self.open_session(prompt_len + max_new_tokens, batch)
        try:
            feed = ids  # the prompt first, then one token per step; failovers happen inside session.step
            for produced in range(max_new_tokens):
                with torch.inference_mode():
                    hidden = head.embed(feed).to(self.wire_dtype)  # [batch, seq, hidden]
                hidden = await session.step(hidden)
                with torch.inference_mode():
                    logits = head.logits(hidden[:, -1:].to(self.local.dtype))[:, -1]  # [batch, vocab]
                    if eos and produced < min_new_tokens:
                        logits[:, eos] = float("-inf")  # as transformers' MinNewTokensLengthLogitsProcessor
                    token = sample(logits, params, generator)  # [batch]
                    if eos_t is not None:
                        token = token.masked_fill(finished, pad)
                        finished |= torch.isin(token, eos_t)
                yield token
                if eos_t is not None and bool(finished.all()):
                    break
                feed = token.unsqueeze(1)  # [batch, 1]
        finally:
            self.last_failovers = session.failovers
            await session.close()

    def router(self, max_length: int = 0, batch: int = 1) -> SessionRouter:
        """How sessions re-route: the view's cheapest chain for the lost blocks, waiting for joiners."""
        cfg = self.config

        async def route(start: int, end: int) -> list[Span]:
            costs = self._costs(max_length, batch)
            return await self.view.wait_route(start, end, costs, wait_s=cfg.missing_blocks_wait_s, max_age_s=0.0)

        return SessionRouter(route=route, on_failure=self.view.ban, backoff_s=cfg.backoff_s)

    def _costs(self, max_length: int, batch: int) -> RouteCosts:
        return RouteCosts(rtts_ms=self.view.rtts_ms, push=self.config.use_push, cache_tokens_needed=max_length * batch)

    async def open_session(self, max_length: int, batch: int = 1) -> InferenceSession:
        """An open InferenceSession over the cheapest chain for `max_length` tokens of `batch` rows."""
        cfg = self.config
        route = await self.view.wait_route(
            0,
            self.local.num_blocks,
            self._costs(max_length, batch),
            wait_s=cfg.missing_blocks_wait_s,
            max_age_s=cfg.max_view_age_s,
        )
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
            step_timeout_s=cfg.step_timeout_s,
            open_timeout_s=cfg.open_timeout_s,
            router=self.router(max_length, batch),
            max_retries=cfg.max_retries,
            push=cfg.use_push,
        )
        await session.open()
        return session

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
        await self._tasks.cancel_all()
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
