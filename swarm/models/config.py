"""Model configs read straight from `config.json` into our own typed, frozen dataclasses.

Servers never import `transformers` (its config machinery alone costs ~2 s and ~100 MiB per process), so each
family declares the fields it needs, with the aliases and defaults transformers' config classes apply. Unknown
keys are kept in `extra` (read-only) for the few places that need something unusual.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="ModelConfig")


class ConfigError(ValueError):
    """config.json is missing a field this family needs, or holds a value we cannot serve."""


def read_config_json(model_path: Path) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


@dataclass(frozen=True)
class ModelConfig:
    """Fields every family has. Subclasses add their own and fill these from their own spellings."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # config.json key -> field name, for families whose checkpoints spell common fields differently
    aliases: ClassVar[dict[str, str]] = {}
    # fields whose default depends on other fields are filled in `_derive`
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a config.json object; missing required fields raise ConfigError naming them."""
        raw = dict(data)
        for src, dst in cls.aliases.items():
            if src in raw and dst not in raw:
                raw[dst] = raw[src]
        values: dict[str, Any] = {**cls.defaults}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values.update({k: v for k, v in raw.items() if k in names})
        # the keys no field takes (RoPE scaling, bias switches, ...): `_derive` may read them from here
        values["extra"] = {k: v for k, v in raw.items() if k not in names}
        values = cls._derive(values)
        missing = sorted(n for n in names if n not in values and _required(cls, n))
        if missing:
            raise ConfigError(f"config.json of a {raw.get('model_type')!r} model lacks {', '.join(missing)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def _derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Fill derived fields (head_dim from hidden_size, kv heads = heads, ...). Subclasses extend it.

        `values` holds the known fields found in config.json, and under "extra" every other key.
        """
        if "num_attention_heads" in values:
            values.setdefault("num_key_value_heads", values["num_attention_heads"])
            if values.get("head_dim") is None and "hidden_size" in values:
                values["head_dim"] = int(values["hidden_size"]) // int(values["num_attention_heads"])
        return values

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _required(cls: type[ModelConfig], name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
