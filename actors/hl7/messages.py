"""Messages between the HL7 listeners and the patient/case/pending/bridge/export entities.

They carry personal data (names, numbers) in transit only: every entity that stores
them is ``personal_data = True`` (state encrypted at rest), and keys are pseudonyms
(:func:`actors.hl7.keys.patient_key` / :func:`case_key`). Events carry control data only.

Messages are deterministic inputs: the listener stamps ``received_at`` so that a handler
replayed after a crash computes the same state.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field

from protocols.hl7 import BilledService, CaseRef, FramingSettings

CaseCreationMode = Literal["no", "yes", "background", "all_background"]


# --------------------------------------------------------------------------- shared parts


class PersonData(BaseModel):
    family: str | None = None
    given: str | None = None
    birth_date: date | None = None
    sex: str | None = None


class DiagnosisData(BaseModel):
    code: str
    text: str | None = None
    coding_system: str | None = None
    diagnosis_type: str | None = None
    primary: bool = False


class ServiceData(BaseModel):
    """One FT1 service received from the KIS."""

    transaction_id: str | None = None
    code: str | None = None
    text: str | None = None
    coding_system: str | None = None
    service_date: datetime | None = None
    quantity: str | None = None
    transaction_type: str | None = None


class MovementData(BaseModel):
    event: str  # A01, A02, ...
    at: datetime | None = None
    point_of_care: str | None = None
    facility: str | None = None
    movement_id: str | None = None
    control_id: str


class ExportTarget(BaseModel):
    """Where billed services go back to the KIS: a TCP peer (framed, waits for the ACK)
    or a directory (one ``.hl7`` file per DFT^P03, written atomically)."""

    transport: Literal["tcp", "file"] = "file"
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)
    framing: FramingSettings = Field(default_factory=FramingSettings)
    directory: str | None = None
    timeout_s: float = Field(10.0, gt=0)


# --------------------------------------------------------------------------- imports


class CaseImport(BaseModel):
    """One accepted HL7 message as it concerns one case."""

    interface: str
    control_id: str
    digest: str = ""  # of the message text: a re-sent message is recognised, a reused control id is not
    message_type: str  # ADT, DFT, BAR, ORM, ...
    trigger: str | None = None  # A01, P03, ...
    received_at: float
    billing_unit: str
    case_type: str | None = None
    case_scope: Literal["per_order", "per_billing_unit"]
    case_number: str
    order_number: str | None = None  # case per ORC/OBR
    patient_key: str
    patient_number: str
    create: bool  # the case is created now (background modes) or only on take-over
    patient_class: str | None = None
    contract_code: str | None = None
    point_of_care: str | None = None
    facility: str | None = None
    admit_at: datetime | None = None
    discharge_at: datetime | None = None
    event_at: datetime | None = None
    movement_id: str | None = None
    movement_action: str | None = None  # ZBE-4: INSERT/UPDATE/DELETE/CANCEL
    diagnoses: list[DiagnosisData] = Field(default_factory=list)  # discharge diagnoses (billed)
    other_diagnoses: list[DiagnosisData] = Field(default_factory=list)  # admission/working (MOPED admission)
    services: list[ServiceData] = Field(default_factory=list)
    person: PersonData = Field(default_factory=PersonData)
    moped_url: str | None = None  # bridge target (None: no bridge); the token is the bridge host's port


class PatientImport(BaseModel):
    """One accepted HL7 message as it concerns the patient (master data)."""

    interface: str
    control_id: str
    digest: str = ""
    message_type: str
    trigger: str | None = None
    received_at: float
    billing_unit: str
    patient_number: str
    case_number: str
    case_keys: list[str] = Field(default_factory=list)
    mode: CaseCreationMode
    person: PersonData = Field(default_factory=PersonData)
    discharged_at: datetime | None = None
    purge_after_days: int | None = None
    #: DURIA "Dokumentation Patient/Auftrag": the variable master-data fields (S1, S2) that
    #: keep the external patient number / order number, as the interface is configured
    documentation: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- patient


class TakeOver(BaseModel):
    """``automat hl7 take ID``: take the patient (and create its pending cases)."""

    at: float


class PurgeCheck(BaseModel):
    """Timer (or operator): delete data of a discharged patient never taken over."""

    now: float | None = None  # None: the entity's clock


class DetachCase(BaseModel):
    """A case left this patient's billing unit (one case per order, unit changed)."""

    case_key: str
    control_id: str


class GetPatient(BaseModel):
    pass


class PatientView(BaseModel):
    key: str
    exists: bool
    billing_unit: str | None = None
    patient_number: str | None = None
    person: PersonData = Field(default_factory=PersonData)
    taken: bool = False
    case_keys: list[str] = Field(default_factory=list)
    discharged_at: datetime | None = None
    purged: bool = False
    messages: int = 0
    documentation: dict[str, str] = Field(default_factory=dict)  # S1 / S2


class TakeResult(BaseModel):
    ok: bool
    reason: str = ""
    cases_created: int = 0


# --------------------------------------------------------------------------- case


class CreateCase(BaseModel):
    """Take-over of the patient: the pending case becomes a real case."""

    at: float


class GetCase(BaseModel):
    pass


class BillServices(BaseModel):
    """Services billed here for a case: recorded and exported to the KIS as DFT^P03."""

    services: list[BilledService]
    target: ExportTarget
    id_fields: str = "PID-3/PV1-19"
    at: float


class CaseView(BaseModel):
    key: str
    exists: bool
    status: str = "none"  # none | pending | open | discharged | cancelled | removed
    created: bool = False
    billing_unit: str | None = None
    billing_units_removed: list[str] = Field(default_factory=list)
    case_number: str | None = None
    patient_number: str | None = None
    patient_key: str | None = None
    patient_class: str | None = None
    point_of_care: str | None = None
    facility: str | None = None
    admit_at: datetime | None = None
    discharge_at: datetime | None = None
    movements: list[MovementData] = Field(default_factory=list)
    diagnoses: list[DiagnosisData] = Field(default_factory=list)
    other_diagnoses: list[DiagnosisData] = Field(default_factory=list)
    services: list[ServiceData] = Field(default_factory=list)
    billed: int = 0
    events: list[str] = Field(default_factory=list)  # applied triggers in order
    orders: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- pending list


class PendingEntry(BaseModel):
    patient_key: str
    patient_number: str
    family: str | None = None
    given: str | None = None
    birth_date: date | None = None
    case_numbers: list[str] = Field(default_factory=list)
    received_at: float
    discharged_at: datetime | None = None


class PendingUpsert(BaseModel):
    entry: PendingEntry


class PendingRemove(BaseModel):
    patient_key: str


class GetPending(BaseModel):
    pass


class PendingList(BaseModel):
    billing_unit: str
    entries: list[PendingEntry] = Field(default_factory=list)


# --------------------------------------------------------------------------- MOPED bridge / export

BridgeOpName = Literal["aufnehmen", "update", "entlassen", "abrechnen"]


class BridgeOp(BaseModel):
    """A case change for MOPED. ``case`` is the case as it is after the change."""

    op: BridgeOpName
    moped_url: str
    case: CaseView
    person: PersonData = Field(default_factory=PersonData)
    seq: int  # the case's change counter (dedupe of re-deliveries)


class GetBridge(BaseModel):
    pass


class BridgeView(BaseModel):
    composition_id: str | None = None
    version: str | None = None
    done: list[str] = Field(default_factory=list)  # ops MOPED accepted, in order
    refused: list[str] = Field(default_factory=list)  # "op: HTTP status: reason" MOPED refused (4xx)
    waiting: str | None = None  # e.g. admission waits for a first diagnosis
    conflicts: int = 0
    last_seq: int = 0


class SendDft(BaseModel):
    """Export: one DFT^P03 for a case to the KIS."""

    case: CaseRef
    services: list[BilledService]
    target: ExportTarget
    control_id: str
    at: float


class DftSent(BaseModel):
    control_id: str
    where: str
    ack_code: str | None = None
