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
        pytest.skip("fixtures not available")
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
        pytest.skip("fixtures not available")
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
    rec = ops.show(blobs, by_cid["UNKBU"][b"ref"].decode())
    assert "UNKBU" in rec["raw"] and rec["outcomes"][0]["ack"] == "AE"


def env_cfg():
    from actors.runtime.config import load_config

    return load_config(run_dir=Path(__file__).resolve().parents[2] / ".run")
