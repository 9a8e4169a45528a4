"""The MOPED bridge: HL7 case changes become MOPED operations (a message, not an import).

``hl7.bridge`` is one entity per case (same pseudonymous key as ``hl7.case``). It gets
:class:`~actors.hl7.messages.BridgeOp` messages from the case, in order, and calls the
MOPED FHIR R5 API (``actors/moped``, Ray Serve under ``/moped``) over HTTP with httpx:

==============  =========================================================================
op              HTTP (``Authorization: Bearer <token>``, the bridge host's port)
==============  =========================================================================
aufnehmen       ``POST {moped}/$aufnehmen``: Patient, stay Encounter, Conditions, one
                transfer Encounter per department (-> Composition id, ETag version)
update          ``POST {moped}/Composition/{id}/_history/{vid}/$update`` (Patient, stay,
                departments, diagnoses)
entlassen       ``.../$entlassen``: the stay and the last department get their end;
                ``aviso`` while no main diagnosis is known
abrechnen       ``.../$abrechnen``: discharge diagnoses + FT1 services (Procedures) and
                the Claim referencing them
==============  =========================================================================

Each call sends the case as it is now (a full picture): resources MOPED already holds are
sent with their server ids (learned from ``GET Composition/{id}/$document`` after each
accepted operation), new ones with local ids, so repeating an operation does not
duplicate anything. MOPED's optimistic version control answers a stale ``{vid}`` with
409 (or 412): the bridge re-reads the document and tries again with the current version.
A 4xx refusal (a business rule of MOPED) is recorded in the bridge's state
(``refused``) and emitted as an event, not retried; 5xx and connection errors raise, so
the runtime retries the message and finally dead-letters it.

MOPED's admission needs at least one diagnosis: until the case has one, ``$aufnehmen``
waits (``waiting``) and is sent before the next operation that finds one.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from actors.hl7.keys import BRIDGE
from actors.hl7.messages import BridgeOp, BridgeView, CaseView, GetBridge, PersonData
from actors.runtime.entity import Entity, handles
from protocols.events import Event

log = logging.getLogger("automat.hl7.bridge")

MAX_CONFLICT_RETRIES = 5
TZ = ZoneInfo("Europe/Berlin")  # HL7 v2 timestamps from German KIS come without offset
ICD10_GM = "http://fhir.de/CodeSystem/bfarm/icd-10-gm"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
DEPT_ID = "https://elga.moped.at/NamingSystem/funktionscode"
ENCOUNTER_TYPES_CS = "https://elga.moped.at/CodeSystem/MopedEncounterTypesCS"
TRANSFER = "TENC"
DIAGNOSETYP_URL = "https://automat.example/fhir/StructureDefinition/moped-diagnosetyp"
MAIN_DIAGNOSIS = "HD"
DATA_ABSENT_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
SERVICE_CS = "https://automat.example/fhir/CodeSystem/hl7-ft1"
PARAM_NAME = {"aufnehmen": "Aufnahme", "update": "Update", "entlassen": "Entlassung", "abrechnen": "Abrechnung"}

try:  # the names MOPED itself uses, when its protocol package is there
    from protocols.moped import codes as _codes

    ENCOUNTER_TYPES_CS, TRANSFER = _codes.ENCOUNTER_TYPES_CS, _codes.TRANSFER_ENCOUNTER
    DIAGNOSETYP_URL, MAIN_DIAGNOSIS, DATA_ABSENT_URL = _codes.DIAGNOSETYP_URL, _codes.MAIN_DIAGNOSIS, _codes.DATA_ABSENT_URL
    PARAM_NAME = {k: _codes.PARAM_NAME[k] for k in PARAM_NAME}
except ImportError:  # pragma: no cover
    pass


class BridgeError(Exception):
    pass


class BridgeState(BaseModel):
    composition_id: str | None = None
    version: str | None = None
    done: list[str] = Field(default_factory=list)
    refused: list[str] = Field(default_factory=list)
    waiting: str | None = None
    conflicts: int = 0
    last_seq: int = 0
    ids: dict[str, str] = Field(default_factory=dict)  # role -> server id (patient, stay, t0, dx:K35.8, px:...)


# ----------------------------------------------------------------------------- FHIR


def _when(v: datetime | date | None) -> str | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=TZ)).isoformat()
    return v.isoformat()


def _departments(c: CaseView) -> list[tuple[str, str | None, str | None]]:
    """(department, start, end) per stay in a department, from the movements."""
    out: list[list] = []
    for m in c.movements:
        dept = m.point_of_care or m.facility
        at = _when(m.at) or _when(c.admit_at)
        if m.event == "A03":
            if out and out[-1][2] is None:
                out[-1][2] = _when(c.discharge_at) or at
            continue
        if dept is None or (out and out[-1][0] == dept and out[-1][2] is None):
            continue
        if out and out[-1][2] is None:
            out[-1][2] = at
        out.append([dept, at, None])
    if not out and (c.point_of_care or c.facility):
        out.append([c.point_of_care or c.facility, _when(c.admit_at), None])
    if c.status == "discharged" and out and out[-1][2] is None:
        out[-1][2] = _when(c.discharge_at)
    return [tuple(x) for x in out]


def _main_code(c: CaseView) -> str | None:
    for d in c.diagnoses:
        if d.primary:
            return d.code
    return c.diagnoses[0].code if c.diagnoses else None


def build_entries(op: str, c: CaseView, person: PersonData, ids: dict[str, str]) -> list[tuple[str, dict]]:
    """(role, resource) for an operation; resources MOPED holds carry their server id."""
    def rid(role: str, local: str) -> str:
        return ids.get(role, local)

    out: list[tuple[str, dict]] = []
    if op in ("aufnehmen", "update"):
        pat: dict[str, Any] = {"resourceType": "Patient", "id": rid("patient", "hl7-patient"),
                               "identifier": [{"system": "urn:automat:hl7:patient-number", "value": c.patient_number}]}
        if person.family or person.given:
            pat["name"] = [{"family": person.family, **({"given": [person.given]} if person.given else {})}]
        if person.birth_date:
            pat["birthDate"] = person.birth_date.isoformat()
        if person.sex:
            pat["gender"] = {"M": "male", "F": "female", "D": "other", "X": "other"}.get(person.sex.upper(), "unknown")
        out.append(("patient", pat))
    period = {k: v for k, v in (("start", _when(c.admit_at)), ("end", _when(c.discharge_at))) if v}
    out.append(("stay", {
        "resourceType": "Encounter", "id": rid("stay", "hl7-stay"),
        "identifier": [{"system": "urn:automat:hl7:case-number", "value": c.case_number}],
        "status": "completed" if c.status == "discharged" else "in-progress",
        "class": [{"coding": [{"system": ACT_CODE, "code": {"O": "AMB", "E": "EMER"}.get(c.patient_class or "", "IMP")}]}],
        **({"actualPeriod": period} if period else {}),
    }))
    for i, (dept, start, end) in enumerate(_departments(c)):
        p = {k: v for k, v in (("start", start), ("end", end)) if v}
        out.append((f"t{i}", {
            "resourceType": "Encounter", "id": rid(f"t{i}", f"hl7-t{i}"),
            "status": "completed" if end else "in-progress",
            "type": [{"coding": [{"system": ENCOUNTER_TYPES_CS, "code": TRANSFER}]}],
            **({"actualPeriod": p} if p else {}),
            "serviceProvider": {"identifier": {"system": DEPT_ID, "value": dept}},
        }))
    main = _main_code(c)
    for i, d in enumerate([*c.other_diagnoses, *c.diagnoses]):
        cond: dict[str, Any] = {
            "resourceType": "Condition", "id": rid(f"dx:{d.code}", f"hl7-dx{i}"),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "active"}]},
            "code": {"coding": [{"system": ICD10_GM, "code": d.code, **({"display": d.text} if d.text else {})}]},
            "subject": {"extension": [{"url": DATA_ABSENT_URL, "valueCode": "unsupported"}]},
        }
        if d.code == main:
            cond["extension"] = [{"url": DIAGNOSETYP_URL, "valueCoding": {"code": MAIN_DIAGNOSIS}}]
        out.append((f"dx:{d.code}", cond))
    if op == "abrechnen":
        for i, s in enumerate(c.services):
            key = f"px:{s.transaction_id or s.code}"
            out.append((key, {
                "resourceType": "Procedure", "id": rid(key, f"hl7-px{i}"), "status": "completed",
                "code": {"coding": [{"system": f"{SERVICE_CS}/{s.coding_system or 'local'}", "code": s.code or "?",
                                     **({"display": s.text} if s.text else {})}]},
                **({"occurrenceDateTime": _when(s.service_date)} if s.service_date else {}),
            }))
        out.append(("claim", {
            "resourceType": "Claim", "status": "active", "use": "claim",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
            "created": (c.discharge_at or datetime.now()).date().isoformat(),
            "procedure": [{"sequence": i + 1, "procedureReference": {"reference": f"Procedure/{r['id']}"}}
                          for i, (_, r) in enumerate(x for x in out if x[1]["resourceType"] == "Procedure")],
            "diagnosis": [{"sequence": i + 1, "diagnosisReference": {"reference": f"Condition/{r['id']}"}}
                          for i, (_, r) in enumerate(x for x in out if x[1]["resourceType"] == "Condition")],
        }))
    if op in ("entlassen", "abrechnen"):
        out = [x for x in out if x[0] != "patient"]
    return out


def parameters(op: str, entries: list[tuple[str, dict]], aviso: bool = False) -> dict[str, Any]:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for _, r in entries]}
    p: list[dict[str, Any]] = [{"name": PARAM_NAME[op], "resource": bundle}]
    if aviso:
        p.append({"name": "aviso", "valueBoolean": True})
    return {"resourceType": "Parameters", "parameter": p}


def learn_ids(document: dict, c: CaseView) -> tuple[dict[str, str], str | None]:
    """Server ids of the case's resources (by role) and the version, from ``$document``."""
    ids: dict[str, str] = {}
    version = None
    transfers: list[tuple[str, str]] = []
    for e in document.get("entry", []):
        r = e.get("resource") or {}
        rt, rid = r.get("resourceType"), r.get("id")
        if rt == "Composition":
            version = (r.get("meta") or {}).get("versionId")
        elif rt == "Patient":
            ids["patient"] = rid
        elif rt == "Encounter":
            if any(cd.get("code") == TRANSFER for cc in r.get("type") or [] for cd in cc.get("coding") or []):
                transfers.append(((r.get("actualPeriod") or {}).get("start") or "", rid))
            else:
                ids["stay"] = rid
        elif rt == "Condition":
            for cd in (r.get("code") or {}).get("coding") or []:
                ids[f"dx:{cd.get('code')}"] = rid
        elif rt == "Procedure":
            for cd in (r.get("code") or {}).get("coding") or []:
                for s in c.services:
                    if s.code == cd.get("code"):
                        ids.setdefault(f"px:{s.transaction_id or s.code}", rid)
    for i, (_, rid) in enumerate(sorted(transfers)):
        ids[f"t{i}"] = rid
    return ids, version


def _issues(resp) -> str:
    try:
        body = resp.json()
        msgs = [i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "")
                for i in body.get("issue", []) if i.get("severity") in ("error", "fatal")]
        return "; ".join(m for m in msgs if m)[:400] or resp.text[:400]
    except Exception:
        return resp.text[:400]


class BridgeEntity(Entity[BridgeState]):
    kind = BRIDGE
    State = BridgeState
    personal_data = False  # server ids and versions only

    @handles(readonly=True)
    def on_get(self, msg: GetBridge) -> BridgeView:
        return self._view()

    def _view(self) -> BridgeView:
        return BridgeView(**self.state.model_dump(exclude={"ids"}))

    def _headers(self, msg: BridgeOp) -> dict[str, str]:
        # the token is the host's port (settings), never in the message or the state
        return self.ctx.ports.headers

    @handles
    async def on_op(self, msg: BridgeOp) -> BridgeView:
        s = self.state
        if msg.seq <= s.last_seq:  # re-delivery
            return self._view()
        s.last_seq = msg.seq
        http = self.ctx.ports.http
        base = msg.moped_url.rstrip("/")
        if s.composition_id is None:
            if not await self._aufnehmen(http, base, msg) or msg.op == "aufnehmen":
                return self._view()
        if msg.op == "aufnehmen":
            return self._view()
        if msg.op == "abrechnen" and not msg.case.services:
            s.waiting = "abrechnen: no FT1 services (Leistungen) yet"
            return self._view()
        await self._instance_op(http, base, msg)
        return self._view()

    def _refuse(self, op: str, resp) -> None:
        reason = f"{op}: HTTP {resp.status_code}: {_issues(resp)}"
        self.state.refused.append(reason)
        self.ctx.emit(Event(topic="hl7.bridge", type="moped.refused", key=self.key,
                            data={"op": op, "status": resp.status_code}))

    async def _aufnehmen(self, http, base: str, msg: BridgeOp) -> bool:
        s = self.state
        c = msg.case
        if not (c.diagnoses or c.other_diagnoses):
            s.waiting = "aufnehmen: MOPED needs a first diagnosis (DG1)"
            return False
        entries = build_entries("aufnehmen", c, msg.person, {})
        r = await http.post(f"{base}/$aufnehmen", json=parameters("aufnehmen", entries), headers=self._headers(msg))
        if r.status_code >= 500:
            raise BridgeError(f"$aufnehmen: HTTP {r.status_code}")
        if r.status_code >= 300:
            self._refuse("aufnehmen", r)
            return False
        loc = r.headers.get("location", "")
        if "/Composition/" not in loc:
            raise BridgeError("$aufnehmen: the answer names no Composition")
        s.composition_id = loc.split("/Composition/", 1)[1].split("/", 1)[0]
        s.version = r.headers.get("etag", "").strip('W/"') or None
        s.waiting = None
        s.done.append("aufnehmen")
        await self._refresh(http, base, msg)
        self.ctx.emit(Event(topic="hl7.bridge", type="moped.admitted", key=self.key,
                            data={"composition": s.composition_id}))
        return True

    async def _refresh(self, http, base: str, msg: BridgeOp) -> None:
        s = self.state
        r = await http.get(f"{base}/Composition/{s.composition_id}/$document", headers=self._headers(msg))
        if r.status_code != 200:
            raise BridgeError(f"GET Composition/{s.composition_id}/$document: HTTP {r.status_code}")
        s.ids, version = learn_ids(r.json(), msg.case)
        s.version = version or s.version

    async def _instance_op(self, http, base: str, msg: BridgeOp) -> None:
        s = self.state
        c = msg.case
        for _ in range(MAX_CONFLICT_RETRIES):
            aviso = msg.op == "entlassen" and _main_code(c) is None
            body = parameters(msg.op, build_entries(msg.op, c, msg.person, s.ids), aviso=aviso)
            url = f"{base}/Composition/{s.composition_id}/_history/{s.version}/${msg.op}"
            r = await http.post(url, json=body, headers=self._headers(msg))
            if r.status_code in (409, 412):  # stale version: re-read the case and try again
                s.conflicts += 1
                await self._refresh(http, base, msg)
                continue
            if r.status_code >= 500:
                raise BridgeError(f"${msg.op}: HTTP {r.status_code}")
            if r.status_code >= 300:
                self._refuse(msg.op, r)
                return
            s.version = r.headers.get("etag", "").strip('W/"') or s.version
            s.done.append(msg.op + ("(aviso)" if aviso else ""))
            if msg.op == "abrechnen":
                s.waiting = None
            await self._refresh(http, base, msg)
            return
        raise BridgeError(f"${msg.op}: version conflict {MAX_CONFLICT_RETRIES} times in a row")
