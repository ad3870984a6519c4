"""GatewayConfig: every option of the gateway process in one frozen object, built by `pollen gateway`; and
ModelSpec, one `--model` option: `PATH_OR_NAME` serves a model under its default DHT id (the folder's or hub
repo's name), `PATH_OR_NAME=MODEL_ID` under another id (servers started with `--model-id`). No heavy imports
here: `pollen --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    source: str  # local folder or org/name in the local Hugging Face cache
    model_id: str | None = None  # DHT id when it differs from the default

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`PATH_OR_NAME` or `PATH_OR_NAME=MODEL_ID` (a path that exists is never split)."""
        if "=" in text and not Path(text).exists():
            source, _, model_id = text.rpartition("=")
            if not source or not model_id:
                raise ValueError(f"--model {text!r}: expected PATH_OR_NAME or PATH_OR_NAME=MODEL_ID")
            return cls(source, model_id)
        return cls(text)


@dataclass(frozen=True)
class GatewayConfig:
    initial_peers: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line tells which)
    # Requests generating at once plus open WebSocket sessions; one more gets HTTP 429 (or an error frame).
    max_concurrency: int = 16
    max_length: int = 2048  # tokens of one session (prompt + output); servers may allow fewer
    max_request_bytes: int = 1 << 20  # HTTP bodies and WebSocket messages
    api_keys: frozenset[str] = field(default_factory=frozenset)  # empty: no authentication
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers (browsers allow same-origin only)
    update_period_s: float = 10.0  # how often the swarm state (dashboard, /api/v1/state, metrics) is rebuilt
    ws_idle_timeout_s: float = 300.0  # a WebSocket that sends nothing this long is closed (frees server caches)
    shutdown_grace_s: float = 10.0  # on SIGTERM, in-flight requests get this long to finish
    access_log: bool = True
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ValueError("--initial-peers needs at least one HOST:PORT of a dht-node")
        if not self.models:
            raise ValueError("give at least one --model")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_concurrency", "max_length", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("update_period_s", "ws_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")


def read_api_keys(path: Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with `#` are ignored. An empty file is an error (it would
    silently turn authentication off)."""
    keys = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if any(c.isspace() for c in line) or len(line) > 256:
                raise ValueError(f"{path}: an API key is one word of at most 256 characters")
            keys.add(line)
    if not keys:
        raise ValueError(f"{path} holds no API keys")
    return frozenset(keys)
