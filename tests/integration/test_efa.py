"""EFA case record provider end to end: HTTP API on Ray Serve -> router -> record entities
(Redis, encrypted) + blob repository; the seven communication patterns of seed 001."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import httpx
import pytest
import ray

from actors.efa.app import kinds
from actors.efa.client import EfaClient, EfaError, enrol_credential
from actors.efa.identity import IdentityProvider
from actors.efa.service import patient_key, record_key
from actors.runtime.crypto import Pseudonymizer
from actors.runtime.router import Router, register_kinds
from actors.runtime.system import start_hosts
from protocols.efa.api import Consent, Credential
from protocols.efa.messages import AccessLogQuery, RecordStatusQuery
from protocols.efa.model import RecordState, Relationship
from tests.integration import efa_support

pytestmark = pytest.mark.integration

DAY = 86400.0


@pytest.fixture(scope="module")
async def efa(cfg, stack, serve_session):
    import redis.asyncio as aioredis
    from ray import serve

    from actors.efa.http import build_app

    efa_support.set_offset(cfg, 0.0)
    ks = kinds(cfg, ports="tests.integration.efa_support:make_ports")
    r = aioredis.from_url(cfg.redis.url)
    await register_kinds(r, ks)
    await r.aclose()
    handles = []
    for k in ks:
        handles += await asyncio.to_thread(start_hosts, cfg, k)
    await asyncio.to_thread(serve.run, build_app(cfg), name="efa", route_prefix="/efa")
    base = f"{serve_session}/efa"
    yield base
    efa_support.set_offset(cfg, 0.0)
    await asyncio.to_thread(serve.delete, "efa")
    for h in handles:
        ray.kill(h)


@pytest.fixture
async def router(cfg, efa):
    rt = Router(cfg)
    yield rt
    await rt.close()


async def client(cfg, base, sub, org, role="arzt") -> EfaClient:
    c = EfaClient(base)
    c.me = await c.open_context(enrol_credential(cfg, sub, org, role))
    return c


def uid(p: str) -> str:
    return f"{p}-{uuid.uuid4().hex[:10]}"


def consent(*participants, days=1.0, extend=True, merge=True) -> Consent:
    return Consent(participants=list(participants), valid_until=time.time() + days * DAY, may_extend=extend,
                   may_merge=merge)


async def codes(coro) -> tuple[int, str]:
    with pytest.raises(EfaError) as e:
        await coro
    return e.value.status, e.value.code


# --------------------------------------------------------------------------- the seven patterns

async def test_seven_patterns_end_to_end(cfg, efa, router, redis_client):
    a_sub, b_sub = uid("arzt-a"), uid("arzt-b")
    b_org = uid("klinik-b")
    # 1. Aufbau des Sicherheitskontextes
    a = await client(cfg, efa, a_sub, uid("praxis-a"))
    b = await client(cfg, efa, b_sub, b_org)
    patient, purpose = uid("KVNR"), "I21.0"
    # 2. Anlegen einer Fallakte (new record, scanned consent stored in the partition)
    rec = await a.create_ecr(patient, purpose, consent(b_org), title="Hausarzt",
                             consent_document=a.document("consent", b"%PDF consent", title="Einwilligung",
                                                         mime_type="application/pdf"))
    assert rec.outcome == "created" and len(rec.document_ids) == 1
    assert rec.ecr_ref == record_key(Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file), patient, purpose)
    # 3. Anlegen einer Partition (participant by organisation) with a document
    part = await b.create_partition(rec.ecr_ref, title="Klinikaufenthalt",
                                    documents=[b.document("k1", b"Entlassbrief v1", title="Entlassbrief")])
    assert part.partition_id != rec.partition_id and len(part.document_ids) == 1
    # 5. Auflisten von Partitionen
    parts = await b.list_partitions(patient)
    assert {p.partition_id for p in parts} == {rec.partition_id, part.partition_id}
    assert all(p.ecr_ref == rec.ecr_ref and p.purpose == purpose for p in parts)
    # 6. Einstellen von Dokumenten, with relationships to existing documents
    v1 = part.document_ids[0]
    out = await b.provide(part.partition_id, [b.document("v2", b"Entlassbrief v2", title="Entlassbrief"),
                                              b.document("sig", b"signature", title="Signatur")],
                          [Relationship(source="v2", target=v1, type="RPLC"),
                           Relationship(source="sig", target=v1, type="signs")])
    v2 = out.document_ids["v2"]
    # 7. Auflisten von Dokumenten: metadata + outgoing relationships
    content = await a.list_content(part.partition_id)
    meta = {d.id: d for d in content.documents}
    assert meta[v1].status == "deprecated" and meta[v2].status == "approved"
    assert [(r.type, r.target) for r in meta[v2].relationships] == [("RPLC", v1)]
    assert {r.type for r in meta[out.document_ids["sig"]].relationships} == {"signs"}
    # 8. Abrufen von Dokumenten
    docs = await a.retrieve([v2, rec.document_ids[0]])
    assert [EfaClient.content(d) for d in docs] == [b"Entlassbrief v2", b"%PDF consent"]
    # policy provider
    assert set((await b.policy(rec.ecr_ref)).rights) == {"read", "write", "manage"}
    # 4. Schließen einer Fallakte (explicit): reason + documents go to a partition
    closed = await a.close_ecr(rec.ecr_ref, "Behandlung abgeschlossen", [a.document("c", b"Abschluss")])
    assert closed.status == "suspended" and closed.partition_id == rec.partition_id
    # suspended: only record managers (partition owners) read; nobody writes
    assert len(await a.list_partitions(patient)) == 2
    assert await codes(a.provide(rec.partition_id, [a.document("z", b"z")])) == (403, "record_not_open")
    # access log and events; no plain patient id in Redis keys or values
    log = await router.ask("efa.record", rec.ecr_ref, AccessLogQuery(limit=100))
    ops = [(e["op"], e["outcome"]) for e in log.data["entries"]]
    assert ("createECR", "ok") in ops and ("retrieveData", "ok") in ops and ("closeECR", "ok") in ops
    assert ("provideData", "record_not_open") in ops
    events = await redis_client.xrevrange("automat:outbox", count=3000)
    mine = [f for _, f in events if f[b"key"] == rec.ecr_ref.encode()]
    types = {f[b"type"].decode() for f in mine}
    assert {"record.created", "document.provided", "record.closed"} <= types
    assert all(patient.encode() not in f[b"payload"] for f in mine)
    for key in (f"automat:e:efa.record:{rec.ecr_ref}",
                f"automat:e:efa.patient:{patient_key(Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file), patient)}"):
        raw = await redis_client.hget(key, "s")
        assert raw and patient.encode() not in raw
    assert [k async for k in redis_client.scan_iter(match=f"*{patient}*", count=10000)] == []
    await a.aclose()
    await b.aclose()


# --------------------------------------------------------------------------- merge outcomes

async def test_merge_outcomes(cfg, efa):
    a = await client(cfg, efa, uid("arzt-a"), uid("praxis-a"))
    x = await client(cfg, efa, uid("arzt-x"), uid("praxis-x"))
    y = await client(cfg, efa, uid("arzt-y"), uid("praxis-y"))
    patient = uid("KVNR")
    first = await a.create_ecr(patient, "C50", consent(extend=True))
    assert first.outcome == "created"
    # refusal 1: caller already a participant
    assert await codes(a.create_ecr(patient, "C50", consent())) == (409, "already_participant")
    # refusal 3: new consent does not authorise merging
    assert await codes(x.create_ecr(patient, "C50", consent(merge=False))) == (409, "merge_not_authorised")
    # merged: new participant, extendable existing consent, merging new consent
    m = await x.create_ecr(patient, "C50", consent(merge=True), title="Onkologie",
                           consent_document=x.document("c2", b"consent 2"))
    assert m.outcome == "merged" and m.ecr_ref == first.ecr_ref and m.partition_id != first.partition_id
    assert len(await x.list_partitions(patient)) == 2
    # refusal 2: existing consent does not allow extension (another record of the patient)
    p2 = await a.create_ecr(patient, "E11", consent(extend=False))
    assert p2.ecr_ref != first.ecr_ref
    assert await codes(y.create_ecr(patient, "E11", consent(merge=True))) == (409, "consent_not_extendable")
    # ... a participant registers the patient's extended consent; then the new doctor may add a
    # partition (createECR now says: already a participant)
    await a.register_consent(p2.ecr_ref, Consent(participants=[y.me.subject], valid_until=time.time() + DAY,
                                                 may_extend=True))
    assert await codes(y.create_ecr(patient, "E11", consent(merge=True))) == (409, "already_participant")
    assert (await y.create_partition(p2.ecr_ref, title="Diabetologie")).ecr_ref == p2.ecr_ref
    # a has both records, x only the first: listPartitions shows what the caller may see
    assert {p.ecr_ref for p in await a.list_partitions(patient)} == {first.ecr_ref, p2.ecr_ref}
    assert {p.ecr_ref for p in await x.list_partitions(patient)} == {first.ecr_ref}
    for c in (a, x, y):
        await c.aclose()


async def test_non_participant_refused_list_and_retrieve(cfg, efa):
    a = await client(cfg, efa, uid("arzt-a"), uid("praxis-a"))
    n = await client(cfg, efa, uid("arzt-n"), uid("praxis-n"))
    patient = uid("KVNR")
    rec = await a.create_ecr(patient, "J45", consent())
    out = await a.provide(rec.partition_id, [a.document("d", b"secret")])
    did = out.document_ids["d"]
    assert await n.list_partitions(patient) == []
    assert await codes(n.list_content(rec.partition_id)) == (403, "not_participant")
    assert await codes(n.retrieve([did])) == (403, "not_participant")
    assert await codes(n.provide(rec.partition_id, [n.document("e", b"x")])) == (403, "not_participant")
    assert await codes(n.close_ecr(rec.ecr_ref, "weg")) == (403, "not_participant")
    assert (await n.policy(rec.ecr_ref)).rights == []
    await a.aclose()
    await n.aclose()


# --------------------------------------------------------------------------- bad input

async def test_bad_tokens(cfg, efa):
    a = await client(cfg, efa, uid("arzt-a"), uid("praxis-a"))
    patient = uid("KVNR")
    good = a.context_id
    head, body, sig = good.split(".")
    # forged: claims changed, signature kept
    from protocols.efa import assertion

    claims = assertion.unverified_claims(good).model_copy(update={"sub": "someone-else"})
    forged = f"{head}.{assertion._b64e(claims.model_dump_json().encode())}.{sig}"
    # foreign-signed: a different identity provider's key
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    foreign = IdentityProvider(Ed25519PrivateKey.generate(), "automat-efa-idp", 3600).sign_claims(
        "arzt-a", "praxis-a", "arzt", time.time(), 3600)
    # expired: signed by the real provider, validity over
    from actors.efa.identity import load_or_create_signing_key, signing_key_path

    idp = IdentityProvider(load_or_create_signing_key(signing_key_path(cfg)), "automat-efa-idp", 3600)
    expired = idp.sign_claims("arzt-a", "praxis-a", "arzt", time.time() - 7200, 3600)
    for token, code in ((forged, "bad_signature"), (foreign, "untrusted_issuer"), (expired, "expired"),
                        ("nonsense", "malformed_token"), (None, "missing_token")):
        c = EfaClient(efa, context_id=token)
        assert await codes(c.create_ecr(patient, "Z00", consent())) == (401, code), code
        await c.aclose()
    # wrong credential
    bad = Credential(subject="x", organisation="y", role="arzt", secret="guess")
    assert await codes(EfaClient(efa).open_context(bad)) == (401, "bad_credential")
    # revoked: closeContext, then the same token is refused
    await a.close_context()
    assert await codes(a.create_ecr(patient, "Z00", consent())) == (401, "revoked")
    await a.aclose()


async def test_bad_input_stores_nothing_half(cfg, efa, router):
    from actors.efa.service import BLOB_KIND
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing

    blobs = BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file))

    def efa_refs() -> set[str]:  # the blob dir is shared with other capabilities (KIM claim checks, ...)
        return {r for r in blobs.refs() if r.startswith(f"{BLOB_KIND}/")}

    before = efa_refs()
    a = await client(cfg, efa, uid("arzt-a"), uid("praxis-a"))
    patient = uid("KVNR")
    rec = await a.create_ecr(patient, "K35", consent())
    ok = await a.provide(rec.partition_id, [a.document("d", b"v1")])
    # unknown partition (well-formed id of an existing record; and garbage)
    assert await codes(a.provide(rec.ecr_ref + ".p99", [a.document("d", b"x")])) == (404, "unknown_partition")
    assert await codes(a.list_content(rec.ecr_ref + ".p99")) == (404, "unknown_partition")
    assert await codes(a.provide("nope", [a.document("d", b"x")])) == (422, "invalid_input")
    # relationship to a missing document: refused, the first document of the submission not stored
    assert await codes(a.provide(rec.partition_id, [a.document("n1", b"new"), a.document("n2", b"new2")],
                                 [Relationship(source="n2", target=rec.ecr_ref + ".d999", type="APND")])) \
        == (422, "relationship_target_missing")
    # oversized document (limit 10 MiB): 413, nothing stored
    big = base64.b64encode(b"\0" * (10 * 1024 * 1024 + 1)).decode()
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(f"{efa}/partitions/{rec.partition_id}/documents",
                         headers={"Authorization": f"Bearer {a.context_id}"},
                         json={"documents": [{"local_id": "ok", "content_b64": "aGk="},
                                             {"local_id": "big", "content_b64": big}]})
    assert r.status_code == 413 and r.json()["error"] == "document_too_large"
    # invalid JSON body -> 422 invalid_input
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(f"{efa}/records", headers={"Authorization": f"Bearer {a.context_id}"}, json={"x": 1})
    assert r.status_code == 422 and r.json()["error"] == "invalid_input"
    # the registry still holds only the one document; the repository only its blob (+ nothing else of ours)
    content = await a.list_content(rec.partition_id)
    assert [d.id for d in content.documents] == list(ok.document_ids.values())
    assert len(efa_refs() - before) == 1
    await a.aclose()


# --------------------------------------------------------------------------- concurrency

async def test_fifty_concurrent_creators_one_record(cfg, efa, router):
    patient, purpose = uid("KVNR"), "M54.5"
    clients = [await client(cfg, efa, uid(f"arzt{i}"), uid(f"org{i}")) for i in range(50)]
    results = await asyncio.gather(*[c.create_ecr(patient, purpose, consent(), title=f"t{i}")
                                     for i, c in enumerate(clients)])
    assert sorted(r.outcome for r in results).count("created") == 1
    assert len({r.ecr_ref for r in results}) == 1
    assert len({r.partition_id for r in results}) == 50
    st = await router.ask("efa.record", results[0].ecr_ref, RecordStatusQuery())
    assert st.data["partitions"] == 50 and st.data["participants"] == 50
    parts = await clients[7].list_partitions(patient)
    assert sorted(p.partition_id for p in parts) == sorted(r.partition_id for r in results)
    for c in clients:
        await c.aclose()


# --------------------------------------------------------------------------- consent expiry / lifecycle

async def test_consent_expiry_drives_the_lifecycle(cfg, efa, router, redis_client):
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing

    a = await client(cfg, efa, uid("arzt-a"), uid("praxis-a"))
    patient = uid("KVNR")
    rec = await a.create_ecr(patient, "S72", Consent(participants=[], valid_until=time.time() + 5, may_extend=True))
    out = await a.provide(rec.partition_id, [a.document("d", b"befund")])
    ref_doc = out.document_ids["d"]
    blobs = BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file))
    raw = await redis_client.hget(f"automat:e:efa.record:{rec.ecr_ref}", "s")
    state = RecordState.model_validate_json(blobs.keyring.decrypt(raw, f"efa.record:{rec.ecr_ref}".encode()))
    blob_ref = state.documents[ref_doc].blob_ref
    assert blobs.exists(blob_ref) and blobs.get(blob_ref) == b"befund"  # encrypted at rest, readable

    async def status_after(offset: float, want: str) -> dict:
        efa_support.set_offset(cfg, offset)
        deadline = time.monotonic() + 15
        while True:
            st = (await router.ask("efa.record", rec.ecr_ref, RecordStatusQuery())).data
            if st["status"] == want or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.2)

    try:
        st = await status_after(10, "suspended")  # consent validity passed (durable timer)
        assert st["status"] == "suspended" and st["close_reason"] == "consent_expired"
        assert len(await a.retrieve([ref_doc])) == 1  # record manager, grace period
        st = await status_after(10 + efa_support.GRACE_S + 1, "retired")
        assert st["status"] == "retired"
        assert await codes(a.retrieve([ref_doc])) == (403, "record_not_open")
        st = await status_after(10 + 2 * efa_support.GRACE_S + 2, "archived")
        assert st["status"] == "archived" and st["partitions"] == 1 and st["documents"] == 1
    finally:
        efa_support.set_offset(cfg, 0.0)
    log = await router.ask("efa.record", rec.ecr_ref, AccessLogQuery(limit=100))
    assert log.data["entries"]  # access log kept
    # content deleted from the repository (by the janitor, after the commit)
    for _ in range(50):
        if not blobs.exists(blob_ref):
            break
        await asyncio.sleep(0.1)
    assert not blobs.exists(blob_ref)
    assert await codes(a.list_content(rec.partition_id)) == (403, "record_not_open")
    await a.aclose()


async def test_demo_and_openapi(cfg, efa, router):
    from rich.console import Console

    from actors.efa.app import demo, supervisor_spec

    console = Console(record=True, width=200)
    await demo(cfg, router, console, base_url=efa)
    text = console.export_text()
    assert "createECR (arzt-a): created" in text and "['Arztbrief']" in text
    async with httpx.AsyncClient() as h:
        spec = (await h.get(f"{efa}/openapi.json")).json()
    assert {"/records", "/partitions/query", "/partitions/{partition_id}/documents", "/documents/retrieve",
            "/context"} <= set(spec["paths"])
    assert {c.name for c in supervisor_spec(cfg).children} >= {"efa.record.host.0", "efa.patient.host.0"}
