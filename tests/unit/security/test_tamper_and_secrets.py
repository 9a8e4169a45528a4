"""Security, in-process: tampered blobs are detected and reported (never returned), and
secrets come only from the environment or files and are never echoed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actors.runtime.blobs import BlobStore
from actors.runtime.crypto import IntegrityError, KeyRing, Pseudonymizer, UnknownKeyError

PLAIN = b"Versicherter Sonnenreiter, KVNR T636263881 - an eAU"


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs", KeyRing.generate())


def _tamper(path: Path, index: int, xor: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= xor
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["gcm_tag", "ciphertext", "nonce", "key_id"])
def test_a_tampered_blob_is_detected_and_never_returned(store, where):
    ref = store.put(PLAIN, kind="kim-mail")
    path = store._path(ref)
    raw = path.read_bytes()
    assert PLAIN not in raw  # encrypted at rest
    kid_len = raw[4]
    index = {"gcm_tag": len(raw) - 1, "ciphertext": len(raw) - 20, "nonce": 5 + kid_len,
             "key_id": 5}[where]
    _tamper(path, index)
    with pytest.raises((IntegrityError, UnknownKeyError)) as ei:
        store.get(ref)
    assert PLAIN.decode("latin-1") not in str(ei.value)  # the report names the blob, not its content
    assert ref in str(ei.value) or where == "key_id"


def test_a_blob_moved_to_another_ref_does_not_verify(store):
    a = store.put(PLAIN, kind="kim-mail")
    b = store.put(b"other", kind="kim-mail")
    store._path(b).write_bytes(store._path(a).read_bytes())  # swap in a valid blob of another ref
    with pytest.raises(IntegrityError):
        store.get(b)


def test_reencrypt_job_reports_tampered_blobs_and_leaves_them(tmp_path):
    ring = KeyRing.create_file(tmp_path / "keys.json")
    store = BlobStore(tmp_path / "blobs", ring)
    good, bad = store.put(b"good", kind="x"), store.put(b"bad", kind="x")
    _tamper(store._path(bad), -1)
    ring.rotate(tmp_path / "keys.json")
    with pytest.raises(IntegrityError) as ei:
        store.reencrypt_all()
    assert ei.value.failed == [bad] and ei.value.rewritten == 1
    assert store.get(good) == b"good" and ring.key_id_of(store._path(good).read_bytes()) == "k2"


async def test_kim_step_reports_a_tampered_claim_check_and_the_slip_parks(tmp_path):
    """The worker never hands tampered bytes on: ``blob_integrity`` (retryable - the next
    attempt may read a repaired file), and after the road map's attempts the slip parks
    with that code for an operator."""
    from actors.kim.ports import make_memory_ports
    from actors.kim.steps import run_step
    from actors.kim.steps import roadmap_for
    from protocols.kim.messages import StepOrder, StepResult

    ports = make_memory_ports(tmp_path)
    ref = ports.blobs.put(PLAIN, kind="kim-mail")
    _tamper(ports.blobs._path(ref), -1)
    rm = roadmap_for("eau")
    order = StepOrder(mail_id="m1", step="load_raw", roadmap="eau", roadmap_version=rm.version, mailbox="x",
                      blobs={"raw": ref})
    res = await run_step(order, ports)
    assert res.error is not None and res.error.code == "blob_integrity" and res.error.retryable
    assert not res.blobs and "raw_bytes" not in res.facts
    attempt, decision = 1, None
    for _ in range(50):
        decision = rm.decide(StepResult(mail_id="m1", step="load_raw", attempt=attempt, outcome="error",
                                        error=res.error))
        if decision.action != "retry":
            break
        attempt = decision.attempt
    assert decision.action == "terminal" and decision.terminal == "@parked", decision


# ----------------------------------------------------------------------------- secrets
def test_key_material_never_in_reprs(tmp_path):
    ring = KeyRing.create_file(tmp_path / "keys.json")
    doc = json.loads((tmp_path / "keys.json").read_text())
    b64 = doc["keys"]["k1"]
    assert b64 not in repr(ring) and b64 not in str(ring)
    key = os.urandom(32)
    p = Pseudonymizer(key)
    import base64

    for form in (key.hex(), base64.b64encode(key).decode(), repr(key)):
        assert form not in repr(p) and form not in str(p)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("AUTOMAT_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_config_show_never_echoes_secrets(clean_env, tmp_path):
    """Secrets given in the environment or in files never appear in ``automat config show``."""
    from deploy.cli import app

    keys = tmp_path / "keys.json"
    KeyRing.create_file(keys)
    key_b64 = json.loads(keys.read_text())["keys"]["k1"]
    pw_file = tmp_path / "redis-password"
    pw_file.write_text("file-secret-42\n")
    clean_env.setenv("AUTOMAT_REDIS__URL", "redis://automat:url-secret-17@redis.internal:6380/0")
    clean_env.setenv("AUTOMAT_REDIS__PASSWORD_FILE", str(pw_file))
    clean_env.setenv("AUTOMAT_CRYPTO__KEYS_FILE", str(keys))
    clean_env.setenv("AUTOMAT_KIM__MAILBOXES", json.dumps([{"user": "kasse99", "password": "inline-secret-9"}]))
    out = CliRunner().invoke(app, ["config", "show"])
    assert out.exit_code == 0, out.output
    for secret in ("url-secret-17", "file-secret-42", "inline-secret-9", key_b64):
        assert secret not in out.output
    assert str(keys) in out.output and "redis.internal:6380" in out.output  # paths and hosts stay visible


def test_secret_settings_come_from_files_not_inline_values():
    """Every production secret of the configuration is a ``*_file`` setting; the only
    inline password is the local test stack's IMAP mailbox password (documented)."""
    from actors.runtime.config import AutomatConfig

    inline = []

    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = getattr(ann, "model_fields", None)
            if sub is not None:
                walk(ann, f"{prefix}{name}.")
            elif any(w in name for w in ("password", "secret", "token")) and not name.endswith("_file"):
                inline.append(prefix + name)

    walk(AutomatConfig)
    from actors.runtime.config import KimMailbox

    walk(KimMailbox, "kim.mailboxes[].")
    assert inline == ["kim.mailboxes[].password"], inline
