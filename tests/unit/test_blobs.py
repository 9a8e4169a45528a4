"""Encrypted claim-check store (actors.runtime.blobs)."""

from __future__ import annotations

import os
import stat

import pytest

from actors.runtime.blobs import BlobNotFound, BlobStore
from actors.runtime.crypto import IntegrityError, KeyRing, UnknownKeyError


@pytest.fixture
def ring(tmp_path):
    return KeyRing.create_file(tmp_path / "secrets" / "keys.json")


@pytest.fixture
def store(tmp_path, ring):
    return BlobStore(tmp_path / "blobs", ring)


MAIL = b"From: praxis@kim\r\nSubject: eAU Max Mustermann\r\n\r\n" + os.urandom(2000)


def test_put_get_exists_delete(store):
    ref = store.put(MAIL, kind="mail")
    kind, ab, rest = ref.split("/")
    assert kind == "mail" and len(ab) == 2 and len(rest) == 30
    assert store.exists(ref)
    assert store.get(ref) == MAIL
    path = store.root / ref
    assert MAIL[:40] not in path.read_bytes()  # encrypted at rest
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".tmp-*"))
    assert store.delete(ref) is True
    assert not store.exists(ref)
    assert store.delete(ref) is False
    with pytest.raises(BlobNotFound):
        store.get(ref)


def test_names_reveal_nothing_about_content(store):
    a = store.put(b"same", kind="mail")
    b = store.put(b"same", kind="mail")
    c = store.put(b"same", kind="attachment")
    assert len({a.split("/", 1)[1], b.split("/", 1)[1], c.split("/", 1)[1]}) == 3
    assert store.get(a) == store.get(b) == store.get(c) == b"same"


@pytest.mark.parametrize("where", ["header", "nonce", "middle", "tag"])
def test_tampered_file_is_never_returned(store, where):
    ref = store.put(MAIL, kind="mail")
    path = store.root / ref
    raw = bytearray(path.read_bytes())
    i = {"header": 6, "nonce": 10, "middle": len(raw) // 2, "tag": len(raw) - 1}[where]
    raw[i] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises((IntegrityError, UnknownKeyError)):
        store.get(ref)


def test_truncated_and_swapped_files(store):
    r1 = store.put(b"first blob", kind="mail")
    r2 = store.put(b"second blob", kind="mail")
    p1, p2 = store.root / r1, store.root / r2
    p1.write_bytes(p1.read_bytes()[:20])
    with pytest.raises(IntegrityError, match=r1):
        store.get(r1)
    # a valid file copied under another ref does not verify (the ref is bound as aad)
    p1.write_bytes(p2.read_bytes())
    with pytest.raises(IntegrityError, match="tag mismatch"):
        store.get(r1)


@pytest.mark.parametrize(
    "ref",
    [
        "../x/ab/" + "0" * 30,
        "mail/../../" + "0" * 30,
        "mail/ab/../../../../etc/passwd",
        "/etc/passwd",
        "mail/ab/" + "0" * 29,
        "mail/AB/" + "0" * 30,
        "mail/ab/" + "0" * 30 + "/x",
        "",
        "mail//" + "0" * 32,
    ],
)
def test_refs_are_validated(store, ref):
    for op in (store.get, store.exists, store.delete):
        with pytest.raises(ValueError):
            op(ref)


@pytest.mark.parametrize("kind", ["", "../x", "Mail", "a/b", ".", "x" * 65])
def test_kinds_are_validated(store, kind):
    with pytest.raises(ValueError):
        store.put(b"x", kind=kind)


def test_reencrypt_all_after_rotation(tmp_path, ring, store):
    refs = {store.put(f"blob {i}".encode(), kind="mail" if i % 2 else "att"): i for i in range(20)}
    ring.rotate(tmp_path / "secrets" / "keys.json")
    new_ref = store.put(b"under k2", kind="mail")
    # old blobs still read before the job runs
    assert all(store.get(r) == f"blob {i}".encode() for r, i in refs.items())
    some_dir = (store.root / next(iter(refs))).parent
    (some_dir / ".tmp-leftover").write_bytes(b"a crashed write")  # ignored
    (store.root / "mail" / "stray-file").write_bytes(b"ignored")
    checked, rewritten = store.reencrypt_all()
    assert (checked, rewritten) == (21, 20)
    for r, i in refs.items():
        assert ring.key_id_of((store.root / r).read_bytes()) == "k2"
        assert store.get(r) == f"blob {i}".encode()
    assert store.get(new_ref) == b"under k2"
    assert store.reencrypt_all() == (21, 0)
    # a fresh process with only the rotated key file reads everything
    fresh = BlobStore(store.root, KeyRing.from_file(tmp_path / "secrets" / "keys.json"))
    assert sorted(fresh.refs()) == sorted([*refs, new_ref])


def test_reencrypt_all_reports_corrupt_blobs_and_continues(tmp_path, ring, store):
    good = [store.put(b"good %d" % i, kind="mail") for i in range(5)]
    bad = store.put(b"bad", kind="mail")
    p = store.root / bad
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 1
    p.write_bytes(bytes(raw))
    ring.rotate(tmp_path / "secrets" / "keys.json")
    with pytest.raises(IntegrityError, match=bad) as ei:
        store.reencrypt_all()
    assert ei.value.failed == [bad] and ei.value.rewritten == 5
    assert all(ring.key_id_of((store.root / r).read_bytes()) == "k2" for r in good)
    assert p.read_bytes() == bytes(raw)  # left untouched for inspection


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_group_commit_one_barrier_for_many_puts(tmp_path, ring, use_syncfs):
    import threading

    store = BlobStore(tmp_path / "gc", ring, use_syncfs=use_syncfs)
    refs = [store.put(f"b{i}".encode(), kind="mail", sync=False) for i in range(50)]
    assert all(store.get(r) == f"b{i}".encode() for i, r in enumerate(refs))  # readable before the barrier
    assert not store.is_durable(store.last_write)
    store.sync()
    assert store.is_durable(store.last_write) and store.stats["syncs"] == 1
    store.sync()  # nothing new written: no second barrier
    assert store.stats["syncs"] == 1
    # a plain put is durable when it returns; concurrent callers share barriers
    threads = [threading.Thread(target=lambda: [store.put(b"x", kind="mail") for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.is_durable(store.last_write)
    assert 2 <= store.stats["syncs"] <= 41
    assert not list((tmp_path / "gc").rglob(".tmp-*"))


def test_a_put_after_the_store_directories_were_removed_still_works(store):
    """Fan-out directories are remembered per process; one removed behind the store's back
    (an operator's cleanup) is made again instead of failing every later put there."""
    import shutil

    first = [store.put(b"x" * 10, kind="mail") for _ in range(300)]  # every fan-out dir of the kind
    shutil.rmtree(store.root / "mail")
    refs = [store.put(b"y" * 10, kind="mail") for _ in range(300)]
    assert all(store.get(r) == b"y" * 10 for r in refs)
    assert not any(store.exists(r) for r in first)
