"""A model folder's tokenizer without `transformers`: `tokenizer.json` through the `tokenizers` package, with the
special tokens, `add_bos_token`/`add_eos_token` and the chat template of `tokenizer_config.json` applied the way
transformers' fast tokenizers apply them (importing transformers costs ~2 s; `tokenizers` ~15 ms).

`TextStream` turns generated ids into text pieces as they arrive (for `stream("text")`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as RustTokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.5x saves a single chat template
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Message = Mapping[str, Any]  # {"role": ..., "content": ...}


class Tokenizer:
    """`encode`/`decode`/`apply_chat_template` as transformers' `PreTrainedTokenizerFast` does them."""

    def __init__(self, backend: RustTokenizer, config: Mapping[str, Any], chat_template: str | None = None) -> None:
        self.backend = backend
        self.config = dict(config)
        # Named special tokens, as strings (the chat template sees them as variables: bos_token, eos_token, ...).
        self.special_tokens: dict[str, str] = {}
        specials: list[AddedToken] = []
        for name in SPECIAL_TOKEN_NAMES:
            token = _added_token(config.get(name), special=True)
            if token is not None:
                self.special_tokens[name] = token.content
                specials.append(token)
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        for value in extra.values() if isinstance(extra, Mapping) else extra:
            token = _added_token(value, special=True)
            if token is not None:
                specials.append(token)
        # Tokens listed in the config but missing from tokenizer.json, then every special token marked special
        # (transformers does both on load; re-adding a present token only marks it special).
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for _, value in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            token = _added_token(value, special=bool(value.get("special", False)) if isinstance(value, dict) else True)
            if token is not None and token.content not in known:
                backend.add_tokens([token])
        if specials:
            backend.add_special_tokens(specials)
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            self._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template
        self._compiled: Any = None

    @classmethod
    def from_folder(cls, path: Path) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            if any((path / name).is_file() for name in ("tokenizer.model", "vocab.json")):
                log.warning("%s has a slow tokenizer only (no tokenizer.json): pass token ids", path)
            return None
        backend = RustTokenizer.from_file(str(path / TOKENIZER_FILE))
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        template = None
        if (path / CHAT_TEMPLATE_FILE).is_file():
            template = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(backend, config, template)

    # -- special tokens --------------------------------------------------------------------------------------

    def token_id(self, name: str) -> int | None:
        """The id of a named special token ("eos_token", ...), or None."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """transformers' `update_post_processor`: BOS/EOS around each sequence as the config asks."""
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
        pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
        special = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text: str = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers skips this clean-up for BPE models (it would eat real spaces before punctuation)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: Literal[True] = True,
        **variables: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        *,
        tokenize: Literal[False],
        **variables: Any,
    ) -> str: ...

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **variables: Any,
    ) -> list[int] | str:
        """Render the chat template (jinja2, sandboxed, as transformers does) and, by default, encode the text
        without adding special tokens again (the template writes them)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        text: str = self._compiled.render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **variables},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream(self, skip_special_tokens: bool = True) -> TextStream:
        return TextStream(self, skip_special_tokens)


class TextStream:
    """Generated ids in, text pieces out, as soon as they are complete.

    A piece is the text that the newest ids add to the decode of everything so far. Text ending in U+FFFD (the
    replacement character: a UTF-8 character whose bytes are split over several tokens) is held back until the
    character is complete, so no piece ever carries half a character; `finish()` returns what is still held.
    The pieces concatenate to exactly `decode(all ids)`. Each push decodes only a short window of recent ids
    (since the last piece), not the whole text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything yielded so far
        # ids[prefix:read] decoded gives the context the next piece is measured against: decoding from a few
        # ids back keeps decoders that treat the first token specially (a leading space) consistent.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the new complete text ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        decode = self._decode
        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        full = self._decode(self.ids)
        if not full.startswith(self.text):  # a decoder that rewrites earlier text; should not happen
            log.warning("incremental decode diverged from the full decode; the tail may repeat text")
            return ""
        rest = full[len(self.text) :]
        self.text = full
        self._prefix = self._read = len(self.ids)
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _added_token(value: Any, special: bool) -> AddedToken | None:
    """An AddedToken from a config value: a string, or a dict as transformers saves AddedToken objects."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", not special)),
            special=special,
        )
    return None


def _clean_up_tokenization(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")):
        text = text.replace(a, b)
    for a, b in ((" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _compile_template(source: str) -> Any:
    """The template in jinja2's immutable sandbox with transformers' settings and helpers (chat templates are
    untrusted code from model folders)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja's own tojson escapes HTML characters, which chat templates do not want
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
