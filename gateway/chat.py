"""`pollen chat`: an interactive multi-turn chat in the terminal, streaming, with the model's chat template, and
one server-side session for the whole conversation (each turn sends only its new tokens).

`ChatHistory` keeps the messages and the exact text the session's tokens stand for: the template rendered up to
the assistant's turn plus what the model generated (special tokens included). The next turn renders the whole
conversation again; when that text starts with what the session holds, only the rest is encoded and sent, so the
model keeps its own tokens. Otherwise (a template that rewrites history) the conversation goes again whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Any, TextIO

from client_sdk import SwarmClient
from client_sdk.tokenizer import Tokenizer
from gateway.conversation import Conversation, session_limit
from gateway.terminal import Sampling, print_reply, text_tokenizer

CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (new system prompt, resets),
          /exit or Ctrl-D (quit); Ctrl-C stops a reply"""


class ChatHistory:
    def __init__(self, tokenizer: Tokenizer, conversation: Conversation, system: str | None) -> None:
        self.tok = tokenizer
        self.conv = conversation
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.text = ""  # what conversation.ids stand for ("" = unknown: render and send everything)

    def add_user(self, content: str) -> int:
        """Add the user's message and the assistant's opening to the session; returns the tokens it now holds."""
        messages = [*self.messages, {"role": "user", "content": content}]
        full = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.text and full.startswith(self.text):
            self.conv.append(self.tok.encode(full[len(self.text) :], add_special_tokens=False))
        else:
            self.conv.rewrite(self.tok.encode(full, add_special_tokens=False))
        self.messages, self.text = messages, full
        return len(self.conv.ids)

    def add_reply(self, start: int, shown: str) -> None:
        """Record the assistant's reply: the tokens generated since `start` and the text shown for them."""
        self.text += self.tok.decode(self.conv.ids[start:], skip_special_tokens=False)
        self.messages.append({"role": "assistant", "content": shown})

    def forget_last(self) -> None:
        """A turn failed: drop its message; the next turn renders the conversation again from the messages."""
        self.messages.pop()
        self.text = ""


class ChatRepl:
    """Reads lines in the main thread (readline editing, Ctrl-C) and runs the swarm work on the client's
    loop thread (the blocking facade's)."""

    def __init__(self, client: SwarmClient, sampling: Sampling, system: str | None, out: TextIO = sys.stdout) -> None:
        self.client = client
        self.tok = text_tokenizer(client.async_client)
        if self.tok.chat_template is None:
            raise SystemExit("pollen chat: the model's tokenizer has no chat template (use `pollen generate`)")
        limit = session_limit(client.async_client, sampling.max_length)  # the servers' limit may be lower
        self.sampling = dataclasses.replace(sampling, max_length=limit)
        self.system = system
        self.out = out
        self.conv = Conversation(client.async_client, limit)
        self.history = ChatHistory(self.tok, self.conv, system)
        self.interactive = sys.stdin.isatty()

    def reset(self) -> None:
        self.client.run(self.conv.close())
        self.conv = Conversation(self.client.async_client, self.sampling.max_length)
        self.history = ChatHistory(self.tok, self.conv, self.system)

    def run(self) -> int:
        info = self.client.info()
        missing = f" · MISSING blocks {info.missing}" if info.missing else ""
        sys.stderr.write(
            f"pollen chat · {info.model_id} · {info.num_blocks} blocks on {len(info.servers)} servers{missing}\n"
            f"{CHAT_HELP}\n"
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
        try:
            start = self.history.add_user(text)
        except ValueError as e:  # LengthExceeded (an InvalidRequest, a ValueError) or a template error
            sys.stderr.write(f"({e}; /reset to start over)\n")
            return
        room = self.conv.room
        if room <= 0:
            self.history.forget_last()
            sys.stderr.write(f"(the conversation fills the session's {self.sampling.max_length} tokens: /reset)\n")
            return
        params = self.sampling.params(
            self.client.async_client.local.eos_token_ids, min(self.sampling.max_new_tokens, room)
        )
        reply: list[str] = []
        task: list[asyncio.Task[Any]] = []

        async def run() -> str | None:
            current = asyncio.current_task()
            if current is not None:
                task.append(current)
            return await print_reply(self.conv, params, self.tok, self.sampling.stops, self.out, reply)

        try:
            self.client.run(run())
            self.out.write("\n\n")
        except KeyboardInterrupt:
            if task:  # let the cancelled reply unwind on the loop before the next turn touches the session
                self.client.run(asyncio.wait(task))
            self.out.write(" [interrupted]\n\n")
        except Exception as e:  # noqa: BLE001 — a failed turn is reported; the chat goes on
            self.history.forget_last()
            self.out.write("\n")
            sys.stderr.write(f"(error: {type(e).__name__}: {e})\n")
            return
        finally:
            self.out.flush()
        self.history.add_reply(start, "".join(reply))


def run_chat(peers: list[str], source: str, model_id: str | None, sampling: Sampling, system: str | None) -> int:
    with SwarmClient(peers, source, model_id) as client:
        return ChatRepl(client, sampling, system).run()
