"""The client's tokenizer (`tokenizers` + tokenizer_config.json, no transformers) equals transformers' AutoTokenizer:
encode, decode (with and without special tokens) and the chat template, on the demo model SmolLM2 (skipped when
`make model` has not built models/smollm2-135m) and on a word-level tokenizer saved by transformers. `TextStream`
never yields half a character and its pieces add up to the full decode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from client_sdk.tokenizer import Tokenizer

SMOLLM2 = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m"
TEXTS = [
    "Hello world",
    " leading space, then digits 12345 and 3.14",
    "émojis 🦙🔥, 中文字符 and ünïcödé",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a  b\n\n\tc   ",
    "",
]
CHAT = [
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh scattering."},
    {"role": "user", "content": "And sunsets? 🌅"},
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent (build it with `make model`)")
    return SMOLLM2


@pytest.fixture(scope="module")
def word_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer saved the way transformers saves one (special tokens only in tokenizer_config)."""
    folder = tmp_path_factory.mktemp("word-level")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


def load(folder: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer is not None
    return tokenizer


def test_smollm2_encode_decode_equal_transformers(smollm2: Path) -> None:
    ref, ours = AutoTokenizer.from_pretrained(smollm2), load(smollm2)
    for text in TEXTS:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )


def test_smollm2_chat_template_equals_transformers(smollm2: Path) -> None:
    ref, ours = AutoTokenizer.from_pretrained(smollm2), load(smollm2)
    for messages in (CHAT, CHAT[:1], [{"role": "system", "content": "Be brief."}, *CHAT[:1]]):
        for add in (False, True):
            text = ref.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=add, tokenize=False) == text
            ids = ref.apply_chat_template(messages, add_generation_prompt=add, tokenize=True)
            ids = ids if isinstance(ids, list) else list(ids["input_ids"])
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == ids


def test_tokenizer_saved_by_transformers_equals_it(word_level: Path) -> None:
    ref, ours = AutoTokenizer.from_pretrained(word_level), load(word_level)
    for text in ("w17 w42 w9", "<s> w5 </s> w6 unknown"):
        ids = ref(text).input_ids
        assert ours.encode(text) == ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == ref.eos_token_id == 2
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHAT)


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    assert Tokenizer.from_folder(tmp_path) is None


def stream_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids]
    return [*pieces, stream.finish()]


def test_text_stream_holds_back_split_characters(smollm2: Path) -> None:
    tok = load(smollm2)
    text = "Sky 🦙🔥 blue, 中文 ok.<|im_end|>"
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "" in pieces[:-1]  # the emoji's first byte tokens were held back until complete
    # Generation stopped in the middle of a character: the tail is what decode gives (a replacement char).
    cut = tok.encode("ok 🦙")[:-1]
    pieces = stream_pieces(tok, cut)
    assert "".join(pieces) == tok.decode(cut, skip_special_tokens=True) and pieces[-1].endswith("\ufffd")


def test_text_stream_of_a_word_level_tokenizer(word_level: Path) -> None:
    tok = load(word_level)
    ids = tok.encode("w3 w4 </s> w5")
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "w3 w4 w5"
