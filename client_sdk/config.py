"""ClientConfig: every option of the client in one frozen object; every wait and retry is bounded."""

from __future__ import annotations

import os
from dataclasses import dataclass

from swarm.errors import DhtUnavailable
from swarm.net import DEFAULT_MAX_MESSAGE_BYTES, Security

# A CA bundle for TLS, when no tls_ca is given (the swarm key's counterpart is swarm.auth.SWARM_KEY_ENV).
TLS_CA_ENV = "POLLEN_TLS_CA"


@dataclass(frozen=True)
class ClientConfig:
    """Client options (pass any of them as keyword arguments to the clients and `from_pretrained`)."""

    dht_timeout_s: float = 5.0  # one DHT call to one dht-node
    open_timeout_s: float = 30.0  # a server answering `open` (it may have to allocate the KV cache)
    step_timeout_s: float = 60.0  # one step on one server (a long prefill on a slow CPU takes a while)
    forward_timeout_s: float = 120.0  # one Forward/Backward call on one server
    # Inference steps (and opens) and Forward/Backward calls re-route around failed servers for as long as a
    # route exists, within this time budget counted from the call's first failure; a dead server whose DHT record
    # has not expired yet is banned and skipped, so it costs one failed attempt, never the whole budget.
    failover_budget_s: float = 60.0
    retry_backoff_s: float = 0.0  # sleep before the first retry (0: a dead server is replaced at once)
    max_backoff_s: float = 5.0  # later retries sleep min_backoff x 2^n up to this (at least 0.1 s)
    ban_s: float = 15.0  # first ban of a failed server; doubles per repeated failure, reset on success
    max_ban_s: float = 300.0
    max_view_age_s: float = 10.0  # re-read the DHT before routing if the view is older
    refresh_period_s: float = 30.0  # background DHT re-read + pings while the client is open (0 = off)
    ping_timeout_s: float = 2.0  # one RTT probe (Info RPC) to one server
    max_pinged: int = 16  # servers probed per refresh (the ones not measured yet first)
    rtt_ema_alpha: float = 0.3  # weight of a new RTT sample in the smoothed value
    missing_blocks_wait_s: float = 0.0  # wait this long for a server to join before "no server holds ..."
    # Forward/Backward: a batch is cut into parts of whole rows of at most this many tokens, run concurrently
    # over throughput-weighted routes (servers announcing a lower --max-batch-size get smaller parts).
    max_tokens_per_call: int = 1024
    use_push: bool = True  # servers forward hidden states to the next server of the chain themselves
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # dtype of hidden states on the wire: "float32", "float16" or "bfloat16" (None: the local head's dtype).
    # Servers compute in their own --dtype and reply in the dtype they receive; the client converts back.
    wire_dtype: str | None = None
    # Use only servers with at least this precision: float32 > float16 = bfloat16 > int8 > nf4 (None: any).
    min_precision: str | None = None
    # Route only through servers that hold this LoRA adapter (`shard-server --adapters`), and apply it (None: none).
    active_adapter: str | None = None
    # Private swarms (swarm.net.Security): the swarm key file shared by the swarm's processes (None: the file
    # named by $POLLEN_SWARM_KEY if set, else an open swarm) and a CA bundle to dial servers over TLS and verify
    # them (None: $POLLEN_TLS_CA if set, else plaintext gRPC).
    swarm_key: str | None = None
    tls_ca: str | None = None
    # The name to check in servers' certificates instead of the host dialled: peers announce IP addresses, while
    # one certificate for a whole private swarm may name a host only, e.g. "pollen" (None: $POLLEN_TLS_SERVER_NAME
    # if set, else the address's host). Needs TLS (tls_ca or $POLLEN_TLS_CA).
    tls_server_name: str | None = None
    # Verified outputs: this share of inference steps also runs on a second server holding the same span and
    # the outputs are compared; on a disagreement a third server decides and the one in the minority is banned
    # for the client's lifetime (its steps are redone elsewhere). 0 = off.
    verify_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens_per_call < 1:
            raise ValueError("max_tokens_per_call must be >= 1")
        if not 0 <= self.verify_fraction <= 1:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        names = ("dht_timeout_s", "open_timeout_s", "step_timeout_s", "forward_timeout_s", "ping_timeout_s")
        for name in (*names, "failover_budget_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite positive number of seconds")
        for name in ("retry_backoff_s", "ban_s", "missing_blocks_wait_s", "refresh_period_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if not 0 < self.rtt_ema_alpha <= 1:
            raise ValueError("rtt_ema_alpha must be in (0, 1]")
        if self.wire_dtype is not None and self.wire_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"wire_dtype must be float32, float16 or bfloat16, got {self.wire_dtype!r}")
        if self.min_precision is not None and self.min_precision not in (
            "float32",
            "bfloat16",
            "float16",
            "int8",
            "nf4",
        ):
            raise ValueError(
                f"min_precision must be float32, bfloat16, float16, int8 or nf4, got {self.min_precision!r}"
            )

    def security(self) -> Security:
        """The swarm key and TLS settings of every channel the client opens (DHT and servers). Raises ValueError
        (SwarmKeyError) naming the file or option to fix."""
        tls_ca = self.tls_ca or os.environ.get(TLS_CA_ENV, "").strip() or None
        return Security.from_options(swarm_key=self.swarm_key, tls_ca=tls_ca, tls_server_name=self.tls_server_name)

    def backoff_s(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): 0 first by default, then growing exponentially."""
        if attempt <= 1:
            return self.retry_backoff_s
        return min(self.max_backoff_s, max(self.retry_backoff_s, 0.1) * 2 ** (attempt - 2))


def explain_dht_failure(error: DhtUnavailable, security: Security) -> DhtUnavailable:
    """`error` with what to do when TLS refused the dht-nodes' certificate for the address dialled: peers are
    dialled by IP address, and a swarm's certificate often names a host only."""
    if security.tls is None or security.tls.server_name or "Hostname Verification" not in str(error):
        return error
    return DhtUnavailable(
        f"{error}\nThe dht-nodes' TLS certificate does not name the address dialled: give the name it holds as "
        "tls_server_name= (pollen --tls-server-name, or $POLLEN_TLS_SERVER_NAME)"
    )
