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
    good, other, liar, thief, junk, wrong = (Identity.generate() for _ in range(6))
    plain = ServerRecord(peer_id="p", address="h:1", model_id="m", start=3, end=4).encode()
    garbage = b"{not json"
    entries = {
        good.peer_id: signed_entry(good),
        other.peer_id: signed_entry(other, expires=NOW - 1),  # expired
        liar.peer_id: signed_entry(liar, model_id="n"),  # under m's key, names model n
        thief.peer_id: signed_entry(thief, peer_id=good.peer_id),  # signed by thief, claims to be good
        "stolen" + good.peer_id[6:]: signed_entry(good),  # good's signature on someone else's sub-key
        "f" * 40: SubkeyEntry(plain, NOW + 60),  # unsigned, poses as a peer id
        "plain": SubkeyEntry(plain, NOW + 60),  # unsigned under an honest name: whoever answered could write it
        junk.peer_id: SubkeyEntry(garbage, NOW + 60, junk.public_key, junk.sign(KEY, junk.peer_id, garbage, NOW + 60)),
        wrong.peer_id: signed_entry(wrong, start=0, end=3),  # announces blocks 0..2 under block 3
    }
    skipped: Counter[str] = Counter()
    out = decode_server_records(KEY, entries, NOW, skipped=skipped)
    assert set(out) == {good.peer_id} and out[good.peer_id].peer_id == good.peer_id
    assert skipped == Counter(
        {"bad signature": 1, "unsigned": 2, "expired": 1, "other model_id": 1, "not its signer": 1, "garbage": 1,
         "wrong block": 1}
    )  # fmt: skip
    # a record copied under another block key fails its signature (the key is signed)
    assert decode_server_records("m.block.4", {good.peer_id: signed_entry(good)}, NOW) == {}
    assert decode_server_records("not-a-block-key", entries, NOW) == {}
    # readers of other keys: signed sub-keys only, unless plain names are explicitly allowed (test swarms)
    assert "plain" not in verified(KEY, entries) and "f" * 40 not in verified(KEY, entries)
    assert set(verified(KEY, entries, require_signed=False)) == set(entries) - {"stolen" + good.peer_id[6:], "f" * 40}
