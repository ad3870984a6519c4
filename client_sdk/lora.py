"""LoRA that the client owns, on the remote blocks: `model.add_lora(peft.LoraConfig(...))`.

The client holds PEFT's lora_A / lora_B for every targeted linear module of every remote block as its own
trainable parameters (`ClientLora`); each Forward/Backward sends the weights of a server's blocks along
(`LoraWeight`s in the request's Tuning) and Backward returns their gradients. `save` writes a standard PEFT
adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's key names), which loads with
`peft.PeftModel.from_pretrained(local_model, path)` and with `shard-server --adapters path`.

Target matching, rank/alpha patterns and initialisation follow PEFT exactly (its own helpers decide which
modules match), so this module imports peft: it is only imported when `add_lora` or `save_lora` is used.
Module names and shapes come from one block of the model family built on the meta device (no weights).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from client_sdk.tuning import LoraWeight
from swarm.models import ModelFamily

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model

# LoraConfig features the servers' plain `base(x) + scaling * B(A(x))` does not compute.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
}


class LoraPair(nn.Module):
    """PEFT's pair for one linear module: lora_A.weight [r, in], lora_B.weight [out, r]."""

    def __init__(self, in_features: int, out_features: int, r: int, init: bool | str) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)  # default init = kaiming_uniform(a=sqrt(5)), as PEFT
        self.lora_B = nn.Linear(r, out_features, bias=False)
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif isinstance(init, str) and init.lower() == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)
        elif init is not False:  # False keeps nn.Linear's init for both, as PEFT does
            raise ValueError(
                f"init_lora_weights={init!r} needs the frozen base weights, which live on the servers; "
                "use True, 'gaussian' or False"
            )


def linear_modules(family: ModelFamily) -> dict[str, tuple[int, int]]:
    """Every nn.Linear inside one block of `family`: path -> (in_features, out_features)."""
    with torch.device("meta"):
        block = family.build_block()
    return {name: (m.in_features, m.out_features) for name, m in block.named_modules() if isinstance(m, nn.Linear)}


class ClientLora(nn.Module):
    """LoRA weights for blocks [0, num_blocks) of a remote model; parameters named
    `layers.{block}.{module}.lora_A.weight` (as PEFT's, without the model's prefix)."""

    def __init__(self, config: LoraConfig, family: ModelFamily) -> None:
        super().__init__()
        for attr, what in _UNSUPPORTED.items():
            if getattr(config, attr, None):
                raise ValueError(f"client-owned LoRA does not support {what} (LoraConfig.{attr})")
        if getattr(config, "bias", "none") != "none":
            raise ValueError("client-owned LoRA does not train biases: use LoraConfig(bias='none')")
        self.config = copy.deepcopy(config)
        if self.config.target_modules is None:  # PEFT's default targets for the architecture
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

            model_type = family.config.model_type
            if model_type not in DEFAULTS:
                raise ValueError(f"give LoraConfig(target_modules=...): PEFT has no default for {model_type!r}")
            self.config.target_modules = list(DEFAULTS[model_type])
        self.family = family
        self.layers = nn.ModuleDict()
        self.targets: list[tuple[int, str, float]] = []  # (block, module, scaling), in parameter order
        modules = linear_modules(family)
        all_linear = self.config.target_modules == "all-linear"
        ranks: dict[str, int] = self.config.rank_pattern or {}
        alphas: dict[str, float] = self.config.alpha_pattern or {}
        for block in range(family.num_blocks):
            container = nn.Module()
            for name, (fin, fout) in modules.items():
                key = self._key(block, name)
                if not (all_linear or check_target_module_exists(self.config, key)):
                    continue
                r = ranks.get(get_pattern_key(list(ranks), key), self.config.r)
                alpha = alphas.get(get_pattern_key(list(alphas), key), self.config.lora_alpha)
                scaling = alpha / math.sqrt(r) if self.config.use_rslora else alpha / r
                _set_module(container, name, LoraPair(fin, fout, r, self.config.init_lora_weights))
                self.targets.append((block, name, scaling))
            if any(True for _ in container.children()):
                self.layers[str(block)] = container
        if not self.targets:
            raise ValueError(
                f"target_modules={self.config.target_modules!r} matches no linear module of the remote blocks; "
                f"a block has: {', '.join(modules)}"
            )

    def _key(self, block: int, module: str) -> str:
        """The module's name in a transformers model of this family, e.g. model.layers.3.self_attn.q_proj."""
        return f"{self.family.block_prefix(block)}{module}"

    def pair(self, block: int, module: str) -> LoraPair:
        pair = self.layers[str(block)].get_submodule(module)
        assert isinstance(pair, LoraPair)
        return pair

    def weights(self, start: int = 0, end: int | None = None) -> tuple[LoraWeight, ...]:
        """The weights of blocks [start, end) as the parameters themselves (so autograd reaches them)."""
        end = self.family.num_blocks if end is None else end
        out = []
        for block, module, scaling in self.targets:
            if start <= block < end:
                pair = self.pair(block, module)
                out.append(LoraWeight(block, module, pair.lora_A.weight, pair.lora_B.weight, scaling))
        return tuple(out)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's saved names: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ..."""
        state: dict[str, torch.Tensor] = {}
        for block, module, _ in self.targets:
            pair = self.pair(block, module)
            key = PEFT_PREFIX + self._key(block, module)
            state[f"{key}.lora_A.weight"] = pair.lora_A.weight.detach().contiguous().cpu()
            state[f"{key}.lora_B.weight"] = pair.lora_B.weight.detach().contiguous().cpu()
        return state

    def save(self, path: str | os.PathLike[str], base_model_name_or_path: str = "") -> Path:
        """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); returns its path."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        if base_model_name_or_path:
            config.base_model_name_or_path = base_model_name_or_path
        config.save_pretrained(str(folder))
        save_file(self.peft_state_dict(), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return folder


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at dotted `path` under `root`, creating empty parents as needed."""
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        child = getattr(node, name, None)
        if child is None:
            child = nn.Module()
            node.add_module(name, child)
        node = child
    node.add_module(leaf, module)
