"""The MOPED bridge: HL7 case changes become MOPED operations (a message, not an import).

``hl7.bridge`` is one entity per case (same pseudonymous key as ``hl7.case``). It gets
:class:`~actors.hl7.messages.BridgeOp` messages from the case, in order, and calls the
MOPED FHIR API over HTTP (httpx, a port built once per host):

==============  ===============================================================
op              HTTP
==============  ===============================================================
aufnehmen       ``POST {moped}/$aufnehmen`` (type level) -> Composition id + version
update          ``POST {moped}/Composition/{id}/_history/{vid}/$update``
entlassen       ``POST {moped}/Composition/{id}/_history/{vid}/$entlassen``
abrechnen       ``POST {moped}/Composition/{id}/_history/{vid}/$abrechnen``
==============  ===============================================================

Each body is a FHIR ``Parameters`` with one ``bundle`` parameter (a collection Bundle
with Patient, Encounter, Conditions and, for ``$abrechnen``, a Claim with the FT1
services). MOPED's optimistic version control answers a stale ``{vid}`` with 409 (or
412): the bridge re-reads ``GET {moped}/Composition/{id}`` and retries with the current
version. The entity remembers the composition id/version and the last case change
sent (``seq``), so a re-delivered operation is not sent twice.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

from actors.hl7.keys import BRIDGE
from actors.hl7.messages import BridgeOp, BridgeView, GetBridge
from actors.runtime.entity import Entity, handles

log = logging.getLogger("automat.hl7.bridge")

MAX_CONFLICT_RETRIES = 5


class BridgeError(Exception):
    pass


class BridgeState(BaseModel):
    composition_id: str | None = None
    version: str | None = None
    done: list[str] = Field(default_factory=list)
    conflicts: int = 0
    last_seq: int = 0


def _d(v) -> str | None:
    return v.isoformat() if v is not None else None


def fhir_bundle(op: BridgeOp) -> dict[str, Any]:
    """The Bundle for one operation (FHIR R5 shapes, only what the HL7 data gives)."""
    c, p = op.case, op.person
    pat_id, enc_id = "patient", "encounter"
    patient: dict[str, Any] = {
        "resourceType": "Patient", "id": pat_id,
        "identifier": [{"type": {"coding": [{"code": "PI"}]}, "value": c.patient_number}],
    }
    if p.family or p.given:
        patient["name"] = [{"family": p.family, "given": [p.given] if p.given else []}]
    if p.birth_date:
        patient["birthDate"] = p.birth_date.isoformat()
    if p.sex:
        patient["gender"] = {"M": "male", "F": "female", "D": "other", "X": "other"}.get(p.sex.upper(), "unknown")
    encounter: dict[str, Any] = {
        "resourceType": "Encounter", "id": enc_id,
        "identifier": [{"type": {"coding": [{"code": "VN"}]}, "value": c.case_number}],
        "status": {"discharged": "completed", "cancelled": "cancelled"}.get(c.status, "in-progress"),
        "class": [{"coding": [{"code": {"I": "IMP", "O": "AMB", "E": "EMER"}.get(c.patient_class or "", "IMP")}]}],
        "subject": {"reference": f"Patient/{pat_id}"},
        "actualPeriod": {k: v for k, v in (("start", _d(c.admit_at)), ("end", _d(c.discharge_at))) if v},
    }
    locations = []
    for m in c.movements:
        if m.point_of_care or m.facility:
            locations.append({"location": {"display": "/".join(x for x in (m.point_of_care, m.facility) if x)},
                              **({"period": {"start": m.at.isoformat()}} if m.at else {})})
    if locations:
        encounter["location"] = locations
    entries = [{"resource": patient}, {"resource": encounter}]
    for i, d in enumerate(c.diagnoses):
        entries.append({"resource": {
            "resourceType": "Condition", "id": f"dx{i + 1}",
            "code": {"coding": [{"system": d.coding_system or "ICD-10-GM", "code": d.code, "display": d.text}]},
            "subject": {"reference": f"Patient/{pat_id}"}, "encounter": {"reference": f"Encounter/{enc_id}"},
            "category": [{"coding": [{"code": "discharge-diagnosis" if d.diagnosis_type else "diagnosis"}]}],
        }})
    if op.op == "abrechnen":
        entries.append({"resource": {
            "resourceType": "Claim", "id": "claim", "status": "active", "use": "claim",
            "patient": {"reference": f"Patient/{pat_id}"},
            "diagnosis": [{"sequence": i + 1, "diagnosisReference": {"reference": f"Condition/dx{i + 1}"}}
                          for i in range(len(c.diagnoses))],
            "item": [{"sequence": i + 1,
                      "productOrService": {"coding": [{"system": s.coding_system, "code": s.code, "display": s.text}]},
                      **({"servicedDate": s.service_date.date().isoformat()} if s.service_date else {}),
                      **({"quantity": {"value": float(s.quantity)}} if s.quantity else {})}
                     for i, s in enumerate(c.services)],
        }})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def fhir_parameters(op: BridgeOp) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "bundle", "resource": fhir_bundle(op)}]}


def _version_of(resp) -> tuple[str | None, str | None]:
    """(composition id, version id) from a MOPED answer: Location/Content-Location
    ``Composition/{id}/_history/{vid}``, or a Composition / Parameters body."""
    for h in ("content-location", "location"):
        loc = resp.headers.get(h)
        if loc and "Composition/" in loc:
            parts = loc.split("Composition/", 1)[1].split("/")
            cid = parts[0]
            vid = parts[2] if len(parts) >= 3 and parts[1] == "_history" else None
            if cid:
                return cid, vid
    try:
        body = resp.json()
    except Exception:
        return None, None
    return _version_in(body)


def _version_in(body: Any) -> tuple[str | None, str | None]:
    if not isinstance(body, dict):
        return None, None
    if body.get("resourceType") == "Composition":
        return body.get("id"), (body.get("meta") or {}).get("versionId")
    if body.get("resourceType") == "Parameters":
        for prm in body.get("parameter", []):
            cid, vid = _version_in(prm.get("resource"))
            if cid:
                return cid, vid
    if body.get("resourceType") == "Bundle":
        for e in body.get("entry", []):
            cid, vid = _version_in(e.get("resource"))
            if cid:
                return cid, vid
    for k in ("composition", "Composition"):
        if isinstance(body.get(k), dict):
            return _version_in(body[k])
    if isinstance(body.get("id"), str) and ("versionId" in body or "version" in body):
        return body["id"], str(body.get("versionId") or body.get("version"))
    return None, None


class BridgeEntity(Entity[BridgeState]):
    kind = BRIDGE
    State = BridgeState
    personal_data = False  # ids and versions only

    @handles(readonly=True)
    def on_get(self, msg: GetBridge) -> BridgeView:
        return BridgeView(**self.state.model_dump())

    @handles
    async def on_op(self, msg: BridgeOp) -> BridgeView:
        s = self.state
        if msg.seq <= s.last_seq:  # re-delivery
            return BridgeView(**s.model_dump())
        http = self.ctx.ports.http
        base = msg.moped_url.rstrip("/")
        if s.composition_id is None:
            if msg.op != "aufnehmen":  # the admission never reached MOPED: send it first
                await self._aufnehmen(http, base, msg.model_copy(update={"op": "aufnehmen"}))
            else:
                await self._aufnehmen(http, base, msg)
                s.last_seq = msg.seq
                return BridgeView(**s.model_dump())
        if msg.op != "aufnehmen":
            await self._instance_op(http, base, msg)
        s.last_seq = msg.seq
        return BridgeView(**s.model_dump())

    async def _aufnehmen(self, http, base: str, msg: BridgeOp) -> None:
        r = await http.post(f"{base}/$aufnehmen", json=fhir_parameters(msg))
        if r.status_code >= 300:
            raise BridgeError(f"$aufnehmen: HTTP {r.status_code}: {r.text[:300]}")
        cid, vid = _version_of(r)
        if not cid:
            raise BridgeError("$aufnehmen: the answer names no Composition")
        if vid is None:
            vid = await self._reread(http, base, cid)
        self.state.composition_id, self.state.version = cid, vid
        self.state.done.append("aufnehmen")

    async def _reread(self, http, base: str, cid: str) -> str:
        r = await http.get(f"{base}/Composition/{cid}")
        if r.status_code != 200:
            raise BridgeError(f"GET Composition/{cid}: HTTP {r.status_code}")
        _, vid = _version_in(r.json())
        if vid is None:
            raise BridgeError(f"GET Composition/{cid}: no meta.versionId")
        return vid

    async def _instance_op(self, http, base: str, msg: BridgeOp) -> None:
        s = self.state
        body = fhir_parameters(msg)
        for _ in range(MAX_CONFLICT_RETRIES):
            url = f"{base}/Composition/{s.composition_id}/_history/{s.version}/${msg.op}"
            r = await http.post(url, json=body)
            if r.status_code in (409, 412):  # stale version: re-read and try again
                s.conflicts += 1
                s.version = await self._reread(http, base, s.composition_id)
                continue
            if r.status_code >= 300:
                raise BridgeError(f"${msg.op}: HTTP {r.status_code}: {r.text[:300]}")
            cid, vid = _version_of(r)
            s.version = vid if (vid and (cid in (None, s.composition_id))) else await self._reread(
                http, base, s.composition_id)
            s.done.append(msg.op)
            return
        raise BridgeError(f"${msg.op}: version conflict {MAX_CONFLICT_RETRIES} times in a row")
