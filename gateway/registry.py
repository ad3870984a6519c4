"""The models a gateway serves: one AsyncSwarmClient each, found by any of its names (the DHT id, the
`--model` text, the folder's path)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from client_sdk import AsyncSwarmClient
from client_sdk.tokenizer import Tokenizer
from gateway.config import ModelSpec
from gateway.conversation import session_limit
from swarm.errors import InvalidRequest, PollenError

log = logging.getLogger(__name__)


class UnknownModel(PollenError):
    """The request names a model this gateway does not serve (HTTP 404)."""


class NoTokenizer(InvalidRequest):
    """The model folder has no tokenizer.json, so text cannot be encoded."""


@dataclass
class ModelEntry:
    name: str  # the model id (DHT namespace), what /v1/models lists
    client: AsyncSwarmClient
    aliases: set[str] = field(default_factory=set)

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.client.tokenizer
        if tok is None:
            raise NoTokenizer(f"model {self.name} has no tokenizer.json in its folder: text cannot be encoded")
        return tok

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.client.local.eos_token_ids)

    @property
    def num_blocks(self) -> int:
        return self.client.local.num_blocks

    def max_length(self, limit: int) -> int:
        return session_limit(self.client, limit)


class Registry:
    """Clients by model name; `get(None)` works when exactly one model is served."""

    def __init__(self, entries: Sequence[ModelEntry]) -> None:
        self.entries = list(entries)
        self._by_name: dict[str, ModelEntry] = {}
        for entry in self.entries:
            for name in {entry.name, *entry.aliases}:
                self._by_name.setdefault(name, entry)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], specs: Sequence[ModelSpec], **client_options: Any) -> Registry:
        """Load each model's local parts and read the swarm (raises if no dht-node answers)."""
        entries: list[ModelEntry] = []
        try:
            for spec in specs:
                client = AsyncSwarmClient(list(initial_peers), spec.source, spec.model_id, **client_options)
                entries.append(ModelEntry(client.model_id, client, {spec.source, str(client.local.path)}))
                await client.connect()
        except BaseException:
            await asyncio.gather(*(e.client.aclose() for e in entries), return_exceptions=True)
            raise
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            await asyncio.gather(*(e.client.aclose() for e in entries), return_exceptions=True)
            raise ValueError(f"two --model options name the same model id: {names}")
        return cls(entries)

    def get(self, name: str | None) -> ModelEntry:
        if not name:
            if len(self.entries) == 1:
                return self.entries[0]
            raise UnknownModel(f"name a model: this gateway serves {', '.join(self.names)}")
        entry = self._by_name.get(name)
        if entry is None:
            raise UnknownModel(f"model {name!r} is not served here; available: {', '.join(self.names)}")
        return entry

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    async def aclose(self) -> None:
        await asyncio.gather(*(e.client.aclose() for e in self.entries), return_exceptions=True)
