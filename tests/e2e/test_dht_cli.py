"""`dht-node` as real processes: a bootstrap node and two joiners, records across them, clean SIGTERM,
the help text, and the promise that dht_node never imports torch."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.blocks import block_key
from swarm.dht_client import DhtClient
from swarm.errors import Unauthenticated
from swarm.identity import Identity
from swarm.net import Security
from swarm.records import MODELS_KEY, ModelRecord, ServerRecord, model_key
from tests.integration.dht_support import make_tls_files
from tests.launcher import BIN, SwarmProcesses

pytestmark = pytest.mark.e2e
HANG_S = 120.0  # bounds that only catch a hang; nothing here is a speed requirement

FLAGS = [
    "--bootstrap",
    "--initial-peers",
    "--host",
    "--port",
    "--ready-file",
    "--ksize",
    "--alpha",
    "--rpc-timeout",
    "--republish-period",
    "--max-value-bytes",
    "--max-subkeys-per-key",
    "--max-keys",
    "--log-level",
    "--announce-host",
    "--identity",
    "--client",
    "--probe",
    "--allow-unsigned",
    "--max-total-bytes",
    "--udp-rate-per-ip",
    "--grpc-rate-per-ip",
    "--swarm-key",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
]


async def test_store_on_one_process_get_on_another_then_sigterm() -> None:
    with SwarmProcesses() as procs:
        flags = ("--ksize", "2", "--rpc-timeout", "0.5", "--allow-unsigned")  # plain sub-keys in this test
        boot = procs.start_dht("dht0", None, *flags)
        joiners = [procs.start_dht(f"dht{i}", [boot.address], *flags) for i in (1, 2)]
        nodes = [boot, *joiners]
        try:
            writer = DhtClient([joiners[0].address], allow_unsigned=True)
            assert await asyncio.wait_for(
                writer.store("e2e.key", "peer", b"across processes", time.time() + 60), HANG_S
            )
            await writer.close()
            for proc in (boot, joiners[1]):
                reader = DhtClient([proc.address], allow_unsigned=True)
                record = await asyncio.wait_for(reader.get("e2e.key"), HANG_S)
                await reader.close()
                assert record["peer"].value == b"across processes"
        except BaseException:
            print(procs.logs())
            raise
        for proc in nodes:
            # the ready line on stdout (the launcher sends stdout to the log file)
            assert f"dht-node ready at {proc.address}" in proc.log()
        for proc in reversed(nodes):
            # a clean exit on SIGTERM (exit code 0; a hang would be SIGKILLed and fail here)
            code = procs.stop(proc, signal.SIGTERM, timeout_s=HANG_S)
            assert code == 0, proc.log()
            assert "stopped" in proc.log(), proc.log()


def test_ready_line_is_the_only_stdout_and_sigint_exits_zero() -> None:
    proc = subprocess.Popen(
        [str(BIN / "dht-node"), "--bootstrap", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], HANG_S)
        assert ready, f"no ready line within {HANG_S:.0f} s"
        line = proc.stdout.readline()
        assert re.fullmatch(r"dht-node ready at 127\.0\.0\.1:\d+\n", line), line
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=HANG_S)
        assert proc.returncode == 0
        assert rest == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_help_mentions_every_flag() -> None:
    out = subprocess.run([str(BIN / "dht-node"), "--help"], capture_output=True, text=True, timeout=HANG_S, check=True)
    for flag in FLAGS:
        assert flag in out.stdout, flag


def test_bootstrap_and_initial_peers_are_exclusive_and_required() -> None:
    for argv in ([], ["--bootstrap", "--initial-peers", "127.0.0.1:1"], ["--initial-peers", "nohost"]):
        out = subprocess.run([str(BIN / "dht-node"), *argv], capture_output=True, text=True, timeout=HANG_S)
        assert out.returncode == 2, (argv, out.stderr)


def test_dht_node_does_not_import_torch() -> None:
    code = "import sys, dht_node.cli, dht_node.node; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=HANG_S)


async def test_probe_prints_models_and_blocks_and_identity_is_private(tmp_path: object) -> None:
    with SwarmProcesses() as procs:
        key_file = f"{tmp_path}/dht.key"
        boot = procs.start_dht("dht0", None, "--identity", key_file, "--rpc-timeout", "0.5")
        second = procs.start_dht("dht1", [boot.address], "--rpc-timeout", "0.5")
        assert os.stat(key_file).st_mode & 0o777 == 0o600
        client = DhtClient([second.address])
        try:
            expiration = time.time() + 60
            for start, end in ((0, 3), (3, 6)):
                server = Identity.generate()
                record = ServerRecord(peer_id=server.peer_id, address=f"127.0.0.1:{9000 + start}", model_id="probe-m",
                                      start=start, end=end)  # fmt: skip
                for i in range(start, end):
                    assert await client.store_signed(server, block_key("probe-m", i), record.encode(), expiration)
                info = ModelRecord(model_id="probe-m", name="llama", num_blocks=8).encode()
                for key in (MODELS_KEY, model_key("probe-m")):
                    assert await client.store_signed(server, key, info, expiration)
        finally:
            await client.close()
        out = subprocess.run([str(BIN / "dht-node"), "--probe", boot.address], capture_output=True, text=True,
                             timeout=HANG_S)  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:3] == ["MODEL", "NAME", "BLOCKS"]
        assert lines[1].split() == ["probe-m", "llama", "8", "6", "6,7", "0", "2"], out.stdout
        assert sum("127.0.0.1:900" in line for line in lines) == 2
        # the probe joined as a client: the nodes it asked still know only each other
        for proc in (boot, second):
            pinger = DhtClient([proc.address])
            assert (await pinger.ping()).peers == 1
            await pinger.close()


async def test_private_swarm_of_processes_with_a_key_file_and_tls(tmp_path: Path) -> None:
    """`dht-node --swarm-key FILE --tls-cert --tls-key`: members read and write, strangers are refused."""
    key_file = tmp_path / "swarm.key"
    assert subprocess.run([sys.executable, "-m", "swarm.auth", str(key_file)], check=True, timeout=HANG_S)
    tls = make_tls_files(tmp_path)
    flags = ("--swarm-key", str(key_file), "--tls-cert", tls["cert"], "--tls-key", tls["key"], "--rpc-timeout", "1")
    with SwarmProcesses() as procs:
        boot = procs.start_dht("dht0", None, *flags)
        joiner = procs.start_dht("dht1", [boot.address], *flags)
        stranger = procs.start_dht("dht2", [boot.address], "--rpc-timeout", "1")  # no key: joins nobody
        member = Security.from_options(str(key_file), tls_ca=tls["ca"])
        client = DhtClient([joiner.address], security=member)
        try:
            assert (await asyncio.wait_for(client.ping(), HANG_S)).peers == 1  # the stranger is not a contact
            server = Identity.generate()
            key = block_key("keyed-m", 0)
            record = ServerRecord(peer_id=server.peer_id, address="127.0.0.1:9", model_id="keyed-m", start=0, end=1)
            assert await asyncio.wait_for(client.store_signed(server, key, record.encode(), time.time() + 60), HANG_S)
            reader = DhtClient([boot.address], security=member)
            assert server.peer_id in await asyncio.wait_for(reader.get(key), HANG_S)
            await reader.close()
            outsider = DhtClient([boot.address], security=Security(tls=member.tls))  # TLS but no key
            with pytest.raises(Unauthenticated):
                await asyncio.wait_for(outsider.get(key), HANG_S)
            await outsider.close()
            plain = DhtClient([stranger.address])
            assert (await asyncio.wait_for(plain.ping(), HANG_S)).peers == 0
            await plain.close()
        finally:
            await client.close()
    # a weak or missing key is a clear startup error (argparse exit code 2)
    weak = tmp_path / "weak.key"
    weak.write_text("password123")
    for path in (weak, tmp_path / "missing.key"):
        out = subprocess.run([str(BIN / "dht-node"), "--bootstrap", "--swarm-key", str(path)], capture_output=True,
                             text=True, timeout=HANG_S)  # fmt: skip
        assert out.returncode == 2 and "swarm key file" in out.stderr, out.stderr
