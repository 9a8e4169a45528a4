"""HL7 v2 import actors against real Redis, real Ray actors and real sockets.

Every test uses its own billing units (random suffix), so the pseudonymous entity keys of
one test never meet another test's (or another session's) state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from actors.hl7 import ops
from actors.hl7.app import kinds
from actors.hl7.client import Hl7Client, free_port, msa
from actors.hl7.keys import BRIDGE, CASE, PATIENT, case_key, patient_key, pseudonymizer_for
from actors.hl7.listener import LOG_STREAM, Hl7Listener
from actors.hl7.messages import BillServices, ExportTarget, GetBridge, GetCase, GetPatient, PurgeCheck
from actors.hl7.samples import adt
from actors.hl7.settings import Hl7Settings, InterfaceSettings
from actors.runtime.blobs import BlobStore
from actors.runtime.crypto import KeyRing
from actors.runtime.router import Router, register_kinds
from actors.runtime.system import start_hosts
from protocols.hl7 import BilledService, Framing, Hl7Message, parse_message
from tests.unit.hl7._files import FIXTURES, all_fixture_names

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def hl7_hosts(cfg, stack, ray_session):
    async def reg():
        import redis.asyncio as aioredis

        r = aioredis.from_url(cfg.redis.url)
        await register_kinds(r, kinds(cfg, Hl7Settings()))
        await r.aclose()

    asyncio.run(reg())
    handles = []
    for k in kinds(cfg, Hl7Settings()):
        handles += start_hosts(cfg, k)
    yield handles


@pytest.fixture
async def env(cfg, hl7_hosts, redis_client, tmp_path):
    """Start listener actors for interface settings; yields a helper."""
    made = []

    class Env:
        router = Router(cfg)
        pseud = pseudonymizer_for(cfg)
        unit = f"U{uuid.uuid4().hex[:8]}"

        async def listener(self, config: dict, moped_url: str | None = None, **extra):
            config = {"name": f"i{uuid.uuid4().hex[:8]}", **config}
            if config.get("transport", "tcp") == "tcp":
                config.setdefault("transport", "tcp")
                config.setdefault("tcp", {"port": free_port()})
            config.setdefault("mapping", {"rows": [{"billing_unit": self.unit}]})
            s = InterfaceSettings.model_validate({"config": config, **extra})
            h = ray.remote(Hl7Listener).options(num_cpus=0, max_concurrency=1000).remote(
                cfg, s.model_dump(mode="json"), moped_url)
            info = await h.ready.remote()
            made.append(h)
            return h, info["port"]

        async def patient(self, number: str, unit: str | None = None):
            return await self.router.ask(PATIENT, patient_key(self.pseud, unit or self.unit, number), GetPatient())

        async def case(self, dk: str):
            return await self.router.ask(CASE, case_key(self.pseud, dk), GetCase())

    e = Env()
    yield e
    await e.router.close()
    for h in made:
        ray.kill(h)


def code(ack: bytes) -> str:
    return msa(ack)[1]


async def send_and_probe(c: Hl7Client, payload: bytes, probe_id: str) -> list[bytes]:
    """Send ``payload`` (already framed), then a probe message that is always acknowledged;
    returns the answers that arrived before the probe's ACK (the answers to ``payload``)."""
    await c.send_raw(payload)
    await c.send(adt("A08", probe_id, "PROBE", "PROBE"))
    got = []
    while True:
        a = await c.recv()
        if msa(a)[2:3] == [probe_id]:
            assert code(a) == "AA", a
            return got
        got.append(a)


# what the listener answers for each shared fixture (PID-3/PV1-19, one catch-all mapping
# row, background case creation). None: no ACK (MSH-15/16 NE/ER on success, or an ACK).
FIXTURE_ACKS: dict[str, list[str]] = {
    "cdc-trusted-intermediary/001_ADT_A01_v28.hl7": ["AE"],  # no PV1-19 case number
    "cdc-trusted-intermediary/001_Epic_ORM_O01_dg1_in1_gt1.hl7": ["AE"],  # no PID-3
    "cdc-trusted-intermediary/001_Natus_ACK.hl7": [],  # an ACK is not acknowledged
    "cdc-trusted-intermediary/002_Epic_ORU_R01.hl7": ["AE"],
    "cdc-trusted-intermediary/005_AL_ORU_R01_fhs_bhs_batch.hl7": [],  # MSH-15/16 NE
    "cdc-trusted-intermediary/005_MN_ADT_A01_v23_nk1_obx.hl7": ["AE"],
    "cdc-trusted-intermediary/008_ORU_R01_micro_character_encoding.hl7": ["AE"],
    "ipf/mdm_t02_ed_base64_zbe.hl7": [],  # MSH-15 ER, accepted
    "ipf/orbis_mdm_t01_v25deu_zbe.hl7": [],  # NE/NE (and AE internally: no PV1-19)
    "ipf/oru_r01_v24_zbe_zyx.hl7": ["AE"],
    "ipf/sap-ish_adt_a01_v25.hl7": [],  # MSH-15 ER, accepted
    "ipf/sap-ish_adt_a08_v25.hl7": [],
    "ms-fhir-converter/ADT-A02-01.hl7": ["AA"],
    "ms-fhir-converter/ADT-A03-01.hl7": ["AA"],
    "ms-fhir-converter/BAR-P01-01.hl7": ["AA"],
    "ms-fhir-converter/DFT-P03-01.hl7": ["AA"],
    "ms-fhir-converter/DFT-P03-02.hl7": ["AA"],
    "python-hl7/INVALID_file_bhs_inside_msg.hl7": ["AR"],
    "python-hl7/adt_a01_dg1_in1_v23.hl7": ["AA"],
    "python-hl7/batch_bhs_adt_a04_1msg.hl7": [],  # NE/NE
    "python-hl7/batch_bhs_adt_a04_2msgs.hl7": [],
    "python-hl7/file_fhs_2batches_adt_a04.hl7": [],
    "python-hl7/oru_r01_glucose_v24.hl7": ["AE"],
}


async def assert_fixture_entities(env) -> None:
    # SAP IS-H A01 + A08 (German): patient 79471, case 79237645
    p = await env.patient("79471")
    assert p.exists and p.taken and p.person.family == "Nachname"
    c = await env.case(f"{env.unit}/79237645")
    assert c.status == "open" and c.events == ["A01", "A08"] and c.point_of_care == "ISKA"
    # MS converter A02, A03, BAR, DFT, DFT for PATID1234 / 40007716: discharged, services kept
    c = await env.case(f"{env.unit}/40007716")
    assert c.events == ["A02", "A03", "BAR^P01", "DFT^P03", "DFT^P03"]
    assert c.status == "discharged" and c.services
    # MDM T02 accepted (PV1-19 present)
    assert (await env.patient("1245667")).exists
    # python-hl7 A01 v2.3
    assert (await env.case(f"{env.unit}/01")).events == ["A01"]
    # rejected ones created nothing
    assert not (await env.patient("PATID1234", unit="nope")).exists


# --------------------------------------------------------------------------- fixtures


async def test_every_fixture_over_mllp(env, redis_client):
    names = all_fixture_names()
    if not names:
        pytest.fail("fixtures not available (fixtures/ in the repository)")
    assert set(names) == set(FIXTURE_ACKS)
    h, port = await env.listener({"case_creation": "background"})
    iface = (await h.ready.remote())["name"]
    start_id = (await redis_client.xinfo_stream(LOG_STREAM))["last-generated-id"] if await redis_client.exists(
        LOG_STREAM) else b"0-0"
    async with Hl7Client("127.0.0.1", port) as c:
        for i, name in enumerate(names):
            answers = await send_and_probe(c, Framing().encode((FIXTURES / name).read_bytes()), f"PRB{i}")
            assert [code(a) for a in answers] == FIXTURE_ACKS[name], name
            if name.startswith("python-hl7/INVALID"):
                text = answers[0].decode()
                assert "BHS inside a message" in text  # readable reason in MSA-3 / ERR-8
    await assert_fixture_entities(env)
    # every message was kept with its outcome (the INVALID batch once, as a whole)
    rows = await redis_client.xrange(LOG_STREAM, min=start_id)
    kept = [r for _, r in rows if r[b"iface"] == iface.encode() and not r[b"cid"].startswith(b"PRB")]
    assert len(kept) == 26  # 18 single messages, 7 in batches, 1 broken batch
    assert sum(r[b"ack"] == b"" for r in kept) == 12  # answered with nothing, but kept


async def test_every_fixture_through_the_file_drop(env, tmp_path):
    names = all_fixture_names()
    if not names:
        pytest.fail("fixtures not available (fixtures/ in the repository)")
    drop, archive = tmp_path / "in", tmp_path / "archive"
    await env.listener({"transport": "file", "case_creation": "background",
                        "file": {"directory": str(drop), "wildcard": "*.hl7", "archive_directory": str(archive)}},
                       file_poll_s=0.1, file_settle_s=0.2)
    for i, name in enumerate(names):
        shutil.copy(FIXTURES / name, drop / f"{i:02d}_{Path(name).name}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if len(list(archive.glob("*.ack"))) == len(names):
            break
        await asyncio.sleep(0.2)
    acks = sorted(archive.glob("*.ack"))
    assert len(acks) == len(names)
    assert not list(drop.glob("*.hl7")) and not list((drop / ".processing").iterdir())
    for i, name in enumerate(names):
        (ack_file,) = [a for a in acks if a.name.endswith(f"_{i:02d}_{Path(name).name}.ack")]
        got = [ln.split("|")[1] for ln in ack_file.read_text().splitlines() if ln.startswith("MSA")]
        assert got == FIXTURE_ACKS[name], name
        assert (archive / ack_file.name[: -len(".ack")]).read_bytes() == (FIXTURES / name).read_bytes()
    await assert_fixture_entities(env)


async def test_half_written_file_is_read_once_when_complete(env, tmp_path):
    drop, archive = tmp_path / "in", tmp_path / "archive"
    await env.listener({"transport": "file", "case_creation": "background",
                        "file": {"directory": str(drop), "wildcard": "*.hl7", "archive_directory": str(archive)}},
                       file_poll_s=0.1, file_settle_s=0.6)
    msg = adt("A01", "HALF1", "7001", "8001").encode()
    f = drop / "a.hl7"
    with open(f, "wb") as out:  # a writer that takes its time
        out.write(msg[:40])
        out.flush()
        for i in range(40, len(msg), 40):
            await asyncio.sleep(0.15)
            out.write(msg[i:i + 40])
            out.flush()
    for _ in range(100):
        if list(archive.glob("*.ack")):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    (ack,) = archive.glob("*.ack")
    assert "MSA|AA|HALF1" in ack.read_text()
    assert (await env.patient("7001")).messages == 1


# --------------------------------------------------------------------------- bad input


async def test_bad_input_gets_a_clear_nak_and_the_connection_survives(env, redis_client):
    _, port = await env.listener({"case_creation": "background",
                                  "mapping": {"rows": [{"patient_class": "I", "billing_unit": env.unit}]}})
    f = Framing()
    async with Hl7Client("127.0.0.1", port) as c:
        # a message split across TCP reads
        data = f.encode(adt("A01", "SPLIT1", "5001", "6001").encode())
        for i in range(0, len(data), 17):
            await c.send_raw(data[i:i + 17])
            await asyncio.sleep(0.01)
        a = await c.recv()
        assert msa(a)[1:3] == ["AA", "SPLIT1"]
        # several messages in one read: one ACK each, in order
        await c.send_raw(b"".join(f.encode(adt("A08", f"MANY{i}", "5001", "6001").encode()) for i in range(3)))
        assert [msa(await c.recv())[1:3] for _ in range(3)] == [["AA", f"MANY{i}"] for i in range(3)]
        # garbage bytes outside a frame, then a good message
        await c.send_raw(b"\x00\xffHELLO garbage")
        await c.send(adt("A08", "AFTERJUNK", "5001", "6001"))
        a = await c.recv()
        assert code(a) == "AR" and "outside any frame" in a.decode()
        assert msa(await c.recv())[1:3] == ["AA", "AFTERJUNK"]
        # broken framing: a frame that never ends (a new start char comes first)
        await c.send_raw(b"\x0b" + adt("A08", "NOEND", "5001", "6001").encode())
        await c.send(adt("A08", "NEXT", "5001", "6001"))
        a = await c.recv()
        assert msa(a)[1:3] == ["AR", "NOEND"] and "end character" in a.decode()
        assert msa(await c.recv())[1:3] == ["AA", "NEXT"]
        # wrong encoding characters
        bad_enc = adt("A08", "BADENC", "5001", "6001").replace("MSH|^~\\&|", "MSH|^^\\&|", 1)
        a = await c.request(bad_enc)
        assert code(a) == "AR" and "encoding" in a.decode().lower()
        # missing MSH
        a = await c.request("PID|1||5001^^^KLINIK^PI||X^Y\rPV1|1|I\r")
        assert code(a) == "AR" and "MSH" in a.decode()
        # missing PID / PV1
        no_pid = "\r".join(s for s in adt("A01", "NOPID", "5001", "6001").split("\r") if not s.startswith("PID"))
        a = await c.request(no_pid)
        assert msa(a)[1:3] == ["AE", "NOPID"] and "PID" in a.decode()
        no_pv1 = "\r".join(s for s in adt("A01", "NOPV1", "5001", "6001").split("\r") if not s.startswith("PV1"))
        a = await c.request(no_pv1)
        assert msa(a)[1:3] == ["AE", "NOPV1"] and "PV1" in a.decode()
        # unknown billing unit (only patient class I is mapped)
        a = await c.request(adt("A01", "UNKBU", "5002", "6002", patient_class="O"))
        assert msa(a)[1:3] == ["AE", "UNKBU"] and "unknown billing unit" in a.decode()
        # enhanced mode: CA / CE
        a = await c.request(adt("A08", "ENH1", "5001", "6001", ack_mode="AL"))
        assert msa(a)[1:3] == ["CA", "ENH1"]
        a = await c.request(adt("A01", "ENH2", "5002", "6002", patient_class="O", ack_mode="AL"))
        assert msa(a)[1:3] == ["CE", "ENH2"]
        # still the same connection: a good message is accepted
        assert msa(await c.request(adt("A08", "LAST", "5001", "6001")))[1:3] == ["AA", "LAST"]
    assert not (await env.patient("5002")).exists
    # nothing lost: every one of them is in the log, errors with their code, and kept
    rows = await redis_client.xrevrange(LOG_STREAM, count=200)
    by_cid = {r[b"cid"].decode(): r for _, r in rows}
    for cid, err in (("NOPID", "missing_segment"), ("NOPV1", "missing_segment"), ("UNKBU", "unknown_billing_unit"),
                     ("NOEND", "missing_end"), ("BADENC", "bad_encoding_chars")):
        assert by_cid[cid][b"error"].decode() == err, cid
    blobs = BlobStore(env_cfg().blob.dir, KeyRing.from_file(env_cfg().crypto.keys_file))
    ref = by_cid["UNKBU"][b"ref"].decode()
    rec = ops.show(blobs, ref)
    assert "UNKBU" in rec["raw"] and rec["outcomes"][0]["ack"] == "AE"
    assert "unknown billing unit" in rec["outcomes"][0]["reason"]
    on_disk = (Path(env_cfg().blob.dir) / ref).read_bytes()  # kept encrypted (AES-GCM), not in plain form
    assert b"UNKBU" not in on_disk and b"Mustermann" not in on_disk


def env_cfg():
    from actors.runtime.config import load_config

    return load_config(run_dir=Path(__file__).resolve().parents[2] / ".run")


# --------------------------------------------------------------------------- switches
# In-process listeners (the same class the supervisor runs as an actor) against the real
# shard hosts: one per configuration, fast to start.


async def local(env, config: dict, moped_url: str | None = None, **extra) -> Hl7Listener:
    config = {"name": f"l{uuid.uuid4().hex[:8]}", "transport": "tcp", "tcp": {"port": free_port()}, **config}
    config.setdefault("mapping", {"rows": [{"billing_unit": env.unit}]})
    s = InterfaceSettings.model_validate({"config": config, **extra})
    lst = Hl7Listener(env_cfg(), s.model_dump(mode="json"), moped_url)
    await lst.ready()
    env.locals.append(lst)
    return lst


async def feed(lst: Hl7Listener, *messages: str) -> list[list[str]]:
    """Process messages as if received; returns [MSA-1, MSA-2, MSA-3] of each ACK."""
    out = []
    for m in messages:
        acks = await lst.process(m.replace("\r", "\r").encode(), "test")
        out.extend(msa(a.er7.encode())[1:4] for a in acks)
    return out


@pytest.fixture
async def lenv(env):
    env.locals = []
    yield env
    for lst in env.locals:
        await lst.stop()


async def eventually(fn, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        r = await fn()
        if r or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.1)


async def test_switch_patient_and_order_fields(lenv):
    msg = adt("A01", "IDF1", "P7", "C7", pid2="ALT7", pid18="ACC7")
    for choice, unit, (pat, case) in (("PID-3/PV1-19", "M", ("P7", "C7")), ("PID-2/PV1-19", "S", ("ALT7", "C7")),
                                      ("PID-3/PID-18", "P", ("P7", "ACC7"))):
        u = lenv.unit + unit
        lst = await local(lenv, {"id_fields": choice, "case_creation": "background",
                                 "mapping": {"rows": [{"billing_unit": u}]}})
        assert (await feed(lst, msg))[0][0] == "AA"
        p = await lenv.patient(pat, unit=u)
        assert p.exists and p.patient_number == pat, choice
        c = await lenv.case(f"{u}/{case}")
        assert c.exists and c.case_number == case and c.patient_number == pat, choice
    # the configured field must be filled: PID-2 empty with the SMS setting -> AE naming it
    lst = await local(lenv, {"id_fields": "PID-2/PV1-19"})
    (ack,) = await feed(lst, adt("A01", "IDF2", "P8", "C8"))
    assert ack[0] == "AE" and "PID-2" in ack[2]


async def test_switch_documentation_fields_s1_s2(lenv):
    """DURIA "Dokumentation Patient / Auftrag": the external numbers land in S1 / S2."""
    msg = adt("A01", "DOC1", "P9", "C9")
    for (pat_in, case_in), unit in ((("S1", "S2"), "a"), (("S2", None), "b"), ((None, None), "c")):
        u = lenv.unit + unit
        lst = await local(lenv, {"case_creation": "background", "store_patient_number_in": pat_in,
                                 "store_case_number_in": case_in, "mapping": {"rows": [{"billing_unit": u}]}})
        await feed(lst, msg)
        want = {k: v for k, v in ((pat_in, "P9"), (case_in, "C9")) if k}
        assert (await lenv.patient("P9", unit=u)).documentation == want, (pat_in, case_in)


async def test_switch_allowed_client_address(lenv):
    """DURIA "IP-Adresse Client": only the configured KIS may connect."""
    lst = await local(lenv, {"case_creation": "background", "tcp": {"port": free_port(), "allowed_client": "127.0.0.2"}})
    with pytest.raises(ConnectionError):  # closed without an answer (asyncio: EOF or reset)
        async with Hl7Client("127.0.0.1", lst.port) as c:
            await c.send(adt("A01", "IP1", "IP1", "IPC1"))
            await c.recv(10)
    assert not (await lenv.patient("IP1")).exists
    lst = await local(lenv, {"case_creation": "background", "tcp": {"port": free_port(), "allowed_client": "127.0.0.1"}})
    async with Hl7Client("127.0.0.1", lst.port) as c:
        assert msa(await c.request(adt("A01", "IP2", "IP1", "IPC1")))[1:3] == ["AA", "IP2"]
    assert (await lenv.patient("IP1")).exists


async def test_switch_mapping_table_chooses_the_billing_unit(lenv):
    u = lenv.unit
    rows = [{"patient_class": "O", "contract_code": "K", "billing_unit": f"{u}A"},
            {"patient_class": "O", "billing_unit": f"{u}B"},
            {"patient_class": "I", "function_area": "STAT1", "billing_unit": f"{u}C"},
            {"patient_class": "I", "function_area": "STAT1", "discipline": "GYN", "billing_unit": f"{u}D"}]
    lst = await local(lenv, {"case_creation": "background", "mapping": {"rows": rows}})
    acks = await feed(lst, adt("A01", "M1", "M1", "MC1", patient_class="O", contract="K"),
                      adt("A01", "M2", "M2", "MC2", patient_class="O", contract="P"),
                      adt("A01", "M3", "M3", "MC3", patient_class="I", ward="STAT1", dept="CHIR"),
                      adt("A01", "M4", "M4", "MC4", patient_class="I", ward="STAT1", dept="GYN"),
                      adt("A01", "M5", "M5", "MC5", patient_class="I", ward="STAT9"))
    assert [a[0] for a in acks] == ["AA", "AA", "AA", "AA", "AE"]
    assert "unknown billing unit" in acks[4][2]
    for n, unit in (("M1", "A"), ("M2", "B"), ("M3", "C"), ("M4", "D")):
        assert (await lenv.patient(n, unit=f"{u}{unit}")).exists, n
    assert not (await lenv.patient("M5", unit=f"{u}C")).exists


async def pending_keys(env, unit=None) -> list[str]:
    return [e.patient_key for _, e in await ops.pending(env.router, [unit or env.unit])]


async def test_switch_case_creation_no(lenv):
    lst = await local(lenv, {"case_creation": "no"})
    assert (await feed(lst, adt("A01", "N1", "N1", "NC1")))[0][0] == "AA"
    p = await lenv.patient("N1")
    assert p.exists and not p.taken and p.case_keys == []
    assert not (await lenv.case(f"{lenv.unit}/NC1")).exists  # master data only, never a case
    assert await eventually(lambda: _has(pending_keys(lenv), p.key))
    res = await ops.take(lenv.router, [lenv.unit], p.key[:12])
    assert res.ok and res.cases_created == 0
    assert await eventually(lambda: _lacks(pending_keys(lenv), p.key))


async def test_switch_case_creation_yes_is_completed_on_take_over(lenv):
    lst = await local(lenv, {"case_creation": "yes"})
    await feed(lst, adt("A01", "Y1", "Y1", "YC1"))
    p = await lenv.patient("Y1")
    c = await lenv.case(f"{lenv.unit}/YC1")
    assert not p.taken and c.exists and c.status == "pending" and not c.created
    assert await eventually(lambda: _has(pending_keys(lenv), p.key))
    res = await ops.take(lenv.router, [lenv.unit], p.key)
    assert res.ok and res.cases_created == 1
    c = await eventually(lambda: _created(lenv, f"{lenv.unit}/YC1"))
    assert c.status == "open"
    assert await eventually(lambda: _lacks(pending_keys(lenv), p.key))


async def test_switch_case_creation_background_and_all_background(lenv):
    for mode in ("background", "all_background"):
        u = lenv.unit + mode[:3]
        lst = await local(lenv, {"case_creation": mode, "mapping": {"rows": [{"billing_unit": u}]}})
        await feed(lst, adt("A01", "B1", "B1", "BC1"))
        p = await lenv.patient("B1", unit=u)
        c = await lenv.case(f"{u}/BC1")
        assert p.taken and c.created and c.status == "open", mode
        assert await pending_keys(lenv, u) == []
    from actors.hl7.messages import TakeOver

    refused = await lenv.router.ask(PATIENT, p.key, TakeOver(at=time.time()))
    assert not refused.ok and "background" in refused.reason


async def _has(coro, key):
    return key in await coro


async def _lacks(coro, key):
    return key not in await coro


async def _created(env, dk):
    c = await env.case(dk)
    return c if c.created else None


@pytest.mark.parametrize("scope", ["per_order", "per_billing_unit"])
async def test_switch_case_scope_on_a_billing_unit_change(lenv, scope):
    u = lenv.unit
    rows = [{"patient_class": "E", "billing_unit": f"{u}KASSE"}, {"patient_class": "O", "billing_unit": f"{u}BG"}]
    lst = await local(lenv, {"case_creation": "background", "case_scope": scope, "mapping": {"rows": rows}})
    sc = f"SC{u}"  # per order the case key has no billing unit: a run-unique case number
    # emergency ward (Kasse) first, then the surgical outpatient clinic (BG)
    acks = await feed(lst, adt("A04", "S1", "S1", sc, patient_class="E"),
                      adt("A08", "S2", "S1", sc, patient_class="O"))
    assert [a[0] for a in acks] == ["AA", "AA"]
    kasse, bg = f"{u}KASSE", f"{u}BG"
    if scope == "per_order":
        c = await lenv.case(sc)  # one case per order: it moved, the Kasse case is gone
        assert c.billing_unit == bg and c.billing_units_removed == [kasse] and c.events == ["A04", "A08"]

        async def detached():
            return (await lenv.patient("S1", unit=kasse)).case_keys == []

        assert await eventually(detached)
        assert (await lenv.patient("S1", unit=bg)).case_keys == [c.key]
        assert not (await lenv.case(f"{kasse}/{sc}")).exists
    else:
        a, b = await lenv.case(f"{kasse}/{sc}"), await lenv.case(f"{bg}/{sc}")  # a case in each unit
        assert a.exists and b.exists and a.billing_unit == kasse and b.billing_unit == bg
        assert a.events == ["A04"] and b.events == ["A08"]
        assert (await lenv.patient("S1", unit=kasse)).case_keys == [a.key]
        assert (await lenv.patient("S1", unit=bg)).case_keys == [b.key]


async def test_switch_case_per_order_segment(lenv):
    lst = await local(lenv, {"case_creation": "background", "order_interface": True, "case_per_order_segment": True})
    acks = await feed(lst, adt("A01", "O1", "O1", "OC1", orc=["ORD1", "ORD2"]), adt("A01", "O2", "O2", "OC2"))
    assert acks[0][0] == "AA" and acks[1][0] == "AE" and "ORC" in acks[1][2]
    for o in ("ORD1", "ORD2"):
        c = await lenv.case(f"{lenv.unit}/OC1/{o}")
        assert c.exists and c.orders == [o]
    assert (await lenv.patient("O1")).case_keys.__len__() == 2
    # without the switch: one case for the stay
    lst2 = await local(lenv, {"case_creation": "background", "order_interface": True,
                              "mapping": {"rows": [{"billing_unit": lenv.unit + "X"}]}})
    await feed(lst2, adt("A01", "O3", "O1", "OC1", orc=["ORD1", "ORD2"]))
    assert (await lenv.case(f"{lenv.unit}X/OC1")).exists


async def test_switch_discharge_diagnosis_types(lenv):
    msg = adt("A03", "D1", "D1", "DC1", dg1=[("K35.8", "F"), ("R10.3", "A")])
    lst = await local(lenv, {"case_creation": "background"})  # default: F (final) only
    await feed(lst, msg)
    assert [d.code for d in (await lenv.case(f"{lenv.unit}/DC1")).diagnoses] == ["K35.8"]
    u2 = lenv.unit + "2"
    lst = await local(lenv, {"case_creation": "background", "discharge_diagnosis_types": ["A"],
                             "mapping": {"rows": [{"billing_unit": u2}]}})
    await feed(lst, msg)
    assert [d.code for d in (await lenv.case(f"{u2}/DC1")).diagnoses] == ["R10.3"]


async def test_switch_diagnosis_case_types(lenv):
    msg = adt("A03", "T1", "T1", "TC1", dg1=[("K35.8", "F")])
    for allowed, unit, expect in ((["statutory", "bg"], "a", []), (["private"], "b", ["K35.8"])):
        u = lenv.unit + unit
        lst = await local(lenv, {"case_creation": "background", "diagnosis_case_types": allowed,
                                 "mapping": {"rows": [{"billing_unit": u, "case_type": "private"}]}})
        await feed(lst, msg)
        assert [d.code for d in (await lenv.case(f"{u}/TC1")).diagnoses] == expect, allowed


async def test_switch_purge_after_days(lenv):
    from datetime import datetime, timedelta, timezone

    day = 86400
    now = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None)

    def discharge(days_ago: int) -> tuple[str, float]:
        d = now - timedelta(days=days_ago)
        return adt("A03", f"PU{days_ago}", "PU1", "PUC1", discharge_ts=d.strftime("%Y%m%d%H%M%S")), \
            d.replace(tzinfo=timezone.utc).timestamp()

    msg, discharged = discharge(1)  # discharged yesterday: the purge timer is due in 9 days
    lst = await local(lenv, {"case_creation": "no", "purge_after_days": 10})
    await feed(lst, msg)
    p = await lenv.patient("PU1")
    assert p.exists and p.discharged_at is not None
    assert await eventually(lambda: _has(pending_keys(lenv), p.key))
    assert (await lenv.router.ask(PATIENT, p.key, PurgeCheck(now=discharged + 9 * day))).exists
    assert (await lenv.router.ask(PATIENT, p.key, PurgeCheck(now=discharged + 11 * day))).purged
    assert not (await lenv.patient("PU1")).exists
    assert await eventually(lambda: _lacks(pending_keys(lenv), p.key))
    # discharged 11 days ago, never taken over: the durable timer purges it by itself
    u = lenv.unit + "T"
    lst = await local(lenv, {"case_creation": "no", "purge_after_days": 10, "mapping": {"rows": [{"billing_unit": u}]}})
    assert (await feed(lst, discharge(11)[0]))[0][0] == "AA"  # stored ...

    async def purged():
        return not (await lenv.patient("PU1", unit=u)).exists and not await pending_keys(lenv, u)

    assert await eventually(purged, 30)  # ... and purged without anyone asking
    # no purge period: kept
    u = lenv.unit + "K"
    lst = await local(lenv, {"case_creation": "no", "mapping": {"rows": [{"billing_unit": u}]}})
    await feed(lst, msg)
    p = await lenv.patient("PU1", unit=u)
    assert (await lenv.router.ask(PATIENT, p.key, PurgeCheck(now=discharged + 400 * day))).exists


async def test_switch_custom_framing_over_tcp(lenv):
    framing = {"start_char": 0x02, "end_char": 0x03, "after_end_char": None, "segment_separator": 0x0A}
    lst = await local(lenv, {"case_creation": "background", "tcp": {"port": free_port(), "framing": framing}})
    f = Framing(start=b"\x02", end=b"\x03", after_end=b"", segment_sep=b"\n")
    async with Hl7Client("127.0.0.1", lst.port, f) as c:
        a = await c.request(adt("A01", "FR1", "FR1", "FRC1").replace("\r", "\n"))
        assert msa(a)[1:3] == ["AA", "FR1"] and b"\r" not in a
        # MLLP bytes are garbage to this interface: rejected, connection kept
        await c.send_raw(Framing().encode(adt("A08", "FR2", "FR1", "FRC1").encode()))
        await c.send(adt("A08", "FR3", "FR1", "FRC1").replace("\r", "\n"))
        answers = [await c.recv(), await c.recv()]
        assert msa(answers[-1])[1:3] == ["AA", "FR3"]
    assert (await lenv.case(f"{lenv.unit}/FRC1")).exists


async def test_switch_file_reading_only_in_background_modes(lenv, tmp_path):
    drop, archive = tmp_path / "in", tmp_path / "arch"
    lst = await local(lenv, {"transport": "file", "case_creation": "yes",
                             "file": {"directory": str(drop), "archive_directory": str(archive)}},
                      file_poll_s=0.1, file_settle_s=0.0)
    (drop / "x.hl7").write_text(adt("A01", "F1", "F1", "FC1"))
    await asyncio.sleep(0.6)
    assert (drop / "x.hl7").exists()  # not polled: "yes" reads on demand (LKIS / 3.)
    assert (await lst.scan())["files"] == 1
    assert not (drop / "x.hl7").exists() and (await lenv.patient("F1")).exists


async def test_adt_events_and_cancellations_apply_in_order(lenv):
    lst = await local(lenv, {"case_creation": "background"})
    n = lenv.unit
    acks = await feed(lst,
                      adt("A01", "E1", "E1", "EC1", ward="NOTF"),
                      adt("A02", "E2", "E1", "EC1", ward="CHIR1"),
                      adt("A12", "E3", "E1", "EC1", ward="CHIR1"),  # transfer cancelled
                      adt("A03", "E4", "E1", "EC1", ward="NOTF", discharge_ts="20260305120000"),
                      adt("A13", "E5", "E1", "EC1", ward="NOTF"))  # discharge cancelled
    assert [a[0] for a in acks] == ["AA"] * 5
    c = await lenv.case(f"{n}/EC1")
    assert c.events == ["A01", "A02", "A12", "A03", "A13"]
    assert c.status == "open" and c.discharge_at is None and c.point_of_care == "NOTF"
    assert [m.event for m in c.movements] == ["A01", "A03"]
    await feed(lst, adt("A11", "E6", "E1", "EC1"))
    assert (await lenv.case(f"{n}/EC1")).status == "cancelled"
    # the same message again (a resend after a lost ACK) is acknowledged, not applied twice
    await feed(lst, adt("A11", "E6", "E1", "EC1"))
    assert (await lenv.case(f"{n}/EC1")).events == ["A01", "A02", "A12", "A03", "A13", "A11"]


# --------------------------------------------------------------------------- MOPED bridge, FT1 export


async def bridge_view(env, dk: str):
    return await env.router.ask(BRIDGE, case_key(env.pseud, dk), GetBridge())


async def test_admitted_moved_discharged_patient_ends_as_a_billed_moped_case(lenv, cfg, serve_session):
    import httpx

    from actors.moped.app import composition_kind, serve_app
    from protocols.moped import samples as S

    kind = composition_kind(cfg)
    import redis.asyncio as aioredis

    r = aioredis.from_url(cfg.redis.url)
    await register_kinds(r, [kind])
    await r.aclose()
    await asyncio.to_thread(start_hosts, cfg, kind)
    await asyncio.to_thread(serve_app, cfg)
    base = serve_session + "/moped"
    lst = await local(lenv, {"case_creation": "background"}, moped_url=base)
    dk = f"{lenv.unit}/MC1"

    async def bridged(n):
        async def check():
            v = await bridge_view(lenv, dk)
            return v if len(v.done) + len(v.refused) >= n or (v.waiting and n == 0) else None
        v = await eventually(check, 60)
        assert v is not None, await bridge_view(lenv, dk)
        return v

    # admission (emergency department, admission diagnosis) -> $aufnehmen
    acks = await feed(lst, adt("A01", "MO1", "MP1", "MC1", ward="NOTF", event_ts="20260301080000",
                               dg1=[("R10.3", "A")]))
    assert acks[0][0] == "AA"
    v = await bridged(1)
    assert v.done == ["aufnehmen"] and v.refused == []
    # another MOPED client writes in between: our next call hits a stale version (409)
    async with httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": "Bearer dev-kh"}) as http:
        cur = await http.get(f"/Composition/{v.composition_id}")
        vid = cur.headers["etag"].strip('W/"')
        other = await http.post(f"/Composition/{v.composition_id}/_history/{vid}/$update",
                                json=S.params("update", (S.urn(), S.condition("R50.9"))))
        assert other.status_code == 200, other.text
        # moved to the surgical ward -> $update (after re-reading on 409)
        await feed(lst, adt("A02", "MO2", "MP1", "MC1", ward="CHIR3", event_ts="20260301120000"))
        v = await bridged(2)
        assert v.done == ["aufnehmen", "update"] and v.conflicts >= 1
        # discharged with the discharge (main) diagnosis -> $entlassen; billing waits for services
        await feed(lst, adt("A03", "MO3", "MP1", "MC1", ward="CHIR3", event_ts="20260305100000",
                            discharge_ts="20260305100000", dg1=[("K35.8", "F")]))
        v = await bridged(3)
        assert v.done == ["aufnehmen", "update", "entlassen"], v
        # the KIS sends the services (FT1) -> $abrechnen with diagnoses + services
        await feed(lst, adt("P03", "MO4", "MP1", "MC1", message_type="DFT", ward="CHIR3", event_ts="20260305110000",
                            ft1=[("T1", "01100", "1"), ("T2", "02300", "2")]))
        v = await bridged(4)
        assert v.done == ["aufnehmen", "update", "entlassen", "abrechnen"] and v.refused == [], v
        doc = (await http.get(f"/Composition/{v.composition_id}/$document")).json()
    res = [e["resource"] for e in doc["entry"]]
    comp = res[0]
    assert comp["resourceType"] == "Composition"
    claims = [x for x in res if x["resourceType"] == "Claim" and x["use"] == "claim"]
    assert len(claims) == 1 and len(claims[0]["procedure"]) == 2
    codes_ = {c["code"]["coding"][0]["code"] for c in res if c["resourceType"] == "Condition"}
    assert {"R10.3", "K35.8", "R50.9"} <= codes_
    transfers = [x for x in res if x["resourceType"] == "Encounter" and x.get("type")]
    assert sorted(t["serviceProvider"]["identifier"]["value"] for t in transfers) == ["CHIR3", "NOTF"]
    assert all("end" in t["actualPeriod"] for t in transfers)


async def test_billed_services_go_back_to_the_kis_as_dft_p03_file_and_tcp(lenv, tmp_path):
    lst = await local(lenv, {"case_creation": "background"})
    await feed(lst, adt("A01", "X1", "XP1", "XC1"))
    ck = case_key(lenv.pseud, f"{lenv.unit}/XC1")
    services = [BilledService(service_date="2026-03-02", code="01100", coding_system="EBM", text="Notfall"),
                BilledService(service_date="2026-03-02", code="40120", coding_system="EBM", quantity=2)]
    # as a file
    out = tmp_path / "export"
    sent = await lenv.router.ask(CASE, ck, BillServices(services=services, at=time.time(),
                                                        target=ExportTarget(transport="file", directory=str(out))))
    f = await eventually(lambda: _glob(out, f"DFT_P03_{sent.control_id}.hl7"))
    m = parse_message(f.read_bytes())
    assert isinstance(m, Hl7Message) and (m.message_type, m.trigger_event) == ("DFT", "P03")
    assert m.patient.identifiers[0].id == "XP1" and m.visit.visit_number.id == "XC1"
    assert [t.code.code for t in m.transactions] == ["01100", "40120"]
    # over TCP to the KIS, which answers AA
    got: list[bytes] = []

    async def kis(reader, writer):
        from protocols.hl7 import FrameDecoder, build_ack

        dec = FrameDecoder(Framing())
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            for fr in dec.feed(chunk):
                got.append(fr.payload)
                writer.write(Framing().encode(build_ack(parse_message(fr.payload)).to_bytes()))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(kis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await lenv.router.ask(CASE, ck, BillServices(services=services[:1], at=time.time(),
                                                     target=ExportTarget(transport="tcp", port=port)))
        assert await eventually(lambda: _nonempty(got))
        m = parse_message(got[0])
        assert m.message_type == "DFT" and [t.code.code for t in m.transactions] == ["01100"]
    finally:
        server.close()
    assert (await lenv.case(f"{lenv.unit}/XC1")).billed == 2


async def _glob(d: Path, name: str):
    p = d / name
    return p if p.exists() else None


async def _nonempty(xs):
    return bool(xs)


# --------------------------------------------------------------------------- operator CLI


async def test_operator_cli_pending_take_search(lenv, tmp_path, monkeypatch):
    """``automat hl7 pending | take ID | search NUMBER`` against the running entities."""
    import yaml
    from typer.testing import CliRunner

    from deploy.cli import app

    u = lenv.unit
    iface = {"name": f"cli{u}", "transport": "tcp", "tcp": {"port": free_port()}, "case_creation": "yes",
             "mapping": {"rows": [{"billing_unit": u}]}}
    conf = tmp_path / "hl7.yaml"
    conf.write_text(yaml.safe_dump({"interfaces": [{"config": iface}]}))
    monkeypatch.setenv("AUTOMAT_HL7_CONFIG", str(conf))
    lst = await local(lenv, {**iface, "name": f"l{u}", "tcp": {"port": free_port()}})
    await feed(lst, adt("A01", "CLI1", "CLIP1", "CLIC1", family="Kowalski", given="Jan"))
    p = await lenv.patient("CLIP1")
    assert await eventually(lambda: _has(pending_keys(lenv), p.key))

    def cli(*args: str):
        r = CliRunner().invoke(app, list(args), catch_exceptions=False,
                               env={"COLUMNS": "250", "AUTOMAT_HL7_CONFIG": str(conf)})
        return r.exit_code, r.output

    code_, out = await asyncio.to_thread(cli, "hl7", "pending")
    assert code_ == 0 and "pending patients (1)" in out and "CLIP1" in out and "Kowalski, Jan" in out
    assert p.key[:13] in out and "CLIC1" in out
    code_, out = await asyncio.to_thread(cli, "hl7", "search", "CLIC1")
    assert code_ == 0 and "no. CLIC1" in out and "status pending" in out
    code_, out = await asyncio.to_thread(cli, "hl7", "take", "pnope")
    assert code_ == 1 and "no pending patient" in out
    code_, out = await asyncio.to_thread(cli, "hl7", "take", p.key[:13])
    assert code_ == 0 and "cases created: 1" in out, out
    assert await eventually(lambda: _lacks(pending_keys(lenv), p.key))
    code_, out = await asyncio.to_thread(cli, "hl7", "pending")
    assert code_ == 0 and "pending patients (0)" in out
    code_, out = await asyncio.to_thread(cli, "hl7", "search", "CLIP1")
    assert code_ == 0 and "no. CLIP1" in out and "taken=True" in out
    code_, out = await asyncio.to_thread(cli, "hl7", "search", "NOSUCH99")
    assert code_ == 1 and "nothing found" in out
