"""The pieces of ``automat chaos`` that need no services: isolation of the chaos stack's
configuration, the fault plan, target selection, recovery statistics, the leak scanner
and the live-switchable core-system faults."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from actors.runtime.config import load_config
from deploy.chaos.faults import ALL_KINDS, FaultRecord, plan, summarize, targets_of, walk
from deploy.chaos.pii import Needles
from deploy.chaos.stack import ChaosStack, chaos_config, ports_of, worker_env


@pytest.fixture
def base(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("AUTOMAT_"):
            monkeypatch.delenv(k)
    return load_config(run_dir=tmp_path / ".run")


def test_chaos_config_never_points_at_the_shared_stack(base):
    c = chaos_config(base, port_base=26000)
    assert c.run_dir == base.run_dir / "chaos"
    shared = {base.redis.url, base.kafka.bootstrap_servers, base.imap.port, base.imap.ssl_port, base.smtp.port}
    mine = {c.redis.url, c.kafka.bootstrap_servers, c.imap.port, c.imap.ssl_port, c.smtp.port}
    assert not shared & mine
    for p in (c.crypto.keys_file, c.crypto.pseudonym_key_file, c.blob.dir, c.imap.ca_file):
        assert c.run_dir in p.parents  # own secrets, blobs, certificate
    assert worker_env(c)["AUTOMAT_REDIS__URL"] == c.redis.url
    # every chaos port is below the ephemeral range and distinct
    p = ports_of(26000)
    ports = [p[k] for k in ("redis", "kafka", "imap", "imaps", "smtp")] + [p["s3"] + i for i in range(1, 13)]
    assert len(set(ports)) == len(ports) and max(ports) < 32768
    with pytest.raises(ValueError):
        ports_of(40000)


def test_chaos_stack_has_the_s3_service_before_kafka(base):
    st = ChaosStack(chaos_config(base), port_base=26000)
    assert list(st.SERVICE_NAMES) == ["redis", "s3", "kafka", "imap", "smtp"]
    assert st._select(["kafka", "s3"]) == ["s3", "kafka"]


def test_plan_covers_every_kind_evenly():
    p = plan(64, ALL_KINDS, random.Random(1))
    assert len(p) == 64 and set(p) == set(ALL_KINDS)
    assert max(p.count(k) for k in ALL_KINDS) - min(p.count(k) for k in ALL_KINDS) == 0


def test_targets_by_kind():
    tree = {"children": [
        {"name": "infra", "kind": "supervisor", "state": "running",
         "children": [{"name": "outbox.relay", "kind": "worker", "state": "running"}]},
        {"name": "kim", "kind": "supervisor", "state": "running", "children": [
            {"name": "kim.slip.host.0", "kind": "worker", "state": "running"},
            {"name": "kim.worker.host.1", "kind": "worker", "state": "running"},
            {"name": "kim.mailboxes.0", "kind": "worker", "state": "restarting"}]},
        {"name": "hl7", "kind": "supervisor", "state": "running", "children": [
            {"name": "hl7.case.host.0", "kind": "worker", "state": "running"}]},
    ]}
    nodes = walk(tree)
    assert targets_of("kill:slip-host", nodes) == ["kim.slip.host.0"]
    assert targets_of("kill:mailbox", nodes) == []  # not running: not a target
    assert sorted(targets_of("kill:supervisor", nodes)) == ["hl7", "infra", "kim"]
    assert targets_of("kill:hl7-host", nodes) == ["hl7.case.host.0"]
    assert targets_of("kill:outbox-relay", nodes) == ["outbox.relay"]


def test_summary_percentiles_and_unrecovered():
    fs = [FaultRecord(kind="kill:slip-host", target="x", at_s=i, recovery_s=float(i)) for i in range(1, 101)]
    fs.append(FaultRecord(kind="restart:redis", target="redis", at_s=1, recovery_s=None))
    s = summarize(fs)
    assert s["kill:slip-host"]["n"] == 100 and s["kill:slip-host"]["p50_s"] == pytest.approx(50.5)
    assert s["kill:slip-host"]["p99_s"] == pytest.approx(99.01) and s["kill:slip-host"]["max_s"] == 100
    assert s["restart:redis"] == {"n": 1, "recovered": 0, "p50_s": None, "p99_s": None, "max_s": None}


def test_leak_scanner_finds_names_kvnrs_and_secrets_in_any_encoding():
    n = Needles()
    n.add("Ludmilla Brunnbach", "V933572083")
    n.add("Jörg Müllerhäuser", "A123456789")
    n.add_secret("c2VjcmV0LWtleS1tYXRlcmlhbA==")
    assert n.find(b'{"kvnr":"V933572083"}') == ["V933572083"]
    assert "Brunnbach" in n.find(b'<Patient name="Brunnbach" vorname="Ludmilla"/>')
    assert "Müllerhäuser" in n.find('{"n": "M\\u00fcllerh\\u00e4user"}'.encode())  # JSON-escaped
    assert "Ludmilla Brunnbach" in n.find("Patientin Ludmilla Brunnbach".encode())
    assert n.find(b"key=c2VjcmV0LWtleS1tYXRlcmlhbA==") == ["<secret>"]
    assert n.find(b"mail_id=3f2a kvnr_hash=V93357208 Brunnbachweg") == []


def test_core_faults_switch_live(tmp_path):
    from actors.kim.core_faults import ControlledFaults
    from actors.kim.core_system import CoreSystemError, CoreSystemTimeout, SqliteCoreSystem

    ctl = tmp_path / "faults"
    core = ControlledFaults(SqliteCoreSystem(tmp_path / "core.sqlite3"), ctl, poll_s=0.0)

    async def go():
        assert (await core.deposit({"kind": "x"}, "k:1")).created
        ctl.write_text("error=1.0")
        with pytest.raises(CoreSystemError):
            await core.deposit({"kind": "x"}, "k:2")
        ctl.write_text("timeout=1.0,timeout_s=0.01\n")
        os.utime(ctl, ns=(1, 1))  # a new mtime even within the same clock tick
        with pytest.raises(CoreSystemTimeout):
            await core.lookup_insured("h")
        ctl.unlink()  # no file: healthy
        assert (await core.deposit({"kind": "x"}, "k:2")).created
        assert core.count() == 2

    asyncio.run(go())
