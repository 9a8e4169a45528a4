"""MOPED over HTTP: Ray Serve ingress → router → Composition entity on shard hosts → Redis."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from actors.moped.app import composition_kind, serve_app
from actors.moped.stay import KH, LGF, SV, admit, document, post, run_stay, vid_of, workflow_of
from actors.runtime.router import register_kinds
from actors.runtime.store import OUTBOX_STREAM
from actors.runtime.system import start_hosts
from protocols.moped import codes
from protocols.moped import samples as S
from protocols.moped.fhirio import validate_resource

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def base(cfg, stack, ray_session, serve_session):
    import redis.asyncio as aioredis
    from ray import serve

    kind = composition_kind(cfg)
    r = aioredis.from_url(cfg.redis.url)
    await register_kinds(r, [kind])
    await r.aclose()
    await asyncio.to_thread(start_hosts, cfg, kind)
    await asyncio.to_thread(serve_app, cfg)
    yield serve_session + "/moped"
    serve.delete("moped")


@pytest.fixture
async def client(base):
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        yield c


def issues_of(resp) -> list[dict]:
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert validate_resource(body, "OperationOutcome") == []
    return body["issue"]


def rules_of(resp) -> set[str]:
    return {i["details"]["coding"][0]["code"] for i in issues_of(resp) if i.get("details", {}).get("coding")}


async def current_vid(client, case_id: str) -> int:
    r = await client.get(f"/Composition/{case_id}", headers=KH)
    assert r.status_code == 200, r.text
    return vid_of(r)


async def test_full_stay_versions_and_provenance_chain(client, redis_client, cfg):
    case_id, vids = await run_stay(client)
    assert vids == [1, 2, 3, 4, 5, 6, 7]

    h = await client.get(f"/Composition/{case_id}/_history", headers=KH)
    assert h.status_code == 200
    hist = h.json()
    assert validate_resource(hist, "Bundle") == []
    assert hist["type"] == "history" and hist["total"] == 7
    comps = [e["resource"] for e in hist["entry"]]
    assert [c["meta"]["versionId"] for c in comps] == ["7", "6", "5", "4", "3", "2", "1"]
    assert [workflow_of(c) for c in reversed(comps)] == [
        codes.WF_ADMITTED, codes.WF_ADMITTED, codes.WF_ADMITTED, codes.WF_SV_DONE, codes.WF_DISCHARGED,
        codes.WF_REPORTED, codes.WF_FINAL_RELEASE]
    assert comps[0]["status"] == "final" and comps[1]["status"] == "preliminary"

    v3 = await client.get(f"/Composition/{case_id}/_history/3", headers=SV)
    assert v3.status_code == 200 and v3.json()["meta"]["versionId"] == "3"
    assert (await client.get(f"/Composition/{case_id}/_history/9", headers=SV)).status_code == 404

    p = await client.get("/Provenance", params={"target": f"Composition/{case_id}"}, headers=LGF)
    assert p.status_code == 200
    bundle = p.json()
    assert bundle["type"] == "searchset" and bundle["total"] == 7
    provs = list(reversed([e["resource"] for e in bundle["entry"]]))
    ops = ["aufnehmen", "update", "anfragen", "antworten", "entlassen", "abrechnen", "entscheiden"]
    who = ["KHK999"] * 3 + ["SV11"] + ["KHK999"] * 2 + ["LGF9"]
    for n, (prov, op, org) in enumerate(zip(provs, ops, who), start=1):
        assert validate_resource(prov, "Provenance") == []
        assert prov["target"] == [{"reference": f"Composition/{case_id}/_history/{n}"}]
        assert prov["activity"]["coding"][0]["code"] == op
        assert prov["agent"][0]["onBehalfOf"]["reference"] == f"Organization/{org}"
        assert prov["agent"][0]["who"]["reference"].startswith("Device/")
        assert prov["recorded"]
        if n > 1:
            assert prov["entity"][0]["what"]["reference"] == f"Composition/{case_id}/_history/{n - 1}"
    one = await client.get("/Provenance", params={"target": f"Composition/{case_id}/_history/5"}, headers=KH)
    assert [e["resource"]["activity"]["coding"][0]["code"] for e in one.json()["entry"]] == ["entlassen"]

    # sealed: no more changes (Siegel), and nothing was written
    r = await client.post(f"/Composition/{case_id}/_history/7/$update",
                          json=S.params("update", (S.urn(), S.procedure("ZZ999"))), headers=KH)
    assert r.status_code == 422 and "MopedSiegelComposition.final" in rules_of(r)
    assert await current_vid(client, case_id) == 7

    # the operator's view: automat moped show
    from typer.testing import CliRunner

    from deploy.cli import app as cli_app

    res = await asyncio.to_thread(CliRunner().invoke, cli_app, ["moped", "show", case_id, "--json"],
                                  env={"AUTOMAT_RUN_DIR": str(cfg.run_dir)})
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert [r["activity"] for r in shown["versions"]] == [f"${o}" for o in ops]
    assert shown["versions"][-1]["target"] == f"Composition/{case_id}/_history/7" and shown["sealed"] is True
    assert "Muster" not in res.output

    # one boundary event per version (outbox -> Kafka), without personal data
    raw = await redis_client.xrevrange(OUTBOX_STREAM, count=5000)
    mine = [f for _, f in raw if f.get(b"key") == case_id.encode() and f.get(b"topic") == b"moped.composition"]
    assert sorted(json.loads(f[b"payload"])["data"]["vid"] for f in mine) == vids
    assert not any(b"Erika" in f[b"payload"] or b"Muster" in f[b"payload"] for f in mine)
    # state at rest is encrypted: no patient name in Redis
    async for k in redis_client.scan_iter(match=f"*{case_id}*", count=1000):
        if (await redis_client.type(k)) == b"string":
            assert b"Muster" not in await redis_client.get(k)


async def test_conflict_two_clients_on_version_4(client):
    case_id, v = await admit(client)
    for code in ("AA1", "AA2", "AA3"):
        v = vid_of(await post(client, case_id, v, "update", S.params("update", (S.urn(), S.procedure(code)))))
    assert v == 4
    # KH and SV both hold version 4; KH writes version 5
    r_kh = await post(client, case_id, 4, "update", S.params("update", (S.urn(), S.procedure("KH5"))))
    assert vid_of(r_kh) == 5
    # SV's write on version 4 is refused
    r_sv = await client.post(f"/Composition/{case_id}/_history/4/$update",
                             json=S.params("update", (S.urn(), S.coverage("SV11"))), headers=SV)
    assert r_sv.status_code == 409
    iss = issues_of(r_sv)
    assert iss[0]["code"] == "conflict" and "version 4 is not current" in iss[0]["diagnostics"]
    assert r_sv.headers["etag"] == 'W/"5"'
    # ... re-reads and succeeds on version 5
    v_now = await current_vid(client, case_id)
    assert v_now == 5
    r2 = await post(client, case_id, v_now, "update", S.params("update", (S.urn(), S.coverage("SV11"))), headers=SV)
    assert vid_of(r2) == 6
    doc = await document(client, case_id)
    assert len(doc["Coverage"]) == 1 and len(doc["Procedure"]) == 4


async def test_stale_version_answers_412_when_configured(base, cfg):
    from ray import serve

    from actors.moped.config import MopedConfig
    from actors.moped.http import deployment

    await asyncio.to_thread(serve.run, deployment(cfg, MopedConfig(conflict_status=412)), name="moped412",
                            route_prefix="/moped412")
    try:
        async with httpx.AsyncClient(base_url=base + "412", timeout=60) as c:
            case_id, v = await admit(c)
            await post(c, case_id, v, "update", S.params("update", (S.urn(), S.procedure())))
            r = await c.post(f"/Composition/{case_id}/_history/{v}/$update", headers=KH,
                             json=S.params("update", (S.urn(), S.procedure())))
            assert r.status_code == 412 and issues_of(r)[0]["code"] == "conflict"
    finally:
        await asyncio.to_thread(serve.delete, "moped412")


async def test_specialised_rules_refused_with_precise_outcome(client):
    case_id, v = await admit(client)
    # billing before discharge
    r = await client.post(f"/Composition/{case_id}/_history/{v}/$abrechnen",
                          json=S.params("abrechnen", (S.urn(), S.claim("claim"))), headers=KH)
    assert r.status_code == 422
    by_rule = {i["details"]["coding"][0]["code"]: i for i in issues_of(r)}
    assert by_rule["MopedAbrechnungComposition.discharged"]["expression"] == ["Encounter.actualPeriod.end"]
    assert "MopedAbrechnungComposition.procedures" in by_rule
    # discharge without main diagnosis
    doc = await document(client, case_id)
    stay = next(e for e in doc["Encounter"] if "type" not in e)
    stay["actualPeriod"]["end"] = "2026-01-15T10:00:00+01:00"
    r = await client.post(f"/Composition/{case_id}/_history/{v}/$entlassen",
                          json=S.params("entlassen", (None, stay)), headers=KH)
    assert r.status_code == 422
    assert rules_of(r) == {"MopedEntlassungVollstaendigComposition.main-diagnosis"}
    assert issues_of(r)[0]["expression"] == ["Condition.extension:Diagnosetyp"]
    # overlapping department stays
    r = await client.post(f"/Composition/{case_id}/_history/{v}/$update", headers=KH, json=S.params(
        "update", (S.urn(), S.transfer("KAK999ABT2", "2026-01-11T08:00:00+01:00", "2026-01-12T08:00:00+01:00"))))
    assert r.status_code == 200
    v = vid_of(r)
    # an answer without an inquiry, by the SV
    r = await client.post(f"/Composition/{case_id}/_history/{v}/$antworten", headers=SV,
                          json=S.params("antworten", (None, S.claim_response("Claim/nope"))))
    assert r.status_code == 422
    assert rules_of(r) >= {"MopedAntwortComposition.anfrage", "reference.client-side"}
    # a role that may not call the operation
    r = await client.post(f"/Composition/{case_id}/_history/{v}/$abrechnen", headers=SV,
                          json=S.params("abrechnen", (S.urn(), S.claim("claim"))))
    assert r.status_code == 403
    assert await current_vid(client, case_id) == v  # nothing written by any refusal


async def test_client_supplied_server_side_references_never_stored(client):
    body = S.admission()
    entries = body["parameter"][0]["resource"]["entry"]
    for e in entries:
        res = e["resource"]
        if res["resourceType"] in ("Encounter", "Condition"):
            res["subject"] = {"reference": "Patient/evil-subject"}
        if res["resourceType"] == "Patient":
            res["managingOrganization"] = {"reference": "Organization/evil-custodian"}
    case_id, v = await admit(client, body)
    r = await post(client, case_id, v, "update", S.params("update", (S.urn(), dict(
        S.procedure("AB1"), subject={"reference": "Patient/evil-subject"},
        encounter={"reference": "Encounter/evil-encounter"}))))
    notes = [i for i in issues_of(r) if i["severity"] == "information" and "reference.server-side" in i["diagnostics"]]
    assert {n["expression"][0] for n in notes} == {"Procedure.subject", "Procedure.encounter"}
    doc_resp = await client.get(f"/Composition/{case_id}/$document", headers=KH)
    assert "evil" not in doc_resp.text
    doc = await document(client, case_id)
    comp = doc["Composition"][0]
    patient_ref = f"Patient/{doc['Patient'][0]['id']}"
    assert comp["subject"] == [{"reference": patient_ref}]
    assert comp["author"] == [{"reference": "Organization/KHK999"}]
    assert comp["custodian"]["reference"] == "Organization/moped-server"
    for rt in ("Encounter", "Condition", "Procedure"):
        for res in doc[rt]:
            assert res["subject"] == {"reference": patient_ref}


async def test_bad_input_4xx_with_outcome_and_nothing_written(client):
    case_id, v = await admit(client)
    url = f"/Composition/{case_id}/_history/{v}"
    cases = [
        (f"{url}/$update", b"{not json", 400, "json"),
        (f"{url}/$update", json.dumps(S.params("update", (None, {"resourceType": "Procedure", "status": "done!",
                                                                 "code": "AA010"}))).encode(), 400, "fhir-r5"),
        (f"{url}/$update", json.dumps(S.params("update", (None, {"resourceType": "Composition", "status": "final"}))
                                      ).encode(), 422, "bundle-content.update"),
        (f"{url}/$update", json.dumps({"resourceType": "Patient"}).encode(), 400, "operation-parameters"),
        (f"{url}/$stornieren", json.dumps(S.params("update", (None, S.procedure()))).encode(), 400, "operation"),
        (f"/Composition/{case_id}/$update", json.dumps(S.params("update", (None, S.procedure()))).encode(), 400,
         "version"),
        (f"{url}/$update", b'{"resourceType":"Parameters","x":"' + b"a" * 3_000_000 + b'"}', 413, "body-size"),
        (f"{url}/$update", json.dumps(S.params("update", (None, dict(S.procedure(), partOf=[
            {"reference": "Procedure/unknown"}])))).encode(), 422, "reference.client-side"),
    ]
    for path, body, status, rule in cases:
        r = await client.post(path, content=body, headers=KH | {"content-type": "application/fhir+json"})
        assert r.status_code == status, (path, r.status_code, r.text[:500])
        assert rule in rules_of(r), (path, r.text[:500])
    r = await client.post(f"{url}/$update", json=S.params("update", (None, S.procedure())))
    assert r.status_code == 401 and issues_of(r)
    r = await client.post("/$aufnehmen", json=S.params("aufnehmen", (S.urn(), S.patient())), headers=KH)
    assert r.status_code == 422
    assert {"MopedAufnahmeComposition.encounter", "MopedAufnahmeComposition.transfer"} <= rules_of(r)
    assert await current_vid(client, case_id) == v
    assert (await client.get("/Composition/00000000-0000-4000-8000-000000000000", headers=KH)).status_code == 404
    meta = await client.get("/metadata")
    assert meta.status_code == 200 and validate_resource(meta.json(), "CapabilityStatement") == []


async def test_twenty_concurrent_writers_no_lost_update(client):
    case_id, _ = await admit(client)
    conflicts = 0

    async def writer(n: int) -> None:
        nonlocal conflicts
        while True:
            v = await current_vid(client, case_id)
            r = await client.post(f"/Composition/{case_id}/_history/{v}/$update", headers=KH,
                                  json=S.params("update", (S.urn(), S.procedure(f"W{n:02d}"))))
            if r.status_code == 200:
                return
            assert r.status_code == 409, r.text
            conflicts += 1

    await asyncio.gather(*[writer(n) for n in range(20)])
    assert await current_vid(client, case_id) == 21
    doc = await document(client, case_id)
    codes_seen = sorted(p["code"]["coding"][0]["code"] for p in doc["Procedure"])
    assert codes_seen == [f"W{n:02d}" for n in range(20)]
    assert conflicts > 0
