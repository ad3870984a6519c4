"""`tls_server_name` on the client side: a TLS swarm whose one certificate names only the host "pollen" (no IP
SAN), with a dht-node and two shard-servers (0:2, 2:4 of a tiny chat model) dialled by 127.0.0.1, as peers announce
IP addresses. A SwarmClient given `tls_server_name="pollen"` (or $POLLEN_TLS_SERVER_NAME) generates transformers'
greedy tokens; without it the TLS name check fails and it says so; `pollen generate --tls-server-name` likewise.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client_sdk import SwarmClient
from swarm.errors import DhtUnavailable
from swarm.net import TLS_SERVER_NAME_ENV
from tests.gateway.chat_model import make_chat_model
from tests.gateway.conftest import reference_greedy, reference_tokenizer
from tests.integration.dht_support import make_tls_files
from tests.launcher import BIN, Proc, SwarmProcesses

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
NEW_TOKENS = 10


@dataclass
class TlsSwarm:
    dht: Proc
    model: Path
    ca: str


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSwarm]:
    model = make_chat_model(tmp_path_factory.mktemp("tls-chat-model"))
    tls = make_tls_files(tmp_path_factory.mktemp("tls"), common_name="pollen", ips=())
    flags = ("--tls-cert", tls["cert"], "--tls-key", tls["key"], "--tls-ca", tls["ca"], "--tls-server-name", "pollen")
    with SwarmProcesses() as procs:
        try:
            dht = procs.start_dht("dht0", None, *flags)
            servers = [
                procs.start_server(
                    model, r, [dht.address], *flags, "--throughput", "100", "--network-mbps", "1000", wait=False
                )  # fmt: skip
                for r in ("0:2", "2:4")
            ]
            for server in servers:
                procs.wait_ready(server)
            yield TlsSwarm(dht, model, tls["ca"])
        except BaseException:
            print(procs.logs())
            raise


@pytest.fixture(scope="module")
def reference(swarm: TlsSwarm) -> tuple[list[int], list[int], str]:
    """(prompt ids, transformers' greedy tokens, their text)."""
    tok: Any = reference_tokenizer(swarm.model)
    ids = list(tok(PROMPT).input_ids)
    tokens = reference_greedy(swarm.model, ids, NEW_TOKENS)
    return ids, tokens, tok.decode(tokens, skip_special_tokens=True)


@pytest.fixture(autouse=True)
def no_name_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TLS_SERVER_NAME_ENV, raising=False)


def test_client_with_the_server_name_generates(swarm: TlsSwarm, reference: tuple[list[int], list[int], str]) -> None:
    ids, tokens, _ = reference
    with SwarmClient([swarm.dht.address], swarm.model, tls_ca=swarm.ca, tls_server_name="pollen") as client:
        tls = client.async_client.security.tls
        assert tls is not None and tls.server_name == "pollen"
        assert sorted((r.start, r.end) for r in client.info().servers) == [(0, 2), (2, 4)]
        assert client.generate(ids, max_new_tokens=NEW_TOKENS) == tokens  # push between servers is TLS too


def test_server_name_from_the_environment(
    swarm: TlsSwarm, reference: tuple[list[int], list[int], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, tokens, _ = reference
    monkeypatch.setenv(TLS_SERVER_NAME_ENV, "pollen")
    with SwarmClient([swarm.dht.address], swarm.model, tls_ca=swarm.ca) as client:
        assert client.generate(ids, max_new_tokens=NEW_TOKENS) == tokens


def test_without_the_server_name_a_clear_error(swarm: TlsSwarm) -> None:
    # 127.0.0.1 is not in the certificate: the handshake fails, so no dht-node answers
    with pytest.raises(DhtUnavailable, match="give the name it holds as tls_server_name") as failed:
        SwarmClient([swarm.dht.address], swarm.model, tls_ca=swarm.ca, dht_timeout_s=3.0)
    print(f"\nwithout tls_server_name: {failed.value}")
    with pytest.raises(DhtUnavailable):
        SwarmClient([swarm.dht.address], swarm.model, tls_ca=swarm.ca, tls_server_name="other", dht_timeout_s=3.0)
    with pytest.raises(ValueError, match="needs TLS"):
        SwarmClient([swarm.dht.address], swarm.model, tls_server_name="pollen")


def pollen(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (TLS_SERVER_NAME_ENV, "POLLEN_TLS_CA")}
    return subprocess.run([str(BIN / "pollen"), *args], capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip


def test_pollen_generate_takes_the_flag(swarm: TlsSwarm, reference: tuple[list[int], list[int], str]) -> None:
    base = ["generate", "--initial-peers", swarm.dht.address, "--model", str(swarm.model), PROMPT,
            "--max-new-tokens", str(NEW_TOKENS), "--tls-ca", swarm.ca]  # fmt: skip
    run = pollen(*base, "--tls-server-name", "pollen")
    assert run.returncode == 0, run.stderr
    assert run.stdout == reference[2] + "\n"
    refused = pollen(*base, "--log-level", "ERROR")
    assert refused.returncode == 1 and "--tls-server-name" in refused.stderr, refused.stderr
    no_tls = pollen("generate", "--initial-peers", swarm.dht.address, "--model", str(swarm.model), PROMPT,
                    "--tls-server-name", "pollen")  # fmt: skip
    assert no_tls.returncode == 1 and "needs TLS" in no_tls.stderr, no_tls.stderr
