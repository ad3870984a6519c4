"""deploy/healthcheck.py, the probe in the image: against a real dht-node holding a swarm key (the health
service must stay open to a probe without the key), a gRPC health server in each state, over TLS, and HTTP."""

from __future__ import annotations

import datetime
import http.server
import importlib.util
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.cli_flags import REPO
from tests.launcher import SwarmProcesses

PROBE = REPO / "deploy" / "healthcheck.py"


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pollen_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = load_probe()


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    """The probe as Docker and the kubelet run it: a separate process, judged by its exit code."""
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_probe_follows_the_serving_status(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("pollen.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe.main([address]) == 0
    assert probe.main([address, "--service", "pollen.v1.Shard"]) == 1  # loading, moving or draining
    assert probe.main([address, "--service", "pollen.v1.Nope"]) == 1  # NOT_FOUND
    servicer.enter_graceful_shutdown()  # what a server does on SIGTERM
    assert probe.main([address]) == 1


def test_probe_fails_on_a_closed_port() -> None:
    out = run_probe("127.0.0.1:1", "--timeout", "2")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stdout


def test_probe_reaches_a_keyed_dht_node_without_the_key(tmp_path: Path) -> None:
    key = tmp_path / "swarm.key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    with SwarmProcesses() as swarm:
        dht = swarm.start_dht("dht0", None, "--swarm-key", str(key))
        out = run_probe(dht.address)
        assert out.returncode == 0, out.stdout + dht.log()
        assert run_probe(dht.address, "--service", "pollen.v1.Dht").returncode == 0
        # the env default, as the image's HEALTHCHECK uses it
        env_out = subprocess.run(
            [sys.executable, str(PROBE)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"POLLEN_HEALTHCHECK_ADDRESS": dht.address, "PATH": ""},
        )
        assert env_out.returncode == 0, env_out.stdout + env_out.stderr


def make_tls(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for DNS `name` (not for 127.0.0.1): (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
              ca: bool) -> x509.Certificate:  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pollen test CA")])
    ca_cert = build("pollen test CA", ca_name, ca_key, ca_key, ca=True)
    cert = build(name, ca_name, key, ca_key, ca=False)
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_probe_verifies_a_tls_server(tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path, "shard.pollen.test")
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        assert probe.main([address, "--tls-ca", str(ca), "--tls-server-name", "shard.pollen.test"]) == 0
        assert probe.main([address, "--tls-ca", str(ca), "--timeout", "2"]) == 1  # 127.0.0.1 is not in the cert
        assert probe.main([address, "--timeout", "2"]) == 1  # plaintext to a TLS server
    finally:
        server.stop(None)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_probe_checks_the_gateway_over_http() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert probe.main([f"{base}/healthz"]) == 0
        assert probe.main([f"{base}/draining"]) == 1  # the gateway answers 503 while it drains
        # a proxy in the environment must not carry the probe away from the container itself
        with pytest.MonkeyPatch.context() as env:
            env.setenv("http_proxy", "http://127.0.0.1:1")
            assert probe.main([f"{base}/healthz"]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert probe.main([f"{base}/healthz", "--timeout", "2"]) == 1  # nobody listening
