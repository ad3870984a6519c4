"""Find a model's files (local folder or local Hugging Face cache) and read chosen tensors from its
safetensors checkpoint (one file or sharded with an index) without materialising the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder, or a hub name looked up in the local HF cache only (Pollen never downloads here)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a folder but has no config.json; is it a Hugging Face model folder?")
        return path.resolve()
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # noqa: BLE001 — any failure means "not in the cache"
            raise ModelNotFound(
                f"model {name!r} is neither a local folder nor in the local Hugging Face cache "
                f"({type(e).__name__}). Download it first (e.g. `huggingface-cli download {name}`) "
                f"or pass the path of a folder with config.json and *.safetensors"
            ) from e
        if (cached / "config.json").is_file():
            return cached
    raise ModelNotFound(
        f"model {name!r} not found: pass a folder with config.json and *.safetensors, "
        f"or an org/name already in the local Hugging Face cache"
    )


def default_model_id(name_or_path: str | os.PathLike[str]) -> str:
    """The DHT namespace of a model when none is given: the hub name, or the folder's name."""
    text = str(name_or_path).rstrip("/")
    path = Path(text).expanduser()
    if path.is_dir():
        snapshot_parent = path.parent.parent
        if path.parent.name == "snapshots" and snapshot_parent.name.startswith("models--"):
            return snapshot_parent.name.removeprefix("models--").replace("--", "/")
        return path.resolve().name
    return text


def config_fingerprint(model_path: Path) -> str:
    """Short hash of config.json's content: servers and clients of one model must agree on it."""
    with open(model_path / "config.json", "rb") as f:
        config = json.load(f)
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    canonical = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


class Checkpoint:
    """Lazy reader of a safetensors checkpoint: knows which file holds which tensor, reads only on demand."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self._file_of: dict[str, Path] = {}
        index = model_path / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {k: model_path / v for k, v in weight_map.items()}
        elif (model_path / SINGLE_FILE).is_file():
            with safe_open(model_path / SINGLE_FILE, framework="pt") as f:
                self._file_of = {k: model_path / SINGLE_FILE for k in f.keys()}
        else:
            files = sorted(model_path.glob("*.safetensors"))
            if not files:
                raise ModelNotFound(f"{model_path} has no *.safetensors weights (.bin pickles are not loaded)")
            for file in files:
                with safe_open(file, framework="pt") as f:
                    self._file_of.update({k: file for k in f.keys()})
        self.tensors_read: list[str] = []  # every key ever read, for audits and tests

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self._file_of if k.startswith(prefix)]

    def read(self, keys: Iterable[str], device: str = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly these tensors, opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self._file_of:
                raise KeyError(f"tensor {key!r} is not in the checkpoint at {self.model_path}")
            by_file.setdefault(self._file_of[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt", device=device) as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key)
        self.tensors_read.extend(out)
        return out

    def read_prefix(self, prefix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Tensors under `prefix`, with the prefix stripped from their names."""
        keys = self.keys_with_prefix(prefix)
        return {k[len(prefix) :]: v for k, v in self.read(keys, device).items()}
