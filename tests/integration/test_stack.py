"""The local stack against the real services: Redis, Tansu, Dovecot, aiosmtpd.

Service behaviour is checked on the shared session stack (fixture ``stack``); start/stop
behaviour (port taken, died at start, down leaves nothing) on a private stack with its
own run dir and free ports, so other tests and sessions are not disturbed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import smtplib
import socket
import ssl
import tempfile
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from imapclient import IMAPClient

from actors.runtime.config import load_config
from deploy import stack as stack_mod
from deploy.stack import LocalStack, StackError, imap_password


def _mail(subject: str, body: str = "Hallo Kasse\n", to: str = "kasse07@kasse.kim.telematik") -> bytes:
    m = EmailMessage()
    m["From"] = "praxis@arzt.kim.telematik"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{uuid.uuid4().hex}@test.automat>"
    m.set_content(body)
    return bytes(m)


# --------------------------------------------------------------------------- shared stack


def test_up_is_idempotent(stack):
    before = stack.status()
    again = stack.up()
    assert all(s.running and s.answering for s in again.values())
    assert not any(s.started for s in again.values())
    assert {n: s.pid for n, s in again.items()} == {n: s.pid for n, s in before.items()}


async def test_redis_answers_with_aof_on(redis_client, key_prefix):
    assert await redis_client.ping()
    async def conf(name: str) -> str:
        value = (await redis_client.config_get(name))[name]
        return value.decode() if isinstance(value, bytes) else value

    assert await conf("appendonly") == "yes"
    assert await conf("appendfsync") == "everysec"
    assert await conf("save") == ""
    await redis_client.set(key_prefix + "k", b"v", ex=60)
    assert await redis_client.get(key_prefix + "k") == b"v"


async def test_kafka_produce_consume_roundtrip(stack, cfg, key_prefix):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = cfg.kafka.topic_prefix + "test-" + uuid.uuid4().hex[:10]
    producer = AIOKafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"msg-{i}".encode(), key=b"k1",
                                         headers=[("event_id", f"e{i}".encode())])
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=key_prefix + "g",
        auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500,
    )
    await consumer.start()
    got = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                got.extend(records)
    finally:
        await consumer.stop()
    assert [r.value for r in got] == [b"msg-0", b"msg-1", b"msg-2"]  # one key -> one partition
    assert got[0].key == b"k1" and dict(got[0].headers)["event_id"] == b"e0"


def test_imap_tls_login_verifies_the_stack_certificate(stack, cfg):
    ctx = ssl.create_default_context(cafile=str(cfg.imap.ca_file))
    with IMAPClient(cfg.imap.host, port=cfg.imap.ssl_port, ssl=True, ssl_context=ctx, timeout=10) as c:
        c.login("demo", imap_password("demo"))
        assert c.select_folder("INBOX")[b"EXISTS"] >= 0
    # STARTTLS on the plain port, verified the same way
    with IMAPClient(cfg.imap.host, port=cfg.imap.port, ssl=False, timeout=10) as c:
        c.starttls(ssl.create_default_context(cafile=str(cfg.imap.ca_file)))
        c.login("kasse01", imap_password("kasse01"))


def test_imap_tls_with_another_ca_fails(stack, cfg, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    other = tmp_path / "other-ca.pem"
    other.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(cafile=str(other))
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(cfg.imap.host, port=cfg.imap.ssl_port, ssl=True, ssl_context=ctx, timeout=10)


def test_imap_append_and_maildir_delivery_are_searchable(stack, cfg):
    token = uuid.uuid4().hex[:12]
    user = "kasse07"
    ctx = ssl.create_default_context(cafile=str(cfg.imap.ca_file))
    with IMAPClient(cfg.imap.host, port=cfg.imap.ssl_port, ssl=True, ssl_context=ctx, timeout=10) as c:
        c.login(user, imap_password(user))
        c.append("INBOX", _mail(f"appended {token}"))
        path = stack.deliver_maildir(user, _mail(f"delivered {token}", body=f"body {token}\n"))
        assert path.parent.name == "new" and path.stat().st_uid == stack_mod._nobody()[0]
        c.select_folder("INBOX")
        uids = c.search(["SUBJECT", token])
        assert len(uids) == 2
        fetched = c.fetch(uids, ["BODY[HEADER.FIELDS (SUBJECT)]", "BODY[TEXT]"])
        subjects = sorted(v[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode().strip() for v in fetched.values())
        assert subjects == [f"Subject: appended {token}", f"Subject: delivered {token}"]
        assert any(f"body {token}".encode() in v[b"BODY[TEXT]"] for v in fetched.values())


def test_smtp_send_lands_in_the_sink(stack, cfg):
    token = uuid.uuid4().hex[:12]
    m = EmailMessage()
    m["From"] = cfg.smtp.sender
    m["To"] = "praxis@arzt.kim.telematik"
    m["Subject"] = f"answer {token}"
    m.set_content("Ihre Nachricht ist eingegangen.\n")
    with smtplib.SMTP(cfg.smtp.host, cfg.smtp.port, timeout=10) as s:
        s.send_message(m)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(x["Subject"] == f"answer {token}" for x in stack.sink_messages()):
            return
        time.sleep(0.05)
    pytest.fail(f"mail 'answer {token}' not in the SMTP sink {stack.smtp_mailbox}")


def test_secrets_exist_with_mode_0600(stack, cfg):
    import json

    for p in (cfg.crypto.keys_file, cfg.crypto.pseudonym_key_file):
        assert p.exists() and (p.stat().st_mode & 0o777) == 0o600
    doc = json.loads(cfg.crypto.keys_file.read_text())
    assert doc["active"] in doc["keys"]
    before = cfg.crypto.keys_file.read_bytes()
    stack.ensure_secrets()
    assert cfg.crypto.keys_file.read_bytes() == before  # never overwritten


# --------------------------------------------------------------------------- private stack


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def private_stack():
    run_dir = Path(tempfile.mkdtemp(prefix="stk-"))
    redis_p, kafka_p, imap_p, imaps_p, smtp_p = _free_ports(5)
    cfg = load_config(run_dir=run_dir)
    cfg.redis.url = f"redis://127.0.0.1:{redis_p}/0"
    cfg.kafka.bootstrap_servers = f"127.0.0.1:{kafka_p}"
    cfg.imap.port, cfg.imap.ssl_port, cfg.smtp.port = imap_p, imaps_p, smtp_p
    st = LocalStack(cfg)
    try:
        yield st
    finally:
        with contextlib.suppress(Exception):
            st.down()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_port_taken_by_a_foreign_socket_is_named(private_stack):
    port = private_stack.cfg.smtp.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(StackError) as ei:
            private_stack.up()
    msg = str(ei.value)
    assert f"port {port}" in msg and "smtp" in msg and "in use" in msg
    assert not any(s.running for s in private_stack.status().values())  # nothing half-started


def test_missing_binary_names_the_package(private_stack, monkeypatch):
    monkeypatch.setattr(stack_mod, "_which", lambda name: None)
    with pytest.raises(StackError) as ei:
        private_stack.up()
    assert "redis-server" in str(ei.value) and "dovecot-imapd" in str(ei.value)


def test_service_dying_at_start_shows_its_log(private_stack):
    aof = private_stack.redis_dir / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    with pytest.raises(StackError) as ei:
        private_stack.up(["redis"])
    msg = str(ei.value)
    assert "redis" in msg and "Invalid AOF manifest" in msg


def test_down_leaves_no_process_and_is_idempotent(private_stack):
    private_stack.up()
    procs = private_stack.processes()
    pids = [p for ps in procs.values() for p in ps]
    assert all(procs.values()) and len(procs["imap"]) > 1  # dovecot master + children
    assert sorted(private_stack.down()) == sorted(stack_mod.SERVICES)
    assert not [p for p in pids if stack_mod._alive(p)]
    assert not any(s.running for s in private_stack.status().values())
    assert private_stack.down() == []
    for port in (private_stack.cfg.smtp.port, private_stack.cfg.imap.ssl_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_refuses_when_local_stack_is_false(private_stack):
    private_stack.cfg.local_stack = False
    with pytest.raises(StackError, match="local_stack is false"):
        private_stack.up()
    assert not private_stack.run_dir.joinpath("redis").exists()


# --------------------------------------------------------------------------- Ray


def test_ray_session_workers_import_this_checkout(ray_session, cfg):
    import actors.runtime.config as config_mod

    @ray_session.remote
    class Probe:
        def where(self) -> tuple[str, str]:
            import os

            import actors.runtime.config as m

            return m.__file__, os.environ.get("AUTOMAT_RUN_DIR", "")

    probe = Probe.remote()
    where, run_dir = ray_session.get(probe.where.remote(), timeout=60)
    assert Path(where) == Path(config_mod.__file__)
    assert Path(run_dir) == cfg.run_dir
    assert ray_session.get_runtime_context().namespace == cfg.runtime.namespace
    ray_session.kill(probe)


def test_restart_waits_for_a_killed_service_to_free_its_port(cfg):
    """Regression (chaos run at load ~60): a SIGKILLed Redis still held its port when the
    new one started; it could not bind, and the chaos stack stayed without Redis. A restart
    now waits until the ports are free (here: something holds the port for 1.5 s)."""
    import threading

    import redis as redis_sync

    from deploy.chaos.stack import chaos_config
    from deploy.stack import LocalStack

    run_dir = cfg.run_dir / f"restart-test-{time.monotonic_ns()}"  # Dovecot must reach it
    c = chaos_config(cfg, run_dir=run_dir, port_base=28000)
    st = LocalStack(c)
    st.up()
    try:
        kill = st._kill_locked

        def kill_then_hold_the_port(svc):
            out = kill(svc)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for _ in range(200):
                try:
                    s.bind(("127.0.0.1", svc.ports[0]))
                    break
                except OSError:
                    time.sleep(0.02)
            s.listen()
            threading.Timer(1.5, s.close).start()
            return out

        st._kill_locked = kill_then_hold_the_port
        took = st.restart("redis")
        assert took >= 1.0
        assert redis_sync.Redis.from_url(c.redis.url).ping()
    finally:
        st.down()
        shutil.rmtree(run_dir, ignore_errors=True)
