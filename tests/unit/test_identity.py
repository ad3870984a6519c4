"""Ed25519 identities, signed sub-keys, and the one reader of server records (swarm.records)."""

import stat
from collections import Counter

import pytest

from swarm.identity import Identity, peer_id_of, verify
from swarm.records import ServerRecord, SubkeyEntry, decode_server_records, verified


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


NOW = 1_000_000.0
KEY = "m.block.3"


def signed_entry(identity: Identity, key: str = KEY, expires: float = NOW + 60, **fields: object) -> SubkeyEntry:
    base: dict[str, object] = dict(peer_id=identity.peer_id, address="127.0.0.1:7000", model_id="m", start=2, end=5)
    value = ServerRecord(**{**base, **fields}).encode()  # type: ignore[arg-type]
    return SubkeyEntry(value, expires, identity.public_key, identity.sign(key, identity.peer_id, value, expires))


def test_decode_server_records_keeps_only_trustworthy_live_records():
    good, other, liar, thief = (Identity.generate() for _ in range(4))
    plain = ServerRecord(peer_id="p", address="h:1", model_id="m", start=3, end=4).encode()
    entries = {
        good.peer_id: signed_entry(good),
        other.peer_id: signed_entry(other, expires=NOW - 1),  # expired
        liar.peer_id: signed_entry(liar, model_id="n"),  # under m's key, names model n
        thief.peer_id: signed_entry(thief, peer_id=good.peer_id),  # signed by thief, claims to be good
        "stolen" + good.peer_id[6:]: signed_entry(good),  # good's signature on someone else's sub-key
        "f" * 40: SubkeyEntry(plain, NOW + 60),  # unsigned, but poses as a peer id
        "plain": SubkeyEntry(plain, NOW + 60),  # unsigned, honest name: fine on a private swarm
        "junk": SubkeyEntry(b"{not json", NOW + 60),
        "wrong": SubkeyEntry(ServerRecord(peer_id="w", address="h:1", model_id="m", start=0, end=3).encode(), NOW + 60),
    }
    skipped: Counter[str] = Counter()
    out = decode_server_records(KEY, entries, NOW, skipped=skipped)
    assert set(out) == {good.peer_id, "p"} and out[good.peer_id].peer_id == good.peer_id
    assert skipped == Counter(
        {"bad signature": 2, "expired": 1, "other model_id": 1, "not its signer": 1, "garbage": 1, "wrong block": 1}
    )
    assert set(decode_server_records(KEY, entries, NOW, require_signed=True)) == {good.peer_id}
    # a record copied under another block key fails its signature (the key is signed)
    assert decode_server_records("m.block.4", {good.peer_id: signed_entry(good)}, NOW) == {}
    assert decode_server_records("not-a-block-key", entries, NOW) == {}
    assert set(verified(KEY, entries)) == set(entries) - {"stolen" + good.peer_id[6:], "f" * 40}
