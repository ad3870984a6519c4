"""AsyncSwarmClient: generate with a model whose blocks run on a swarm of shard servers.

The path of one token: `_generate_ids` embeds it locally -> `InferenceSession.step` (session.py) runs it
through the cheapest chain of servers, one `_span_step` per server (surviving servers that die) ->
`SpanStream` (span_stream.py) writes and reads that server's stream -> back here, the local norm + LM head
and `sample` (sampling.py) pick the next token. With push, one stream write per token and one read per server.
With `draft_model=`, speculative.py drafts several tokens locally and verifies them in one such trip.
`SwarmClient` (blocking.py) is the blocking facade for plain scripts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from client_sdk.config import ClientConfig, explain_dht_failure
from client_sdk.drafts import Drafts, DraftSpec, Speculation
from client_sdk.head import LocalModel, load_local_model
from client_sdk.prompts import EosArg, Kind, Prompt, decode_answer, encode_prompt, eos_ids
from client_sdk.remote import RemoteCalls
from client_sdk.routing import RouteCosts, Span, missing_ranges
from client_sdk.sampling import SamplingParams, make_generator, sample
from client_sdk.session import Failover, InferenceSession, SessionRouter
from client_sdk.speculative import SpeculationStats, check_speculation, speculative_tokens
from client_sdk.transport import ChannelPool
from client_sdk.tuning import Tuning
from client_sdk.verify import OutputVerifier
from swarm.aio import TaskSet
from swarm.errors import DhtUnavailable, InvalidRequest, MissingBlocks

if TYPE_CHECKING:
    from client_sdk.directory import SwarmView
    from swarm.records import ServerRecord

log = logging.getLogger(__name__)


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
        # The DHT side (signed records, pydantic) loads here rather than at import, so that importing the client
        # costs little more than importing torch.
        from client_sdk.directory import SwarmView
        from swarm.dht_client import DhtClient, parse_peers

        self.config = cfg = dataclasses.replace(config or ClientConfig(), **options)
        peers = parse_peers(initial_peers)
        # One Security for every channel (DHT and servers): a keyed swarm refuses calls without the key's proof.
        # Read first: a bad key file fails before the model loads.
        self.security = cfg.security()
        self.local: LocalModel = load_local_model(model, model_id, dtype)
        self.tokenizer = self.local.tokenizer
        self.dht = DhtClient(peers, timeout_s=cfg.dht_timeout_s, security=self.security)
        self.pool = ChannelPool(cfg.max_message_bytes, self.security)
        self.view: SwarmView = SwarmView(
            self.dht,
            self.local.model_id,
            self.local.num_blocks,
            self.local.model_hash,
            ban_s=cfg.ban_s,
            max_ban_s=cfg.max_ban_s,
            rtt_ema_alpha=cfg.rtt_ema_alpha,
            min_precision=cfg.min_precision,
            adapter=cfg.active_adapter or "",
        )
        # Hidden states travel in this dtype (servers reply in it); logits are computed in the local dtype.
        self.wire_dtype = getattr(torch, cfg.wire_dtype) if cfg.wire_dtype else self.local.dtype
        self.remote = RemoteCalls(self.pool, self.view, self.local.model_id, cfg)
        self.verifier: OutputVerifier | None = None
        if cfg.verify_fraction > 0:
            self.verifier = OutputVerifier(
                self.pool, self.local.model_id, cfg.verify_fraction, self._same_span_holders,
                distrust=self.view.distrust, on_failure=self.view.ban, timeout_s=cfg.forward_timeout_s,
            )  # fmt: skip
        self.last_failovers: list[Failover] = []  # recoveries during the last generate call
        self.active_session: InferenceSession | None = None  # the session of the running generate call
        self.last_speculation: SpeculationStats | None = None  # of the last generate call with a draft_model
        self._drafts = Drafts(self.local)  # loaded drafts by their spec ("self:N", a folder)
        self._tasks = TaskSet()

    @property
    def model_id(self) -> str:
        return self.local.model_id

    async def connect(self) -> None:
        """Read the swarm's records once (raises DhtUnavailable if no dht-node answers), measure RTTs to
        the servers, and keep both fresh in the background."""
        try:
            records = await self.view.refresh()
        except DhtUnavailable as e:
            raise explain_dht_failure(e, self.security) from e
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
        draft_model: DraftSpec | None = None,
        num_draft_tokens: int | None = None,
        adaptive_draft: bool = True,
    ) -> Any:
        """Generate up to `max_new_tokens` after `inputs` and return only the new tokens.

        Text in -> text out (needs a tokenizer in the model folder); list[int] -> list[int]; a 1-D or
        2-D LongTensor -> a LongTensor of the same rank. `eos_token_id=...` uses the model's EOS ids,
        None never stops early; EOS cannot be drawn before `min_new_tokens`. Rows that finished early
        are padded (pad_token_id, else EOS). Sampling follows transformers: temperature, top-k, top-p.

        `draft_model` turns on speculative decoding (speculative.py; one sequence at a time): "self:N" (this
        model's first N blocks + its head, loaded locally), a folder of a small model with the same tokenizer,
        a local transformers model, "prompt-lookup" (no model: continuations of earlier occurrences of the last
        2 tokens in the prompt and output; "lookup:N" for the last N), or a `Draft` (drafts.py). It drafts
        `num_draft_tokens` tokens per round trip (default 4 for models, then adapted unless
        `adaptive_draft=False`; 10 for prompt lookup); greedy output is exactly the plain greedy output.
        """
        ids, kind = encode_prompt(inputs, self.tokenizer, self.local.config.vocab_size)
        tokens: list[torch.Tensor] = []
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        spec = await self._drafts.get(draft_model, num_draft_tokens, adaptive_draft)
        agen = self._generate_ids(ids, max_new_tokens, min_new_tokens, params, seed, eos_token_id, spec)
        async with contextlib.aclosing(agen):
            async for token in agen:
                tokens.append(token)
        new = torch.stack(tokens, dim=1) if tokens else ids.new_empty((ids.shape[0], 0))  # [batch, new]
        return decode_answer(new, kind, self.tokenizer)

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
        draft_model: DraftSpec | None = None,
        num_draft_tokens: int | None = None,
        adaptive_draft: bool = True,
    ) -> AsyncGenerator[Any, None]:
        """Like generate, yielding as tokens arrive: for a text prompt, text pieces (each one complete
        characters; together exactly the text `generate` returns); for token ids, each new token (an int for
        one sequence, else a LongTensor [batch]). Wrap in `contextlib.aclosing` if you may stop early.
        With `draft_model`, tokens arrive in bursts (those one round trip verified)."""
        ids, kind = encode_prompt(inputs, self.tokenizer, self.local.config.vocab_size)
        text = self.tokenizer.stream() if kind is Kind.TEXT and self.tokenizer is not None else None
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        spec = await self._drafts.get(draft_model, num_draft_tokens, adaptive_draft)
        agen = self._generate_ids(ids, max_new_tokens, min_new_tokens, params, seed, eos_token_id, spec)
        async with contextlib.aclosing(agen):
            async for token in agen:
                if text is None:
                    yield int(token[0]) if token.shape[0] == 1 else token
                elif piece := text.push(int(token[0])):
                    yield piece
        if text is not None and (rest := text.finish()):
            yield rest

    async def _generate_ids(
        self,
        ids: torch.Tensor,  # [batch, prompt_len] int64
        max_new_tokens: int,
        min_new_tokens: int,
        params: SamplingParams,
        seed: int | None,
        eos_token_id: EosArg,
        speculation: Speculation | None = None,
    ) -> AsyncGenerator[torch.Tensor, None]:  # yields [batch] int64 per new token
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        generator = make_generator(seed) if params.do_sample else None
        eos = eos_ids(eos_token_id, self.local.eos_token_ids)
        if speculation is not None:
            if max_new_tokens == 0:
                return
            stats = self.last_speculation = SpeculationStats()
            draft, k, adaptive = speculation
            check_speculation(ids, k)
            session = self.active_session = await self.open_session(ids.shape[1] + max_new_tokens, 1)
            agen = speculative_tokens(
                session,
                self.local,
                self.wire_dtype,
                ids,
                max_new_tokens,
                min_new_tokens,
                params,
                generator,
                eos,
                draft,
                k,
                adaptive,
                stats,
            )
            try:
                async with contextlib.aclosing(agen):
                    async for t in agen:
                        yield torch.tensor([t])
            finally:
                self.last_failovers = session.failovers
                await session.close()
            return
        eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
        pad_id = self.local.pad_token_id
        pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
        batch, prompt_len = ids.shape
        finished = torch.zeros(batch, dtype=torch.bool)
        if max_new_tokens == 0:
            return
        session = self.active_session = await self.open_session(prompt_len + max_new_tokens, batch)
        try:
            feed = ids  # the prompt first, then one token per step; failovers happen inside session.step
            for produced in range(max_new_tokens):
                logits = await self.next_logits(session, feed)  # [batch, vocab]
                with torch.inference_mode():
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

    async def next_logits(
        self,
        session: InferenceSession,
        ids: torch.Tensor,  # [batch, new_tokens] int64
    ) -> torch.Tensor:  # [batch, vocab] in the local dtype
        """Append `ids` to `session` (embedded locally, run through the servers, which keep their KV caches) and
        return the next-token logits after the last of them: the one step of every generate loop. A session from
        `open_session` kept across calls continues a conversation where the previous call stopped (multi-turn
        chat, stop sequences, custom sampling all live in the caller's loop)."""
        head = self.local.head
        with torch.inference_mode():
            hidden = head.embed(ids).to(self.wire_dtype)  # [batch, new_tokens, hidden]
        hidden = await session.step(hidden)  # failovers happen inside
        with torch.inference_mode():
            return head.logits(hidden[:, -1:].to(self.local.dtype))[:, -1]  # [batch, vocab]

    def _same_span_holders(self, span: Span) -> list[Span]:
        """Servers able to recompute `span` for verification: usable, holding its blocks, of the same precision."""
        from client_sdk.directory import record_precision

        precision, banned = record_precision(span.record), self.view.banned()
        return [
            Span(r.peer_id, r.address, span.start, span.end, r)
            for r in self.view.records.servers()
            if r.start <= span.start and span.end <= r.end and r.peer_id not in banned
            and record_precision(r) == precision
        ]  # fmt: skip

    def router(self, max_length: int = 0, batch: int = 1) -> SessionRouter:
        """How sessions re-route: the view's cheapest chain for the lost blocks on freshly read records (the session
        asks again while there is none, within its failover budget)."""
        cfg = self.config

        async def route(start: int, end: int) -> list[Span]:
            costs = self._costs(max_length, batch)
            try:
                await self.view.refresh()  # fresh records: who left, who joined, who restarted elsewhere
            except DhtUnavailable as e:  # keep routing on what we know; the session retries within its budget
                log.warning("could not re-read the DHT (%s); routing on records %.0f s old", e, self.view.age_s())
            try:
                return self.view.route(start, end, costs)
            except MissingBlocks:
                # Every holder of these blocks failed recently; under churn some are back by now (a server
                # restarted with its identity), so try them again rather than give up (a dead one fails fast).
                return self.view.route(start, end, costs, ignore_bans=True)

        return SessionRouter(route=route, on_failure=self.view.ban, backoff_s=cfg.backoff_s)

    def _costs(self, max_length: int, batch: int) -> RouteCosts:
        return RouteCosts(rtts_ms=self.view.rtts_ms, push=self.config.use_push, cache_tokens_needed=max_length * batch)

    async def open_session(self, max_length: int, batch: int = 1, tuning: Tuning | None = None) -> InferenceSession:
        """An open InferenceSession over the cheapest chain for `max_length` tokens of `batch` rows (`tuning`:
        a server-held adapter and/or client LoRA for the whole session)."""
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
            failover_budget_s=cfg.failover_budget_s,
            verifier=self.verifier,
            # With verification the client must see a span's output before the next server consumes it; a push
            # would hand a wrong output on before it could be checked.
            push=cfg.use_push and self.verifier is None,
            tuning=tuning,
        )
        await session.open()
        return session

    async def aclose(self) -> None:
        await self._tasks.cancel_all()
        await self.pool.close()
        await self.dht.close()

    async def __aenter__(self) -> AsyncSwarmClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
