"""A tiny random Llama that speaks text: a byte-level BPE tokenizer trained here in milliseconds (special tokens
and a ChatML chat template laid out as SmolLM2's) and a 4-block Llama whose vocabulary matches it. Nothing is
downloaded; outputs are random but deterministic, and transformers on the same folder is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.models import make_tiny_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 = Llama's default pad/bos/eos ids
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small swarm of servers that shared one model.",
    "user assistant system hello world what is the answer to two plus two",
    "Pollen runs large language models across many machines, block by block.",
    "Café, naïve, über, 東京, Москва: text is more than ASCII.",
] * 4
VOCAB_SIZE = 320


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_chat_model(path: Path, seed: int = 0) -> Path:
    """Save the tokenizer and a random 4-block Llama with its vocabulary size in `path`; returns `path`."""
    path = Path(path)
    tok = make_tokenizer()
    make_tiny_model("llama", path, seed=seed, vocab_size=tok.get_vocab_size())
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return path
