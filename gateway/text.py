"""From generated tokens to text pieces: complete characters only, cut at stop strings.

`generate_text` drives a Conversation turn and yields `Piece`s; every API (chat.petals.dev, OpenAI, the
terminal) is a thin formatter over it. `StopMatcher` finds stop strings in text that arrives piece by piece.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from client_sdk.tokenizer import Tokenizer
from gateway.conversation import Conversation, GenerationParams
from swarm.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Piece:
    """New text and how many tokens produced it (a piece may hold back text, so tokens >= 1 per piece
    except the last). The last piece of a turn has `finish` set: "stop" (a stop string), "eos" or "length"."""

    text: str
    tokens: int
    finish: str | None = None
    stop: str | None = None  # the stop string that ended the turn


class StopMatcher:
    """Finds the first stop string in text fed piece by piece.

    `keep_stop`: the stop string stays in the output (chat.petals.dev) and text flows out as it comes;
    otherwise (OpenAI) output ends before the stop string, and a tail that could still become one is held
    back until it cannot.
    """

    def __init__(self, stops: Sequence[str], keep_stop: bool) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.keep_stop = keep_stop
        self.window = max((len(s) for s in self.stops), default=1) - 1  # emitted chars a match may start in
        self.tail = ""  # the last `window` characters already emitted
        self.held = ""  # text not emitted yet (only without keep_stop)
        self.matched: str | None = None

    def push(self, piece: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the text)."""
        if not self.stops or self.matched is not None:
            return piece, self.matched is not None
        text = self.held + piece
        context = self.tail + text
        best: tuple[int, int, str] | None = None  # (end, start, stop) of the match that ends first
        for stop in self.stops:
            start = context.find(stop)
            if start >= 0 and (best is None or start + len(stop) < best[0]):
                best = (start + len(stop), start, stop)
        if best is not None:
            end, start, stop = best
            self.matched = stop
            cut = (end if self.keep_stop else start) - len(self.tail)
            self.held = ""
            return text[: max(cut, 0)], True
        hold = 0 if self.keep_stop else self._partial_suffix(text)
        out, self.held = text[: len(text) - hold], text[len(text) - hold :]
        if self.window:
            self.tail = (self.tail + out)[-self.window :]
        return out, False

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string."""
        for k in range(min(len(text), self.window), 0, -1):
            end = text[-k:]
            if any(s.startswith(end) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """Held-back text at the end of the turn (no stop string came)."""
        held, self.held = self.held, ""
        return held


def check_stops(stops: Sequence[str]) -> list[str]:
    """Bounds on client-given stop strings (each one is searched after every token)."""
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise InvalidRequest(f"stop sequences must be strings, got {type(s).__name__}")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
    return [s for s in stops if s]


async def generate_text(
    conversation: Conversation,
    params: GenerationParams,
    tokenizer: Tokenizer,
    stops: Sequence[str] = (),
    keep_stop: bool = False,
    skip_special_tokens: bool = True,
) -> AsyncGenerator[Piece, None]:
    """One turn as text pieces. Never yields half a UTF-8 character: tokens that decode to U+FFFD are held
    until the character completes (or the turn ends). The last piece says why the turn ended."""
    decoder = tokenizer.stream(skip_special_tokens=skip_special_tokens)
    matcher = StopMatcher(stops, keep_stop)
    eos = set(params.eos_token_ids) if params.stop_on_eos else set()
    tokens = 0  # since the last piece
    finish = "length"
    last = ""  # the EOS token's own text (when special tokens are shown)
    agen = conversation.generate(params)
    try:
        async for token in agen:
            tokens += 1
            text, stopped = matcher.push(decoder.push(token))
            if stopped:
                yield Piece(text, tokens, "stop", matcher.matched)
                return
            if token in eos:
                finish, last = "eos", text
                break
            if text:
                yield Piece(text, tokens)
                tokens = 0
    finally:
        await agen.aclose()
    rest, stopped = matcher.push(decoder.finish())
    if stopped:
        yield Piece(last + rest, tokens, "stop", matcher.matched)
        return
    yield Piece(last + rest + matcher.flush(), tokens, finish)
