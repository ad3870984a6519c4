"""Ed25519 identities and signed sub-keys."""

import stat

import pytest

from swarm.identity import Identity, peer_id_of, verify


def test_identity_is_persistent_and_private(tmp_path):
    path = tmp_path / "keys" / "server.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.peer_id == first.peer_id == peer_id_of(first.public_key)
    assert Identity.generate().peer_id != first.peer_id


def test_bad_identity_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="32-byte"):
        Identity.load_or_create(path)


def test_signature_covers_every_field_and_ownership():
    alice, mallory = Identity.generate(), Identity.generate()
    args = ("m.block.3", alice.peer_id, b'{"x": 1}', 1e9)
    sig = alice.sign(*args)
    assert verify(*args, alice.public_key, sig) is None
    key, subkey, value, exp = args
    assert "signature does not match" in verify(key, subkey, b'{"x": 2}', exp, alice.public_key, sig)
    assert "signature does not match" in verify(key, subkey, value, exp + 1, alice.public_key, sig)
    assert "signature does not match" in verify("m.block.4", subkey, value, exp, alice.public_key, sig)
    # Mallory cannot write Alice's sub-key, even with a valid signature of her own.
    forged = mallory.sign(*args)
    assert "not owned" in verify(*args, mallory.public_key, forged)
    assert "32 bytes" in verify(*args, b"x", sig)
    assert "64 bytes" in verify(*args, alice.public_key, b"x")
