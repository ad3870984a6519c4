"""The swarm key (files, derivation), per-call proofs (freshness, replays, wrong keys), per-IP buckets, and the
DHT's datagram MAC and address tokens — everything of private swarms that needs no network."""

from __future__ import annotations

import os
import stat

import pytest

from dht_node.datagram import AddressGuard, DatagramSeal
from swarm.access import RateLimiter, peer_ip
from swarm.auth import CallSigner, CallVerifier, ReplayCache, SwarmKey, SwarmKeyError, load_swarm_key, main
from swarm.net import Security, TlsFiles

METHOD = "/pollen.v1.Dht/Get"


def test_key_files_hex_raw_and_generated(tmp_path):
    secret = os.urandom(32)
    (tmp_path / "hex").write_text(secret.hex() + "\n")
    (tmp_path / "spaced").write_text(" ".join(secret.hex()[i : i + 8] for i in range(0, 64, 8)))
    raw = secret + b"\n"  # a raw binary key whose last byte happens to be a newline is still 33 raw bytes
    (tmp_path / "raw").write_bytes(raw)
    assert SwarmKey.from_file(tmp_path / "hex").secret == secret
    assert SwarmKey.from_file(tmp_path / "spaced").secret == secret
    assert SwarmKey.from_file(tmp_path / "raw").secret in (secret, raw)
    assert main([str(tmp_path / "new.key")]) == 0
    made = tmp_path / "new.key"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert len(SwarmKey.from_file(made).secret) == 32
    assert main([str(made)]) == 1  # never overwrites a key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ab" * 16, "at least 32 bytes"),  # 16 bytes of hex
        (b"correct horse battery staple and more words", "passphrase"),
        (b"\x00" * 64, "repetitive"),
        (b"00" * 40, "repetitive"),
        (b"\n", "empty"),
    ],
)
def test_weak_keys_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "weak"
    path.write_bytes(content)
    with pytest.raises(SwarmKeyError, match=message):
        SwarmKey.from_file(path)


def test_missing_key_and_the_environment(tmp_path):
    with pytest.raises(SwarmKeyError, match="does not exist.*python -m swarm.auth"):
        SwarmKey.from_file(tmp_path / "nope")
    assert load_swarm_key(None, env={}) is None
    path = tmp_path / "k"
    SwarmKey.generate().write(path)
    assert load_swarm_key(None, env={"POLLEN_SWARM_KEY": str(path)}) == SwarmKey.from_file(path)
    with pytest.raises(SwarmKeyError, match="must name a key file"):
        load_swarm_key(None, env={"POLLEN_SWARM_KEY": "deadbeef" * 8})
    security = Security.from_options(str(path))
    assert security.swarm_key is not None and security.tls is None
    assert security.swarm_key.key_id in security.describe() and path.read_text().strip() not in repr(security)


def test_tls_files_are_checked(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        TlsFiles(cert=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no such file"):
        TlsFiles(ca=str(tmp_path / "ca.pem"))


def test_derived_keys_differ_per_use_and_per_swarm():
    a, b = SwarmKey.generate(), SwarmKey.generate()
    assert a.derive("grpc-call") != a.derive("dht-datagram")
    assert a.derive("grpc-call") == SwarmKey(a.secret).derive("grpc-call") != b.derive("grpc-call")
    assert a.key_id != b.key_id and len(a.key_id) == 8


def test_proofs_verify_once_within_the_window():
    key = SwarmKey.generate()
    now = [1_000_000.0]
    signer = CallSigner(key, clock=lambda: now[0])
    verifier = CallVerifier(key, window_s=60, clock=lambda: now[0])
    proof = signer.proof(METHOD)
    assert verifier.problem(METHOD, proof) is None
    assert "replayed" in verifier.problem(METHOD, proof)  # the same proof again
    assert "does not verify" in verifier.problem("/pollen.v1.Dht/Store", signer.proof(METHOD))  # other method
    assert "does not verify" in CallVerifier(SwarmKey.generate()).problem(METHOD, signer.proof(METHOD))
    assert "no proof" in verifier.problem(METHOD, None)
    assert "malformed" in verifier.problem(METHOD, "v1.1.2")
    old = signer.proof(METHOD)
    now[0] += 61
    assert "stale" in verifier.problem(METHOD, old)
    assert verifier.problem(METHOD, signer.proof(METHOD)) is None


def test_replay_cache_is_bounded_and_never_forgets_unsafely():
    cache = ReplayCache(max_entries=3)
    window = 10_000
    for i in range(5):
        assert cache.add(f"n{i}", 1000 + i, 1000 + i, window)
    assert len(cache) == 3
    # n0 and n1 were evicted: their proofs (and anything not newer) are refused from now on
    assert not cache.add("n0", 1000, 1005, window) and not cache.add("x", 1001, 1005, window)
    assert cache.add("y", 1002, 1005, window)
    # entries whose proofs can no longer be fresh are dropped as time passes
    assert cache.add("z", 50_000, 50_000, window) and len(cache) == 1


def test_rate_limiter_is_per_key_and_bounded():
    limiter = RateLimiter(rate_per_s=1e-6, burst=3, max_tracked=2)
    assert [limiter.allow("1.2.3.4") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("5.6.7.8") and limiter.dropped == 1
    assert peer_ip("ipv4:10.0.0.1:5000") == "10.0.0.1"
    assert peer_ip("ipv6:[::1]:5000") == "::1"
    assert peer_ip("unix:/tmp/x") == "unix:/tmp/x"


def test_datagram_seal_refuses_other_keys_stale_and_tampered():
    key = SwarmKey.generate()
    now = [1_000_000.0]
    seal, same = DatagramSeal(key, clock=lambda: now[0]), DatagramSeal(key, clock=lambda: now[0])
    sealed = seal.seal(b"\x00hello")
    assert same.open(sealed) == b"\x00hello"
    assert DatagramSeal(SwarmKey.generate()).open(sealed) is None
    assert same.open(b"\x00hello") is None  # unkeyed datagrams are dropped by keyed nodes
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert same.open(tampered) is None
    now[0] += 600
    assert same.open(sealed) is None  # a replay from long ago
    assert DatagramSeal(None).seal(b"x") == b"x" and DatagramSeal(None).open(b"x") == b"x"


def test_address_tokens_prove_one_address():
    guard = AddressGuard()
    token = guard.token_for(("10.0.0.1", 5000))
    assert guard.token_valid(("10.0.0.1", 5000), token)
    assert not guard.token_valid(("10.0.0.1", 5001), token)
    assert not AddressGuard().token_valid(("10.0.0.1", 5000), token)  # another node's secret
    assert not guard.may_send(("10.0.0.1", 5000), 50, 151) and guard.may_send(("10.0.0.1", 5000), 50, 150)
    guard.verify(("10.0.0.1", 5000))
    assert guard.may_send(("10.0.0.1", 5000), 50, 60_000)
