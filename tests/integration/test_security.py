"""Security against the real services: key rotation end to end (entity states in Redis and
blobs), tampered state detected and quarantined, IMAP only over verified TLS.

Every test works on its own entity kind / keys file / blob dir, so the shared stack's data
and keys are never touched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import threading
import uuid

import pytest
import ray

from actors.runtime.crypto import RELOAD_CHECK_S, KeyRing
from actors.runtime.kinds import EntityKind
from actors.runtime.keys import kid_of, reencrypt_states
from actors.runtime.router import Router, register_kinds
from actors.runtime.store import quarantine_key, state_key
from actors.runtime.system import start_hosts
from tests.integration.demo_entities import Add

pytestmark = pytest.mark.integration

SECRET = "tests.integration.demo_entities:Secret"


def _kind() -> EntityKind:
    return EntityKind(name=f"s{uuid.uuid4().hex[:10]}.secret", entity=SECRET, hosts=1)


async def _states(redis, kind: EntityKind) -> dict[str, str]:
    out = {}
    async for k in redis.scan_iter(match=state_key(kind.name, "*"), count=1000):
        out[k.decode().rsplit(":", 1)[1]] = kid_of(await redis.hget(k, "s"))
    return out


async def test_key_rotation_new_key_writes_old_keys_read_reencrypt_then_retire(cfg, stack, ray_session,
                                                                               redis_client, tmp_path):
    keys = tmp_path / "keys.json"
    KeyRing.create_file(keys)
    kcfg = cfg.model_copy(deep=True)
    kcfg.crypto.keys_file = keys
    kind = _kind()
    await register_kinds(redis_client, [kind])
    hosts = await asyncio.to_thread(start_hosts, kcfg, kind)
    router = Router(kcfg)
    try:
        for i in range(20):
            await router.ask(kind.name, f"p{i}", Add(n=i))
        assert set((await _states(redis_client, kind)).values()) == {"k1"}
        # rotate while the host runs: it writes with k2 within RELOAD_CHECK_S, reads k1 still
        new = KeyRing.from_file(keys).rotate(keys)
        assert new == "k2"
        await asyncio.sleep(RELOAD_CHECK_S + 0.5)
        for i in range(10):
            assert (await router.ask(kind.name, f"p{i}", Add(n=100))).total == i + 100
        st = await _states(redis_client, kind)
        assert [st[f"p{i}"] for i in range(10)] == ["k2"] * 10  # new writes: new key
        assert [st[f"p{i}"] for i in range(10, 20)] == ["k1"] * 10  # untouched: old key, still readable
        # re-encryption job: everything under k2, versions unchanged, host undisturbed
        versions = {k: await redis_client.hget(state_key(kind.name, k), "v") for k in st}
        res = await reencrypt_states(redis_client, KeyRing.from_file(keys), match=state_key(kind.name, "*"))
        assert res["rewritten"] == 10 and not res.get("failed"), res
        assert set((await _states(redis_client, kind)).values()) == {"k2"}
        assert versions == {k: await redis_client.hget(state_key(kind.name, k), "v") for k in st}
        assert (await router.ask(kind.name, "p15", Add(n=1))).total == 16  # cached entity still writes fine
        # retire k1: the keys file alone (k2) reads every state
        doc = json.loads(keys.read_text())
        doc["keys"].pop("k1")
        keys.write_text(json.dumps(doc))
        only_k2 = KeyRing.from_file(keys)
        assert only_k2.key_ids == ["k2"]
        from tests.integration.demo_entities import CounterState

        totals = []
        for i in range(20):
            raw = await redis_client.hget(state_key(kind.name, f"p{i}"), "s")
            totals.append(CounterState.model_validate_json(only_k2.decrypt(raw, f"{kind.name}:p{i}".encode())).total)
        assert totals == [i + 100 for i in range(10)] + [16 if i == 15 else i for i in range(10, 20)]
        await hosts[0].passivate_idle.remote(0.0)  # and the host reads them back from Redis
        assert (await router.ask(kind.name, "p3", Add(n=0))).total == 103
    finally:
        await router.close()
        for h in hosts:
            ray.kill(h)


async def test_blob_rotation_and_reencrypt_job(tmp_path):
    from actors.runtime.blobs import BlobStore
    from actors.runtime.keys import reencrypt_blobs

    keys = tmp_path / "keys.json"
    ring = KeyRing.create_file(keys)
    store = BlobStore(tmp_path / "blobs", ring)
    old = [store.put(f"old {i}".encode(), kind="kim-mail") for i in range(5)]
    ring.rotate(keys)
    new = [store.put(f"new {i}".encode(), kind="kim-mail") for i in range(5)]
    assert {ring.key_id_of(store._path(r).read_bytes()) for r in old} == {"k1"}
    assert {ring.key_id_of(store._path(r).read_bytes()) for r in new} == {"k2"}
    assert [store.get(r) for r in old] == [f"old {i}".encode() for i in range(5)]  # old key still reads
    assert reencrypt_blobs(store) == {"checked": 10, "rewritten": 5, "failed": 0}
    doc = json.loads(keys.read_text())
    doc["keys"].pop("k1")
    keys.write_text(json.dumps(doc))
    fresh = BlobStore(tmp_path / "blobs", KeyRing.from_file(keys))
    assert [fresh.get(r) for r in old + new] == [f"old {i}".encode() for i in range(5)] + [
        f"new {i}".encode() for i in range(5)]


async def test_tampered_entity_state_is_detected_quarantined_never_used(cfg, stack, ray_session, redis_client):
    kind = _kind()
    await register_kinds(redis_client, [kind])
    hosts = await asyncio.to_thread(start_hosts, cfg, kind)
    router = Router(cfg)
    try:
        await router.ask(kind.name, "t", Add(n=4711))
        raw = bytearray(await redis_client.hget(state_key(kind.name, "t"), "s"))
        raw[-1] ^= 0x01  # the GCM tag
        await hosts[0].passivate_idle.remote(0.0)  # the next message must read it from Redis
        await redis_client.hset(state_key(kind.name, "t"), "s", bytes(raw))
        assert (await router.ask(kind.name, "t", Add(n=0))).total == 0  # never the tampered value
        q = await redis_client.hgetall(quarantine_key(kind.name, "t"))
        assert q[b"state"] == bytes(raw) and b"IntegrityError" in q[b"reason"]  # kept and reported
    finally:
        await router.close()
        for h in hosts:
            ray.kill(h)


# ----------------------------------------------------------------------------- IMAP over TLS
def _self_signed(tmp_path, cn: str, sans: list[str]):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    alt = [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = tmp_path / f"{cn}.pem"
    key_pem = tmp_path / f"{cn}.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def _fetcher(cfg, ca_file, port=None):
    from actors.kim.mailbox import MailboxFetcher
    from actors.runtime.config import KimMailbox

    c = cfg.model_copy(deep=True)
    c.imap.ca_file = ca_file
    if port is not None:
        c.imap.ssl_port = port
    c.kim.mailboxes = [KimMailbox(user="kasse20")]
    c.kim.fetchers = 1
    return MailboxFetcher(c, 0), c.kim.mailboxes[0]


def test_imap_tls_with_the_right_ca_logs_in(cfg, stack):
    f, box = _fetcher(cfg, cfg.imap.ca_file)
    client = f._connect(box)  # exactly the mailbox actor's connect: IMAPS, verified
    try:
        assert client.folder_exists("INBOX")
    finally:
        client.logout()


def test_imap_server_with_a_certificate_from_another_ca_is_refused(cfg, stack, tmp_path):
    other_ca, _ = _self_signed(tmp_path, "localhost", ["localhost", "127.0.0.1"])
    f, box = _fetcher(cfg, other_ca)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        f._connect(box)


def test_imap_server_with_a_trusted_certificate_for_another_host_is_refused(cfg, tmp_path):
    """A man in the middle with a certificate our CA file trusts, but issued to another
    name: the hostname check refuses it (no password is ever sent)."""
    cert, key = _self_signed(tmp_path, "imap.elsewhere.example", ["imap.elsewhere.example"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def serve():
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"* OK IMAP4rev1 ready\r\n")
                got.append(s.recv(1024))
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    f, box = _fetcher(cfg, cert, port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            f._connect(box)
    finally:
        srv.close()
        t.join(5)
    assert not any(b"LOGIN" in g for g in got)
