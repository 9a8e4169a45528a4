"""AES-256-GCM key ring and HMAC pseudonyms (actors.runtime.crypto)."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from actors.runtime.crypto import (
    MAGIC,
    CryptoError,
    IntegrityError,
    KeyFileError,
    KeyRing,
    Pseudonymizer,
    UnknownKeyError,
)


def _ring(tmp_path, kid="k1"):
    path = tmp_path / "keys.json"
    key = os.urandom(32)
    path.write_text(json.dumps({"active": kid, "keys": {kid: base64.b64encode(key).decode()}}))
    return KeyRing.from_file(path), path


def test_round_trip_and_format(tmp_path):
    ring, _ = _ring(tmp_path)
    msg = b"Versichertennummer A123456789, Diagnose J06.9" * 10
    blob = ring.encrypt(msg, aad=b"slip:42")
    assert blob.startswith(MAGIC + bytes([2]) + b"k1")
    assert msg not in blob
    assert len(blob) == 4 + 1 + 2 + 12 + len(msg) + 16
    assert ring.decrypt(blob, aad=b"slip:42") == msg
    assert ring.key_id_of(blob) == "k1"
    # random nonce: same plaintext, different blobs
    assert ring.encrypt(msg) != ring.encrypt(msg)
    assert ring.decrypt(ring.encrypt(b"")) == b""


def test_wrong_aad_is_integrity_error(tmp_path):
    ring, _ = _ring(tmp_path)
    blob = ring.encrypt(b"data", aad=b"a")
    with pytest.raises(IntegrityError, match="tag mismatch"):
        ring.decrypt(blob, aad=b"b")


def test_tampering_any_byte_is_detected(tmp_path):
    ring, _ = _ring(tmp_path)
    blob = ring.encrypt(b"hello world, personal data", aad=b"x")
    header_len = 4 + 1 + 2
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(CryptoError) as ei:
            ring.decrypt(bytes(bad), aad=b"x")
        if i < 4:
            assert isinstance(ei.value, IntegrityError) and "bad magic" in str(ei.value)
        elif i >= header_len:  # nonce, ciphertext, tag
            assert isinstance(ei.value, IntegrityError) and "tag mismatch" in str(ei.value)
        else:  # key id length / key id: unknown key or malformed header, never plaintext
            assert isinstance(ei.value, (IntegrityError, UnknownKeyError))


def test_truncated_and_garbage(tmp_path):
    ring, _ = _ring(tmp_path)
    blob = ring.encrypt(b"hello")
    for n in (0, 3, 5, 7, 7 + 12, 7 + 12 + 15):
        with pytest.raises(IntegrityError, match="truncated"):
            ring.decrypt(blob[:n])
    with pytest.raises(IntegrityError, match="tag mismatch"):
        ring.decrypt(blob[:-1])
    with pytest.raises(IntegrityError, match="bad magic"):
        ring.decrypt(b"XXXX" + blob[4:])
    # a key id flipped to another existing key: tag mismatch, not a silent decrypt
    other = KeyRing({"k1": os.urandom(32), "k2": os.urandom(32)}, "k1")
    b = other.encrypt(b"x")
    relabelled = b[:5] + b"k2" + b[7:]
    with pytest.raises(IntegrityError):
        other.decrypt(relabelled)


def test_unknown_key_names_the_kid(tmp_path):
    ring, _ = _ring(tmp_path)
    stranger = KeyRing({"zz9": os.urandom(32)}, "zz9")
    with pytest.raises(UnknownKeyError, match="zz9") as ei:
        ring.decrypt(stranger.encrypt(b"secret"))
    assert ei.value.kid == "zz9"
    assert isinstance(ei.value, CryptoError)


def test_rotation(tmp_path):
    ring, path = _ring(tmp_path)
    old = ring.encrypt(b"old data", aad=b"r")
    kid = ring.rotate(path)
    assert kid == "k2" and ring.active == "k2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    new = ring.encrypt(b"new data", aad=b"r")
    assert ring.key_id_of(new) == "k2"
    assert ring.decrypt(old, aad=b"r") == b"old data"  # old keys stay readable
    assert ring.needs_reencrypt(old) and not ring.needs_reencrypt(new)
    moved = ring.reencrypt(old, aad=b"r")
    assert ring.key_id_of(moved) == "k2" and ring.decrypt(moved, aad=b"r") == b"old data"
    with pytest.raises(IntegrityError):
        ring.reencrypt(old, aad=b"wrong")

    # the file holds both keys; a fresh ring from it reads both blobs
    doc = json.loads(path.read_text())
    assert doc["active"] == "k2" and set(doc["keys"]) == {"k1", "k2"}
    again = KeyRing.from_file(path)
    assert again.decrypt(old, aad=b"r") == b"old data"
    assert again.decrypt(new, aad=b"r") == b"new data"
    assert ring.rotate(path) == "k3"
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp files


def test_rotation_by_another_process_is_picked_up(tmp_path):
    a, path = _ring(tmp_path)
    b = KeyRing.from_file(path)
    b.rotate(path)  # "another process" rotates
    blob = b.encrypt(b"written under k2")
    assert a.decrypt(blob) == b"written under k2"  # a reloads the file for the unknown kid
    assert a.active == "k2"


def test_key_file_errors(tmp_path):
    p = tmp_path / "keys.json"
    with pytest.raises(KeyFileError, match="does not exist"):
        KeyRing.from_file(p)
    p.write_text("{not json")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        KeyRing.from_file(p)
    p.write_text(json.dumps({"active": "k1", "keys": {"k1": base64.b64encode(b"short").decode()}}))
    with pytest.raises(KeyFileError, match="5 bytes"):
        KeyRing.from_file(p)
    p.write_text(json.dumps({"active": "k9", "keys": {"k1": base64.b64encode(os.urandom(32)).decode()}}))
    with pytest.raises(KeyFileError, match="k9"):
        KeyRing.from_file(p)
    created = KeyRing.create_file(tmp_path / "new" / "keys.json")
    assert stat.S_IMODE((tmp_path / "new" / "keys.json").stat().st_mode) == 0o600
    assert KeyRing.from_file(tmp_path / "new" / "keys.json").decrypt(created.encrypt(b"x")) == b"x"
    with pytest.raises(KeyFileError, match="already exists"):
        KeyRing.create_file(tmp_path / "new" / "keys.json")
    doc = json.loads((tmp_path / "new" / "keys.json").read_text())
    assert "k1" in repr(created) and doc["keys"]["k1"] not in repr(created)  # no key material


def test_pseudonyms_stable_and_domain_separated(tmp_path):
    path = tmp_path / "pseudonym.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    p = Pseudonymizer.from_file(path)
    a = p.pseudonym("A123456789", "kvnr")
    assert a == Pseudonymizer.from_file(path).pseudonym("A123456789", "kvnr")
    assert len(a) == 32 and all(c in "0123456789abcdef" for c in a)
    assert a != p.pseudonym("A123456789", "case")  # domain separation
    assert a != p.pseudonym("A123456780", "kvnr")
    # domain NUL value: no ambiguity between ("ab", "c") and ("a", "bc")
    assert p.pseudonym("c", "ab") != p.pseudonym("bc", "a")
    assert Pseudonymizer(os.urandom(32)).pseudonym("A123456789", "kvnr") != a  # keyed
    with pytest.raises(ValueError):
        p.pseudonym("x", "bad\x00domain")
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")
    q = Pseudonymizer.create_file(tmp_path / "p2.key")
    assert Pseudonymizer.from_file(tmp_path / "p2.key").pseudonym("v", "d") == q.pseudonym("v", "d")
    assert stat.S_IMODE((tmp_path / "p2.key").stat().st_mode) == 0o600
