"""The terminal commands: `pollen chat` (interactive, streaming, one server-side session across turns),
`pollen generate` (one prompt, streamed to stdout) and `pollen swarm` (the dashboard as a table)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from client_sdk import AsyncSwarmClient, SwarmClient
from client_sdk.tokenizer import Tokenizer
from gateway.conversation import Conversation, GenerationParams
from gateway.registry import ModelSpec
from gateway.text import generate_text

CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (new system prompt, resets),
          /exit or Ctrl-D (quit); Ctrl-C stops a reply"""


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


def _tokenizer(client: AsyncSwarmClient) -> Tokenizer:
    if client.tokenizer is None:
        raise SystemExit(f"pollen: {client.local.path} has no tokenizer.json; text needs a tokenizer")
    return client.tokenizer


async def _print_reply(
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


# ---- pollen chat ---------------------------------------------------------------------------------------


class ChatRepl:
    """Reads lines in the main thread (readline editing, Ctrl-C) and runs the swarm work on the client's
    loop thread. The conversation's messages are re-rendered through the chat template every turn; the
    Conversation sends only what the servers have not seen yet."""

    def __init__(self, client: SwarmClient, sampling: Sampling, system: str | None, out: TextIO = sys.stdout) -> None:
        self.client = client
        self.async_client = client.async_client
        self.tok = _tokenizer(self.async_client)
        if self.tok.chat_template is None:
            raise SystemExit("pollen chat: the model's tokenizer has no chat template (use `pollen generate`)")
        self.sampling = sampling
        self.system = system
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.conv = Conversation(self.async_client, sampling.max_length)
        self.interactive = sys.stdin.isatty()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.client.run(self.conv.close())
        self.conv = Conversation(self.async_client, self.sampling.max_length)

    def run(self) -> int:
        self.reset()
        info = self.client.info()
        sys.stderr.write(
            f"pollen chat · {info.model_id} · {info.num_blocks} blocks on {len(info.servers)} servers"
            f"{' · MISSING blocks ' + str(info.missing) if info.missing else ''}\n{CHAT_HELP}\n"
        )
        try:
            while True:
                try:
                    line = input(">>> " if self.interactive else "")
                except EOFError:
                    break
                except KeyboardInterrupt:
                    self.out.write("\n")
                    break
                if not self.command(line.strip()):
                    break
        finally:
            self.client.run(self.conv.close())
        return 0

    def command(self, line: str) -> bool:
        """Handle one input line; False to quit."""
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line == "/help":
            sys.stderr.write(CHAT_HELP + "\n")
        elif line == "/reset":
            self.reset()
            sys.stderr.write("(conversation reset)\n")
        elif line.startswith("/system"):
            self.system = line[len("/system") :].strip() or None
            self.reset()
            sys.stderr.write("(system prompt set; conversation reset)\n")
        else:
            self.turn(line)
        return True

    def turn(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.apply_chat_template(self.messages, add_generation_prompt=True)
        room = self.sampling.max_length - len(ids)
        if room <= 0:
            self.messages.pop()
            sys.stderr.write(f"(the conversation is over {self.sampling.max_length} tokens: /reset to start over)\n")
            return
        self.conv.rewrite(ids)
        params = self.sampling.params(self.async_client.local.eos_token_ids, min(self.sampling.max_new_tokens, room))
        reply: list[str] = []
        task: list[asyncio.Task[Any]] = []

        async def run() -> str | None:
            task.append(asyncio.current_task())  # type: ignore[arg-type]
            return await _print_reply(self.conv, params, self.tok, self.sampling.stops, self.out, reply)

        try:
            self.client.run(run())
            self.out.write("\n\n")
        except KeyboardInterrupt:
            if task:  # let the cancelled reply unwind on the loop before the next turn touches the session
                self.client.run(asyncio.wait(task))
            self.out.write(" [interrupted]\n\n")
        except Exception as e:  # noqa: BLE001 — a failed turn is reported; the chat goes on
            self.messages.pop()
            self.out.write("\n")
            sys.stderr.write(f"(error: {type(e).__name__}: {e})\n")
            return
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(reply)})


def run_chat(peers: Sequence[str], spec: ModelSpec, sampling: Sampling, system: str | None) -> int:
    with SwarmClient(list(peers), spec.source, spec.model_id) as client:
        return ChatRepl(client, sampling, system).run()


# ---- pollen generate -----------------------------------------------------------------------------------


async def generate_once(peers: Sequence[str], spec: ModelSpec, prompt: str, sampling: Sampling, chat: bool) -> int:
    async with AsyncSwarmClient(list(peers), spec.source, spec.model_id) as client:
        tok = _tokenizer(client)
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            ids = tok.encode(prompt)
        conv = Conversation(client, len(ids) + sampling.max_new_tokens)
        try:
            conv.append(ids)
            await _print_reply(conv, sampling.params(client.local.eos_token_ids), tok, sampling.stops, sys.stdout, [])
        finally:
            await conv.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


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
    dht, pool = DhtClient(list(peers)), ChannelPool()
    try:
        state = await read_state(dht, pool, list(peers), known, include_index=not specs)
    finally:
        await pool.close()
        await dht.close()
    text = json.dumps(state, indent=2) if as_json else render_state(state, color=sys.stdout.isatty())
    sys.stdout.write(text + "\n")
    reports = state["model_reports"]
    return 0 if reports and all(r["state"] == "healthy" for r in reports) else 1
