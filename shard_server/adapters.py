"""`--adapters`: PEFT LoRA adapters read straight from their folders (adapter_config.json +
adapter_model.safetensors), for this server's blocks only, without importing peft (~4.5 s and transformers).

PEFT saves one `lora_A`/`lora_B` pair per adapted linear module, keyed by the module's name in the model it wrapped:
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (Llama-like causal LMs),
`base_model.model.transformer.h.3.self_attention.query_key_value.lora_B.weight` (BLOOM, Falcon). Variants read as
well: an adapter name before `.weight` (`lora_A.default.weight`), and models wrapped without their LM head
(`base_model.model.layers.3...`, `base_model.model.h.3...`). Only the header is read for other blocks' keys.

Scaling as PEFT computes it: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` and
`alpha_pattern` are matched against the module's full name with PEFT's rule (`(.*\\.)?(pattern)$`). Features
that change more than `y += scaling * B(A(x))` on the blocks (DoRA, trained biases, fan_in_fan_out, LoRA on
parameters or outside the blocks, modules_to_save inside the blocks, ...) are refused with a message naming them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shard_server.loader import LoadError
from swarm.blocks import BlockRange
from swarm.models import Span
from swarm.models.lora import LoraKey, LoraSet, LoraWeights, linear_modules

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # what ServerRecord.adapters accepts
MAX_ADAPTERS = 32
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")

# adapter_config.json fields that change what LoRA computes: refused unless absent/false/empty/"none"
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "target_parameters": "LoRA on parameters (e.g. MoE experts)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens (embeddings live on the client)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "megatron_config": "Megatron layers",
}


class AdapterError(LoadError):
    """An adapter cannot be served (missing files, unsupported feature, wrong model); one line for the operator."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path

    @staticmethod
    def parse(text: str) -> AdapterSpec:
        """`NAME=PATH` or `PATH` (the name is then the folder's name)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text.rstrip("/")).name, text
        if not NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be 1-64 of letters, digits, '.', '_', '-' ({text!r})")
        return AdapterSpec(name, Path(path).expanduser())


def parse_specs(items: Sequence[str]) -> tuple[AdapterSpec, ...]:
    specs = tuple(AdapterSpec.parse(item) for item in items if item.strip())
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdapterError(f"adapter names must be unique; repeated: {', '.join(duplicates)} (use NAME=PATH)")
    if len(specs) > MAX_ADAPTERS:
        raise AdapterError(f"at most {MAX_ADAPTERS} adapters per server, got {len(specs)}")
    return specs


class BlockKeys:
    """Parses adapter keys of one model family: which block, which module path inside it."""

    def __init__(self, block_prefix: str) -> None:
        # block_prefix(7) = "model.layers.7." -> optional lead "model.", container "layers"
        parts = block_prefix.rstrip(".").split(".")
        lead, container = parts[:-2], parts[-2]
        optional = "".join(f"(?:{re.escape(p)}\\.)?" for p in lead)
        self.pattern = re.compile(rf"{optional}{re.escape(container)}\.(?P<block>\d+)\.(?P<rest>.+)")

    def parse(self, key: str) -> tuple[int, str, str, str] | None:
        """(block, module path, "A"|"B", full module name) of a LoRA key inside a block; None otherwise."""
        name = key.removeprefix(KEY_PREFIX)
        inner = self.pattern.fullmatch(name)
        if inner is None:
            return None
        lora = LORA_KEY.fullmatch(inner["rest"])
        if lora is None:
            return None
        full = name[: len(name) - len(inner["rest"])] + lora["module"]
        return int(inner["block"]), lora["module"], lora["ab"], full


def pattern_key(patterns: Sequence[str], module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the module's full name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


def read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path} is not a PEFT adapter folder: no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported, this one is {peft_type or 'of no peft_type'}")
    refused = [what for key, what in UNSUPPORTED.items() if config.get(key) not in (None, False, [], {}, "")]
    if str(config.get("bias", "none")) != "none":
        refused.append(f"bias={config['bias']!r} (trained biases)")
    if refused:
        raise AdapterError(f"{path}: not supported by shard-server: {', '.join(refused)}")
    return config


def load_adapter(
    spec: AdapterSpec,
    block_prefix: str,
    blocks: BlockRange,
    modules: Mapping[str, tuple[int, int]],  # the blocks' linear modules: path -> (in, out)
    block_module_names: Sequence[str] = (),  # every module path inside a block (for modules_to_save)
) -> LoraSet:
    """The adapter's LoRA for blocks [start, end) on the CPU, in the adapter file's dtype (tensors of other blocks
    are never read). Raises AdapterError with a one-line reason."""
    from safetensors import safe_open

    path = spec.path
    config = read_config(path)
    for saved in config.get("modules_to_save") or ():
        inside = [m for m in block_module_names if m == saved or m.endswith(f".{saved}")]
        if inside:
            raise AdapterError(f"{path}: modules_to_save {saved!r} replaces modules inside the blocks ({inside[0]})")
        log.warning("adapter %s: modules_to_save %r is outside the blocks; the client holds it", spec.name, saved)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        bin_only = (path / "adapter_model.bin").exists()
        other = " (only adapter_model.bin: save it with safe_serialization=True)" if bin_only else ""
        raise AdapterError(f"{path}: no {WEIGHTS_FILE}{other}")
    parser = BlockKeys(block_prefix)
    rank_patterns = list((config.get("rank_pattern") or {}).keys())
    alpha_patterns = list((config.get("alpha_pattern") or {}).keys())
    pairs: dict[LoraKey, dict[str, torch.Tensor]] = {}
    full_names: dict[LoraKey, str] = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 — safe_open is not a dict
            parsed = parser.parse(key)
            if parsed is None:
                if "lora_" in key:
                    raise AdapterError(
                        f"{path}: LoRA weights outside the transformer blocks (or for another model) are not "
                        f"supported: {key}"
                    )
                continue  # modules_to_save outside the blocks (warned above)
            block, module, which, full = parsed
            if not blocks.start <= block < blocks.end:
                continue
            if module not in modules:
                raise AdapterError(f"{path}: {key}: {module!r} is not a linear module of this model's blocks")
            pairs.setdefault((block, module), {})[which] = f.get_tensor(key)
            full_names[(block, module)] = full
    weights: list[tuple[LoraKey, LoraWeights]] = []
    for (block, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: block {block} module {module!r} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        in_features, out_features = modules[module]
        fits = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1]
        if not fits or a.shape[1] != in_features or b.shape[0] != out_features:
            raise AdapterError(
                f"{path}: block {block} {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit a "
                f"[{out_features}, {in_features}] layer (an adapter for another model?)"
            )
        full = full_names[(block, module)]
        rank = int(a.shape[0])
        r_key = pattern_key(rank_patterns, full)
        expected_rank = int(config["rank_pattern"][r_key]) if r_key is not None else int(config.get("r", rank))
        if expected_rank != rank:
            raise AdapterError(f"{path}: {full}: lora_A has rank {rank}, adapter_config.json says {expected_rank}")
        a_key = pattern_key(alpha_patterns, full)
        alpha = float(config["alpha_pattern"][a_key]) if a_key is not None else float(config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights.append(((block, module), LoraWeights(a, b, scaling)))
    log.info("adapter %s (%s): %d LoRA modules on blocks %s", spec.name, path, len(weights), blocks)
    return LoraSet.of(weights)


def load_adapters(specs: Sequence[AdapterSpec], span: Span, dtype: torch.dtype) -> dict[str, LoraSet]:
    """Every adapter for the span's blocks, on the span's device in `dtype` (by name)."""
    if not specs:
        return {}
    block = span.layers[0]
    modules = linear_modules(block)
    names = [name for name, _ in block.named_modules() if name]
    prefix = span.family.block_prefix(0)
    device = next(iter(span.parameters())).device
    return {spec.name: load_adapter(spec, prefix, span.blocks, modules, names).to(device, dtype) for spec in specs}
