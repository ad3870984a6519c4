"""The one-shot terminal commands: `pollen generate` (one prompt, streamed to stdout) and `pollen swarm` (the
dashboard as a table); what they share with `pollen chat` (chat.py): sampling flags and streaming a reply."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from client_sdk import AsyncSwarmClient
from client_sdk.config import ClientConfig
from client_sdk.tokenizer import Tokenizer
from gateway.config import ModelSpec
from gateway.conversation import Conversation, GenerationParams
from gateway.text import StopMatcher, check_stops, generate_text


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    max_length: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stops: tuple[str, ...] = ()

    def params(self, eos: Sequence[int], max_new_tokens: int | None = None) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            eos_token_ids=tuple(eos),
        )


def text_tokenizer(client: AsyncSwarmClient) -> Tokenizer:
    if client.tokenizer is None:
        raise SystemExit(f"pollen: {client.local.path} has no tokenizer.json; text needs a tokenizer")
    return client.tokenizer


async def print_reply(
    conv: Conversation, params: GenerationParams, tok: Tokenizer, stops: Sequence[str], out: TextIO, reply: list[str]
) -> str | None:
    """Stream one turn to `out`; the text so far is kept in `reply` (also when interrupted). Returns why it ended."""
    pieces = generate_text(conv, params, tok, stops)
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            out.write(piece.text)
            out.flush()
            reply.append(piece.text)
            if piece.finish:
                return piece.finish
    return None


# ---- pollen generate -----------------------------------------------------------------------------------


async def generate_once(
    peers: Sequence[str],
    spec: ModelSpec,
    prompt: str,
    sampling: Sampling,
    chat: bool,
    draft: str | None = None,
    num_draft_tokens: int | None = None,
) -> int:
    """`pollen generate`: stream one reply to stdout; with `draft`, by speculative decoding (SwarmClient's
    draft_model: "self:N", "prompt-lookup", "lookup:N" or a folder of a small model with the same tokenizer)."""
    if draft is None and num_draft_tokens is not None:
        raise ValueError("--num-draft-tokens needs --draft")
    if draft is not None and sampling.repetition_penalty != 1.0:
        raise ValueError("--repetition-penalty is not available with --draft (speculative decoding)")
    async with AsyncSwarmClient(list(peers), spec.source, spec.model_id) as client:
        tok = text_tokenizer(client)
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            ids = tok.encode(prompt)
        if draft is not None:
            await print_speculative(client, ids, sampling, tok, draft, num_draft_tokens, sys.stdout)
        else:
            conv = Conversation(client, len(ids) + sampling.max_new_tokens)
            try:
                conv.append(ids)
                params = sampling.params(client.local.eos_token_ids)
                await print_reply(conv, params, tok, sampling.stops, sys.stdout, [])
            finally:
                await conv.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


async def print_speculative(
    client: AsyncSwarmClient,
    ids: list[int],
    sampling: Sampling,
    tok: Tokenizer,
    draft: str,
    num_draft_tokens: int | None,
    out: TextIO,
) -> None:
    """Stream one reply drafted by `draft` and verified by the swarm: the same text as `print_reply` for greedy
    decoding (EOS ends it, stop strings cut it), in bursts of the tokens each round trip kept."""
    decoder = tok.stream(skip_special_tokens=True)
    matcher = StopMatcher(check_stops(sampling.stops), keep_stop=False)
    tokens = client.stream(
        ids,
        sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed,
        draft_model=draft,
        num_draft_tokens=num_draft_tokens,
    )
    async with contextlib.aclosing(tokens):
        async for token in tokens:
            text, stopped = matcher.push(decoder.push(int(token)))
            out.write(text)
            out.flush()
            if stopped:
                return
    text, stopped = matcher.push(decoder.finish())
    out.write(text if stopped else text + matcher.flush())
    out.flush()


# ---- pollen swarm --------------------------------------------------------------------------------------

RED, GREEN, YELLOW, DIM, RESET = "\033[31m", "\033[32m", "\033[33m", "\033[2m", "\033[0m"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def render_state(state: dict[str, Any], color: bool = False) -> str:
    """The dashboard as text: per model its state, a coverage row (servers per block) and its servers."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    lines = []
    boot = state["bootstrap_states"]
    lines.append(f"dht-nodes online: {boot.count('online')} of {len(boot)}")
    if not state["model_reports"]:
        lines.append("no models announced in this swarm")
    for report in state["model_reports"]:
        healthy = report["state"] == "healthy"
        online = sum(1 for r in report["server_rows"] if r["state"] == "online")
        lines.append("")
        lines.append(
            f"{report['name']}  {paint(report['state'].upper(), GREEN if healthy else RED)}  "
            f"{report['num_blocks']} blocks, {online} online server{'s' if online != 1 else ''}"
        )
        cells = []
        for n in report["block_coverage"]:
            mark = "X" if n == 0 else str(n) if n < 10 else "+"
            cells.append(paint(mark, RED if n == 0 else YELLOW if n == 1 else GREEN))
        lines.append("  servers per block: " + "".join(cells))
        if report["missing_blocks"]:
            lines.append("  " + paint(f"no server holds blocks {_ranges(report['missing_blocks'])}", RED))
        if report["server_rows"]:
            rows = [["  PEER", "ADDRESS", "BLOCKS", "STATE", "TOK/S", "PRECISION", "CACHE", "SESSIONS", "PING"]]
            for row in report["server_rows"]:
                info = row["span"]["server_info"]
                quant = info["quant_type"]
                precision = quant if quant and quant != "none" else info["torch_dtype"]
                rows.append([
                    "  " + row["short_peer_id"], row["address"], f"{row['span']['start']}:{row['span']['end']}",
                    row["state"], f"{info['throughput']:.1f}", precision, str(info["cache_tokens_left"]),
                    str(info["active_sessions"]), "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f} ms",
                ])  # fmt: skip
            lines.extend(_table(rows))
    return "\n".join(lines)


def _ranges(blocks: Sequence[int]) -> str:
    """[2, 3, 4, 7] -> "2:5, 7:8" (half-open, as everywhere in Pollen)."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}:{b + 1}")
            start = None
    return ", ".join(out)


async def show_swarm(peers: Sequence[str], specs: Sequence[ModelSpec], as_json: bool) -> int:
    """Exit code: 0 if every listed model is healthy, 1 if one is broken or none is announced."""
    from client_sdk.transport import ChannelPool
    from gateway.health import read_state
    from swarm.dht_client import DhtClient
    from swarm.model_files import default_model_id, resolve_model_path
    from swarm.models import load_family

    known = {}
    for spec in specs:
        known[spec.model_id or default_model_id(spec.source)] = load_family(resolve_model_path(spec.source)).num_blocks
    security = ClientConfig().security()  # the swarm key and TLS CA from the flags (via the environment)
    dht, pool = DhtClient(list(peers), security=security), ChannelPool(security=security)
    try:
        state = await read_state(dht, pool, list(peers), known, include_index=not specs)
    finally:
        await pool.close()
        await dht.close()
    text = json.dumps(state, indent=2) if as_json else render_state(state, color=sys.stdout.isatty())
    sys.stdout.write(text + "\n")
    reports = state["model_reports"]
    return 0 if reports and all(r["state"] == "healthy" for r in reports) else 1
