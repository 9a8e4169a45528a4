"""A whole inpatient stay as MOPED clients would drive it over HTTP (demo, bench, tests).

KH admits, updates, asks the SV for the insurance declaration, SV answers, KH discharges
and bills, LGF decides. Each step posts against the version it last read.
"""

from __future__ import annotations

from typing import Any

from protocols.moped import samples as S
from protocols.moped.refs import is_transfer

KH = {"Authorization": "Bearer dev-kh"}
SV = {"Authorization": "Bearer dev-sv"}
LGF = {"Authorization": "Bearer dev-lgf"}


class StayError(Exception):
    pass


def vid_of(resp) -> int:
    etag = resp.headers.get("etag", "")
    return int(etag.strip('W/"'))


def case_of(resp) -> str:
    return resp.headers["location"].split("/Composition/", 1)[1].split("/", 1)[0]


async def document(client, case_id: str, headers=KH) -> dict[str, list[dict]]:
    r = await client.get(f"/Composition/{case_id}/$document", headers=headers)
    if r.status_code != 200:
        raise StayError(f"$document: {r.status_code} {r.text[:300]}")
    out: dict[str, list[dict]] = {}
    for e in r.json()["entry"]:
        res = e["resource"]
        out.setdefault(res["resourceType"], []).append(res)
    return out


async def post(client, case_id: str, vid: int, op: str, body: dict, headers=KH, expect: int = 200):
    r = await client.post(f"/Composition/{case_id}/_history/{vid}/${op}", json=body, headers=headers)
    if r.status_code != expect:
        raise StayError(f"${op} on v{vid}: {r.status_code} {r.text[:600]}")
    return r


async def admit(client, body: dict | None = None) -> tuple[str, int]:
    r = await client.post("/$aufnehmen", json=body or S.admission(), headers=KH)
    if r.status_code != 201:
        raise StayError(f"$aufnehmen: {r.status_code} {r.text[:600]}")
    return case_of(r), vid_of(r)


async def run_stay(client) -> tuple[str, list[int]]:
    """admit → update → inquire → answer → discharge → bill → decide; returns (case, vids)."""
    case_id, v = await admit(client)
    vids = [v]
    # KH: the main diagnosis and a procedure
    r = await post(client, case_id, v, "update",
                   S.params("update", (S.urn(), S.condition("I21.0", main=True)), (S.urn(), S.procedure("AA010"))))
    v = vid_of(r); vids.append(v)
    # KH: insurance inquiry (VAE) with the coverage naming the insurer
    r = await post(client, case_id, v, "anfragen",
                   S.params("anfragen", (S.urn(), S.coverage()), (S.urn(), S.claim("preauthorization"))))
    v = vid_of(r); vids.append(v)
    # SV: answers the inquiry (reads the case to reference the request)
    doc = await document(client, case_id, SV)
    vae = next(c for c in doc["Claim"] if c["use"] == "preauthorization")
    r = await post(client, case_id, v, "antworten",
                   S.params("antworten", (None, S.claim_response(f"Claim/{vae['id']}", "complete", "preauthorization"))),
                   headers=SV)
    v = vid_of(r); vids.append(v)
    # KH: discharge (the stay and the last department get their end)
    doc = await document(client, case_id)
    stay = next(e for e in doc["Encounter"] if not is_transfer(e))
    last = max((e for e in doc["Encounter"] if is_transfer(e)), key=lambda e: e["actualPeriod"]["start"])
    stay["actualPeriod"]["end"] = "2026-01-15T10:00:00+01:00"
    stay["status"] = "completed"
    last["actualPeriod"]["end"] = "2026-01-15T10:00:00+01:00"
    last["status"] = "completed"
    r = await post(client, case_id, v, "entlassen", S.params("entlassen", (None, stay), (None, last)))
    v = vid_of(r); vids.append(v)
    # KH: billing (LKF request referencing the recorded procedures and diagnoses)
    procs = [f"Procedure/{p['id']}" for p in doc["Procedure"]]
    diags = [f"Condition/{c['id']}" for c in doc["Condition"]]
    r = await post(client, case_id, v, "abrechnen", S.params("abrechnen", (S.urn(), S.claim("claim", procs, diags))))
    v = vid_of(r); vids.append(v)
    # LGF: decides on the LKF request
    doc = await document(client, case_id, LGF)
    lkf = next(c for c in doc["Claim"] if c["use"] == "claim")
    r = await post(client, case_id, v, "entscheiden",
                   S.params("entscheiden", (None, S.claim_response(f"Claim/{lkf['id']}", "complete"))), headers=LGF)
    v = vid_of(r); vids.append(v)
    return case_id, vids


def workflow_of(comp: dict[str, Any]) -> str:
    return comp["useContext"][0]["valueCodeableConcept"]["coding"][0]["code"]
