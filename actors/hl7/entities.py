"""Patient, case and pending-list entities of the HL7 import (one set per billing unit).

``hl7.case`` applies ADT events in arrival order (A01/A04 admit, A02 transfer, A03
discharge, A08 update, A11/A12/A13 cancel admit/transfer/discharge, ZBE DELETE/CANCEL of
a movement), FT1 services (DFT/BAR) and discharge diagnoses; on a billing-unit change
with one case per order the case leaves its former unit (``billing_units_removed``).
It feeds the MOPED bridge (``hl7.bridge``) with typed operations and exports billed
services through ``hl7.export``.

``hl7.patient`` holds the master data; until taken over (``automat hl7 take``) a patient
is on its billing unit's pending list (``hl7.pending``), unless the case-creation mode
takes everything in the background. Data of a discharged patient never taken over is
purged after ``purge_after_days`` (durable timer).

Every handler is deterministic given state + message; re-delivered messages (same
interface + control id) are answered without being applied twice.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field

from actors.hl7.keys import BRIDGE, CASE, EXPORT, PATIENT, PENDING
from actors.hl7.messages import (
    BillServices,
    BridgeOp,
    CaseImport,
    CaseView,
    CreateCase,
    DetachCase,
    DftSent,
    DiagnosisData,
    GetCase,
    GetPatient,
    GetPending,
    MovementData,
    PatientImport,
    PatientView,
    PendingEntry,
    PendingList,
    PendingRemove,
    PendingUpsert,
    PersonData,
    PurgeCheck,
    SendDft,
    ServiceData,
    TakeOver,
    TakeResult,
)
from actors.runtime.entity import Entity, handles
from protocols.events import Event
from protocols.hl7 import CaseRef, IdFieldChoice

SEEN_MAX = 500


def _remember(seen: list[str], token: str) -> None:
    seen.append(token)
    if len(seen) > SEEN_MAX:
        del seen[: len(seen) - SEEN_MAX]


def _merge_person(old: PersonData, new: PersonData) -> PersonData:
    data = old.model_dump()
    for k, v in new.model_dump().items():
        if v is not None:
            data[k] = v
    return PersonData(**data)


def _ts(d: datetime) -> float:
    return d.timestamp() if d.tzinfo else d.replace(tzinfo=timezone.utc).timestamp()


# =========================================================================== case


class CaseState(BaseModel):
    status: str = "none"  # none | open | discharged | cancelled | removed
    created: bool = False
    billing_unit: str | None = None
    billing_units_removed: list[str] = Field(default_factory=list)
    case_number: str | None = None
    order_number: str | None = None
    patient_number: str | None = None
    patient_key: str | None = None
    interface: str | None = None
    patient_class: str | None = None
    contract_code: str | None = None
    point_of_care: str | None = None
    facility: str | None = None
    admit_at: datetime | None = None
    discharge_at: datetime | None = None
    movements: list[MovementData] = Field(default_factory=list)
    diagnoses: list[DiagnosisData] = Field(default_factory=list)
    other_diagnoses: list[DiagnosisData] = Field(default_factory=list)
    services: list[ServiceData] = Field(default_factory=list)
    billed: list[str] = Field(default_factory=list)
    events: list[str] = Field(default_factory=list)
    seen: list[str] = Field(default_factory=list)
    person: PersonData = Field(default_factory=PersonData)
    moped_url: str | None = None
    seq: int = 0


class CaseEntity(Entity[CaseState]):
    kind = CASE
    State = CaseState
    personal_data = True

    # ------------------------------------------------------------------ views
    def view(self) -> CaseView:
        s = self.state
        status = s.status
        if s.status != "none" and not s.created and status not in ("removed",):
            status = "pending"
        return CaseView(
            key=self.key, exists=s.status != "none", status=status, created=s.created,
            billing_unit=s.billing_unit, billing_units_removed=list(s.billing_units_removed),
            case_number=s.case_number, patient_number=s.patient_number, patient_key=s.patient_key,
            patient_class=s.patient_class, point_of_care=s.point_of_care, facility=s.facility,
            admit_at=s.admit_at, discharge_at=s.discharge_at, movements=list(s.movements),
            diagnoses=list(s.diagnoses), other_diagnoses=list(s.other_diagnoses), services=list(s.services),
            billed=len(s.billed),
            events=list(s.events), orders=[s.order_number] if s.order_number else [],
        )

    def _emit(self, type_: str, **data) -> None:
        self.ctx.emit(Event(topic="hl7.case", type=type_, key=self.key,
                            data={"billing_unit": self.state.billing_unit, "status": self.view().status, **data}))

    def _bridge(self, *ops: str) -> None:
        s = self.state
        if not s.created or not s.moped_url:
            return
        for op in ops:
            s.seq += 1
            self.ctx.tell(BRIDGE, self.key, BridgeOp(op=op, moped_url=s.moped_url, case=self.view(),
                                                     person=s.person, seq=s.seq))

    # ------------------------------------------------------------------ handlers
    @handles(readonly=True)
    def on_get(self, msg: GetCase) -> CaseView:
        return self.view()

    @handles
    def on_import(self, msg: CaseImport) -> CaseView:
        s = self.state
        token = f"{msg.interface}|{msg.control_id}|{msg.digest}"
        if token in s.seen:
            return self.view()
        _remember(s.seen, token)
        was_created = s.created
        was_status = s.status
        # billing-unit change (only possible with one case per order: the key has no unit)
        if s.billing_unit and s.billing_unit != msg.billing_unit:
            old = s.billing_unit
            if old not in s.billing_units_removed:
                s.billing_units_removed.append(old)
            if s.patient_key and s.patient_key != msg.patient_key:
                self.ctx.tell(PATIENT, s.patient_key, DetachCase(case_key=self.key, control_id=msg.control_id))
            self._emit("case.removed", removed_from=old, moved_to=msg.billing_unit)
        if msg.billing_unit in s.billing_units_removed:
            s.billing_units_removed.remove(msg.billing_unit)
        s.billing_unit = msg.billing_unit
        s.case_number = msg.case_number
        s.order_number = msg.order_number or s.order_number
        s.patient_number = msg.patient_number
        s.patient_key = msg.patient_key
        s.interface = msg.interface
        s.person = _merge_person(s.person, msg.person)
        s.moped_url = msg.moped_url
        for f in ("patient_class", "contract_code", "point_of_care", "facility"):
            v = getattr(msg, f)
            if v is not None:
                setattr(s, f, v)
        if msg.admit_at is not None:
            s.admit_at = msg.admit_at
        if s.status == "none":
            s.status = "open"
        s.created = s.created or msg.create
        trig = msg.trigger or ""
        s.events.append(f"{msg.message_type}^{trig}" if msg.message_type != "ADT" else trig)
        adt = msg.message_type == "ADT"
        cancel_movement = (msg.movement_action or "").upper() in ("DELETE", "CANCEL")
        ops: list[str] = []
        if adt and cancel_movement and msg.movement_id:
            s.movements = [m for m in s.movements if m.movement_id != msg.movement_id]
        elif adt and trig in ("A01", "A04", "A05", "A06", "A07"):
            if s.status in ("cancelled", "none"):
                s.status = "open"
            s.admit_at = msg.admit_at or msg.event_at or s.admit_at
            self._move(msg, trig)
        elif adt and trig == "A02":
            self._move(msg, trig)
        elif adt and trig == "A03":
            s.status = "discharged"
            s.discharge_at = msg.discharge_at or msg.event_at
            self._move(msg, trig)
        elif adt and trig == "A11":
            s.status = "cancelled"
        elif adt and trig == "A12":
            for i in range(len(s.movements) - 1, -1, -1):
                if s.movements[i].event == "A02":
                    del s.movements[i]
                    break
            if s.movements:
                s.point_of_care = s.movements[-1].point_of_care
                s.facility = s.movements[-1].facility
        elif adt and trig == "A13":
            if s.status == "discharged":
                s.status = "open"
            s.discharge_at = None
        # discharge diagnoses (the listener passes only the billable ones) and FT1 services
        if msg.diagnoses:
            have = {d.code for d in s.diagnoses}
            for d in msg.diagnoses:
                if d.code not in have:
                    s.diagnoses.append(d)
                    have.add(d.code)
        if msg.other_diagnoses:
            have = {d.code for d in s.other_diagnoses}
            for d in msg.other_diagnoses:
                if d.code not in have:
                    s.other_diagnoses.append(d)
                    have.add(d.code)
        if msg.services:
            have_t = {x.transaction_id for x in s.services if x.transaction_id}
            for x in msg.services:
                if x.transaction_id and x.transaction_id in have_t:
                    continue
                s.services.append(x)
        # the MOPED bridge: a message, not an import
        if s.created and not was_created:
            ops.append("aufnehmen")
            if s.status == "discharged":
                ops.append("entlassen")
        elif s.created:
            if s.status == "discharged" and was_status != "discharged":
                ops.append("entlassen")
            elif not (msg.services or msg.diagnoses) or s.status != "discharged":
                ops.append("update")
        if s.created and s.status == "discharged" and (msg.services or msg.diagnoses or "entlassen" in ops) \
                and (s.diagnoses or s.services):
            ops.append("abrechnen")
        self._bridge(*ops)
        self._emit("case.updated" if was_status != "none" else "case.received",
                   trigger=trig, message_type=msg.message_type, created=s.created)
        return self.view()

    def _move(self, msg: CaseImport, trig: str) -> None:
        self.state.movements.append(MovementData(
            event=trig, at=msg.event_at, point_of_care=msg.point_of_care, facility=msg.facility,
            movement_id=msg.movement_id, control_id=msg.control_id))

    @handles
    def on_create(self, msg: CreateCase) -> CaseView:
        s = self.state
        if s.status != "none" and not s.created:
            s.created = True
            ops = ["aufnehmen"]
            if s.status == "discharged":
                ops.append("entlassen")
                if s.diagnoses or s.services:
                    ops.append("abrechnen")
            self._bridge(*ops)
            self._emit("case.created")
        return self.view()

    @handles
    def on_purge(self, msg: PurgeCheck) -> CaseView:
        """The patient was purged: remove a case that was never created."""
        if not self.state.created:
            self.ctx.delete_entity()
            return CaseView(key=self.key, exists=False)
        return self.view()

    @handles
    def on_bill(self, msg: BillServices) -> DftSent:
        s = self.state
        if s.status == "none" or not s.case_number or not s.patient_number:
            raise ValueError("no such case")
        s.seq += 1
        control_id = (self.key[1:13] + f"{s.seq:08d}")[:20].upper()
        ref = CaseRef(
            patient_number=s.patient_number, case_number=s.case_number,
            id_fields=IdFieldChoice(msg.id_fields), patient_class=s.patient_class or "O",
            point_of_care=s.point_of_care, facility=s.facility, contract_code=s.contract_code,
            family_name=s.person.family, given_name=s.person.given, birth_date=s.person.birth_date,
            sex=s.person.sex,
        )
        s.billed.append(control_id)
        self.ctx.tell(EXPORT, self.key, SendDft(case=ref, services=msg.services, target=msg.target,
                                                control_id=control_id, at=msg.at))
        self._emit("case.billed", services=len(msg.services), control_id=control_id)
        return DftSent(control_id=control_id, where="queued")


# =========================================================================== patient


class PatientState(BaseModel):
    exists: bool = False
    billing_unit: str | None = None
    patient_number: str | None = None
    person: PersonData = Field(default_factory=PersonData)
    mode: str = "no"
    taken: bool = False
    listed: bool = False  # on the pending list
    case_keys: list[str] = Field(default_factory=list)
    created_case_keys: list[str] = Field(default_factory=list)
    case_numbers: list[str] = Field(default_factory=list)
    discharged_at: datetime | None = None
    purge_after_days: int | None = None
    received_at: float = 0.0
    messages: int = 0
    documentation: dict[str, str] = Field(default_factory=dict)  # S1 / S2 (external numbers)
    seen: list[str] = Field(default_factory=list)


class PatientEntity(Entity[PatientState]):
    kind = PATIENT
    State = PatientState
    personal_data = True

    def view(self) -> PatientView:
        s = self.state
        return PatientView(key=self.key, exists=s.exists, billing_unit=s.billing_unit,
                           patient_number=s.patient_number, person=s.person, taken=s.taken,
                           case_keys=list(s.case_keys), discharged_at=s.discharged_at, messages=s.messages,
                           documentation=dict(s.documentation))

    def _entry(self) -> PendingEntry:
        s = self.state
        return PendingEntry(patient_key=self.key, patient_number=s.patient_number or "", family=s.person.family,
                            given=s.person.given, birth_date=s.person.birth_date, case_numbers=list(s.case_numbers),
                            received_at=s.received_at, discharged_at=s.discharged_at)

    @handles(readonly=True)
    def on_get(self, msg: GetPatient) -> PatientView:
        return self.view()

    @handles
    def on_import(self, msg: PatientImport) -> PatientView:
        s = self.state
        token = f"{msg.interface}|{msg.control_id}|{msg.digest}"
        if token in s.seen:
            return self.view()
        _remember(s.seen, token)
        new = not s.exists
        s.exists = True
        s.billing_unit = msg.billing_unit
        s.patient_number = msg.patient_number
        s.person = _merge_person(s.person, msg.person)
        s.mode = msg.mode
        s.purge_after_days = msg.purge_after_days
        s.received_at = msg.received_at
        s.messages += 1
        s.documentation.update(msg.documentation)
        if msg.case_number and msg.case_number not in s.case_numbers:
            s.case_numbers.append(msg.case_number)
        fresh_cases = [k for k in msg.case_keys if k not in s.case_keys]
        s.case_keys.extend(fresh_cases)
        if msg.discharged_at is not None:
            s.discharged_at = msg.discharged_at
        if msg.mode in ("background", "all_background"):
            s.taken = True
            s.created_case_keys = list(s.case_keys)
        elif msg.mode == "yes" and any(k not in s.created_case_keys for k in s.case_keys):
            s.taken = False  # new case data waits for the interactive take-over
        if not s.taken:
            self.ctx.tell(PENDING, s.billing_unit, PendingUpsert(entry=self._entry()))
            s.listed = True
            if s.discharged_at is not None and s.purge_after_days and msg.mode != "all_background":
                self.ctx.set_timer("purge", PurgeCheck(), at=_ts(s.discharged_at) + s.purge_after_days * 86400)
        elif s.listed:
            self.ctx.tell(PENDING, s.billing_unit, PendingRemove(patient_key=self.key))
            s.listed = False
        self.ctx.emit(Event(topic="hl7.patient", type="patient.received" if new else "patient.updated",
                            key=self.key, data={"billing_unit": s.billing_unit, "taken": s.taken}))
        return self.view()

    @handles
    def on_take(self, msg: TakeOver) -> TakeResult:
        s = self.state
        if not s.exists:
            return TakeResult(ok=False, reason="no such patient")
        if s.mode == "all_background":
            return TakeResult(ok=False, reason="case creation 'all in background': no selective take-over")
        created = 0
        if s.mode in ("yes", "background"):
            for k in s.case_keys:
                if k not in s.created_case_keys:
                    self.ctx.tell(CASE, k, CreateCase(at=msg.at))
                    s.created_case_keys.append(k)
                    created += 1
        s.taken = True
        if s.listed:
            self.ctx.tell(PENDING, s.billing_unit, PendingRemove(patient_key=self.key))
            s.listed = False
        self.ctx.cancel_timer("purge")
        self.ctx.emit(Event(topic="hl7.patient", type="patient.taken", key=self.key,
                            data={"billing_unit": s.billing_unit, "cases_created": created}))
        return TakeResult(ok=True, cases_created=created)

    @handles
    def on_detach(self, msg: DetachCase) -> PatientView:
        s = self.state
        if msg.case_key in s.case_keys:
            s.case_keys.remove(msg.case_key)
        if msg.case_key in s.created_case_keys:
            s.created_case_keys.remove(msg.case_key)
        if s.listed:
            self.ctx.tell(PENDING, s.billing_unit, PendingUpsert(entry=self._entry()))
        return self.view()

    @handles
    def on_purge(self, msg: PurgeCheck) -> PatientView:
        s = self.state
        now = msg.now if msg.now is not None else self.ctx.now()
        if (not s.exists or s.taken or s.discharged_at is None or not s.purge_after_days
                or s.mode == "all_background"):
            return self.view()
        if now - _ts(s.discharged_at) < s.purge_after_days * 86400:
            return self.view()
        for k in s.case_keys:
            if k not in s.created_case_keys:
                self.ctx.tell(CASE, k, PurgeCheck(now=now))
        if s.listed:
            self.ctx.tell(PENDING, s.billing_unit, PendingRemove(patient_key=self.key))
        self.ctx.emit(Event(topic="hl7.patient", type="patient.purged", key=self.key,
                            data={"billing_unit": s.billing_unit}))
        self.ctx.cancel_timer("purge")
        self.ctx.delete_entity()
        return PatientView(key=self.key, exists=False, purged=True)


# =========================================================================== pending list


class PendingState(BaseModel):
    entries: dict[str, PendingEntry] = Field(default_factory=dict)


class PendingEntity(Entity[PendingState]):
    """The billing unit's list of patients received but not yet taken over."""

    kind = PENDING
    State = PendingState
    personal_data = True

    @handles
    def on_upsert(self, msg: PendingUpsert) -> None:
        self.state.entries[msg.entry.patient_key] = msg.entry

    @handles
    def on_remove(self, msg: PendingRemove) -> None:
        self.state.entries.pop(msg.patient_key, None)

    @handles(readonly=True)
    def on_get(self, msg: GetPending) -> PendingList:
        entries = sorted(self.state.entries.values(), key=lambda e: e.received_at)
        return PendingList(billing_unit=self.key, entries=entries)
