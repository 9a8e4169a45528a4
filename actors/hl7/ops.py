"""Operator functions behind ``automat hl7 ...`` (usable from tests with any Router)."""

from __future__ import annotations

import base64
import json
import time

from actors.hl7.keys import CASE, PATIENT, PENDING, case_key, patient_key
from actors.hl7.listener import BLOB_KIND, LOG_STREAM
from actors.hl7.messages import (
    CaseView,
    GetCase,
    GetPatient,
    GetPending,
    PatientView,
    PendingEntry,
    TakeOver,
    TakeResult,
)
from actors.hl7.settings import Hl7Settings


async def pending(router, units: list[str]) -> list[tuple[str, PendingEntry]]:
    out = []
    for bu in units:
        lst = await router.ask(PENDING, bu, GetPending())
        out.extend((bu, e) for e in lst.entries)
    return out


async def take(router, units: list[str], ident: str) -> TakeResult:
    """``ident``: a patient key (or a unique prefix of one) from the pending list."""
    matches = [e.patient_key for _, e in await pending(router, units) if e.patient_key.startswith(ident)]
    if not matches and len(ident) == 33 and ident.startswith("p"):
        matches = [ident]
    if not matches:
        return TakeResult(ok=False, reason=f"no pending patient {ident!r}")
    if len(set(matches)) > 1:
        return TakeResult(ok=False, reason=f"{ident!r} is ambiguous ({len(matches)} pending patients)")
    return await router.ask(PATIENT, matches[0], TakeOver(at=time.time()))


async def search(router, pseud, settings: Hl7Settings, number: str) -> dict:
    """Patients whose patient number, and cases whose case/order number, is ``number``
    (in every billing unit of every interface)."""
    patients: list[PatientView] = []
    cases: list[CaseView] = []
    seen_c: set[str] = set()
    for bu in settings.billing_units():
        pv = await router.ask(PATIENT, patient_key(pseud, bu, number), GetPatient())
        if pv.exists:
            patients.append(pv)
        for dk in (f"{bu}/{number}", number):
            ck = case_key(pseud, dk)
            if ck in seen_c:
                continue
            seen_c.add(ck)
            cv = await router.ask(CASE, ck, GetCase())
            if cv.exists:
                cases.append(cv)
    return {"patients": patients, "cases": cases}


async def messages(redis, limit: int = 50, errors_only: bool = False) -> list[dict]:
    rows = await redis.xrevrange(LOG_STREAM, count=limit * (5 if errors_only else 1))
    out = []
    for sid, f in rows:
        d = {k.decode(): v.decode() for k, v in f.items()}
        d["id"] = sid.decode()
        if errors_only and d.get("ack") in ("AA", "CA", ""):
            continue
        out.append(d)
    return out[:limit]


def show(blobs, ref: str) -> dict:
    if not ref.startswith(BLOB_KIND + "/"):
        raise ValueError(f"not an HL7 message ref: {ref!r}")
    rec = json.loads(blobs.get(ref))
    rec["raw"] = base64.b64decode(rec["raw"]).decode("latin-1")
    return rec
