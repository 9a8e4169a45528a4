"""Per-interface configuration of the HL7 import (DURIA "LKIS / 4.Parameter" and
"6.Mappingtabelle") and the pure decisions that depend on it.

DURIA switches and what they are here:

==============================================  =========================================
DURIA                                           here
==============================================  =========================================
Datenformat HL7-Datei / HL7-TCP                 ``transport`` = ``file`` / ``tcp``
Pfad Patientenbewegungen (+ Wildcard)           ``file.directory`` + ``file.wildcard``
Pfad archivierter HL7-Dateien                   ``file.archive_directory``
Start-/Ende-Zeichen, Segmenttrenner,            ``tcp.framing`` (ASCII codes, as in the
Zeichen hinter Ende-Zeichen                     DURIA mask; ``None`` = no such char)
IP-Adresse Server / Client, Portnummer          ``tcp.bind_host`` / ``tcp.allowed_client``
                                                / ``tcp.port``
Patient/Auftrag                                 ``id_fields``: ``PID-3/PID-18`` (Prosight),
                                                ``PID-2/PV1-19`` (SMS), ``PID-3/PV1-19``
                                                (medico//s, Cloverleaf)
Dokumentation Patient / Auftrag (S1, S2)        ``store_patient_number_in`` /
                                                ``store_case_number_in``
Fallanlage Nein / Ja / Ja, im Hintergrund /     ``case_creation`` = ``no`` / ``yes`` /
Ja, alles im Hintergrundjob                     ``background`` / ``all_background``
HL7-Daten nach Entlassung löschen (mind. 10 T.) ``purge_after_days`` (>= 10, ``None`` = never)
Diagnose übernehmen (Kasse, Privat, BG)         ``diagnosis_case_types``
Auftrag/Abr.einheit: 1 Fall je Auftrag /        ``case_scope`` = ``per_order`` /
1 Fall je Abrechnungseinheit                    ``per_billing_unit``
Fall je ORC/OBR (nur mit Auftragsschnittstelle) ``case_per_order_segment`` (needs
                                                ``order_interface``)
Mappingtabelle                                  ``mapping`` (:class:`MappingTable`)
==============================================  =========================================

"Nur die als Entlassungsdiagnose gekennzeichneten Diagnosen aus DG1 zieht DURIA für die
Abrechnung heran": ``discharge_diagnosis_types`` lists the DG1-6 values that mark a
discharge diagnosis (HL7 table 0052 ``F`` = final by default; German sites add their own).
"""

from __future__ import annotations

import codecs
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocols.hl7.er7 import FieldPath
from protocols.hl7.errors import ErrorCode, Hl7Error
from protocols.hl7.framing import Framing
from protocols.hl7.model import Diagnosis, Hl7Message, Identifier

WILDCARD = "*"


class IdFieldChoice(StrEnum):
    """Which fields carry the patient number and the order/case number."""

    PROSIGHT = "PID-3/PID-18"
    SMS = "PID-2/PV1-19"
    MEDICO = "PID-3/PV1-19"  # medico//s and Cloverleaf

    @property
    def patient_field(self) -> str:
        return self.value.split("/")[0]

    @property
    def case_field(self) -> str:
        return self.value.split("/")[1]


class CaseCreation(StrEnum):
    NO = "no"  # master data only, never a case
    YES = "yes"  # case created, the user completes master and case data interactively
    BACKGROUND = "background"  # created without screens, the next patient can follow
    ALL_BACKGROUND = "all_background"  # files read and everything imported by background jobs


class CaseScope(StrEnum):
    PER_ORDER = "per_order"  # one case per order: a billing-unit change removes the old case
    PER_BILLING_UNIT = "per_billing_unit"  # one case in every billing unit the patient passes


class CaseType(StrEnum):
    STATUTORY = "statutory"  # Kasse (GKV)
    PRIVATE = "private"  # Privat
    BG = "bg"  # Berufsgenossenschaft (accident insurance)


# --------------------------------------------------------------------------- mapping table


class MappingRow(BaseModel):
    """One row of the mapping table. ``*`` (or an empty/blank value, as DURIA's mask
    takes a space for "any") matches any value, including an empty field."""

    model_config = ConfigDict(frozen=True)

    patient_class: str = WILDCARD  # PV1-2
    contract_code: str = WILDCARD  # PV1-24
    function_area: str = WILDCARD  # Funktionsbereich
    discipline: str = WILDCARD  # Fachdisziplin
    billing_unit: str = Field(min_length=1)  # Abrechnungseinheit (DURIA: namespace/UCI, e.g. PRAX1)
    case_type: CaseType | None = None

    @field_validator("patient_class", "contract_code", "function_area", "discipline", mode="before")
    @classmethod
    def _wild(cls, v: object) -> object:
        if v is None:
            return WILDCARD
        if isinstance(v, str):
            v = v.strip()
            return v or WILDCARD
        return v

    @field_validator("billing_unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("billing_unit must not be blank")
        return v

    def key(self) -> tuple[str, str, str, str]:
        return (self.patient_class, self.contract_code, self.function_area, self.discipline)

    @property
    def specificity(self) -> int:
        return sum(1 for k in self.key() if k != WILDCARD)

    def matches(self, values: tuple[str | None, str | None, str | None, str | None]) -> bool:
        return all(k == WILDCARD or k == (v or "") for k, v in zip(self.key(), values))


class MappingTable(BaseModel):
    """Mapping PV1-2 × PV1-24 × function area × discipline → billing unit. The fields
    that carry function area and discipline are configurable field paths (default
    PV1-3.1, the point of care / ward, and PV1-3.4, the facility component that German
    feeds use for the department; PV1-10 is a common alternative for the discipline)."""

    model_config = ConfigDict(frozen=True)

    rows: list[MappingRow] = Field(default_factory=list)
    patient_class_field: str = "PV1-2"
    contract_code_field: str = "PV1-24"
    function_area_field: str = "PV1-3.1"
    discipline_field: str = "PV1-3.4"

    @field_validator("patient_class_field", "contract_code_field", "function_area_field", "discipline_field")
    @classmethod
    def _path(cls, v: str) -> str:
        FieldPath.parse(v)  # raises ValueError -> ValidationError
        return v

    @model_validator(mode="after")
    def _no_duplicates(self) -> "MappingTable":
        seen: dict[tuple[str, str, str, str], int] = {}
        for i, row in enumerate(self.rows):
            if row.key() in seen:
                raise ValueError(
                    f"mapping rows {seen[row.key()] + 1} and {i + 1} have the same key {'/'.join(row.key())}"
                )
            seen[row.key()] = i
        return self

    def values_of(self, msg: Hl7Message) -> tuple[str | None, str | None, str | None, str | None]:
        return (
            msg.value(self.patient_class_field),
            msg.value(self.contract_code_field),
            msg.value(self.function_area_field),
            msg.value(self.discipline_field),
        )


class BillingUnitMatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    billing_unit: str
    case_type: CaseType | None = None
    row_index: int  # 0-based index of the winning row
    row: MappingRow


def resolve_billing_unit(msg: Hl7Message, table: MappingTable) -> BillingUnitMatch | Hl7Error:
    """The billing unit for a message: among the rows that match, the most specific
    (fewest ``*``) wins. No match: ``unknown_billing_unit``; two equally specific
    matches naming different billing units: ``ambiguous_billing_unit`` (we never guess
    which practice bills a patient)."""
    values = table.values_of(msg)
    shown = "/".join(v or "(empty)" for v in values)
    matches = [(i, row) for i, row in enumerate(table.rows) if row.matches(values)]
    if not matches:
        return Hl7Error(
            code=ErrorCode.UNKNOWN_BILLING_UNIT,
            field=table.patient_class_field,
            control_id=msg.control_id,
            reason=(
                f"unknown billing unit: no mapping row for patient class/contract code/"
                f"function area/discipline {shown}"
            ),
        )
    best = max(row.specificity for _, row in matches)
    top = [(i, row) for i, row in matches if row.specificity == best]
    units = {row.billing_unit for _, row in top}
    if len(units) > 1:
        return Hl7Error(
            code=ErrorCode.AMBIGUOUS_BILLING_UNIT,
            field=table.patient_class_field,
            control_id=msg.control_id,
            reason=(
                f"mapping rows {', '.join(str(i + 1) for i, _ in top)} match {shown} equally well "
                f"but name different billing units ({', '.join(sorted(units))})"
            ),
        )
    i, row = top[0]
    return BillingUnitMatch(billing_unit=row.billing_unit, case_type=row.case_type, row_index=i, row=row)


# --------------------------------------------------------------------------- transports


class FramingSettings(BaseModel):
    """TCP framing as ASCII codes (DURIA mask); ``None`` = "no such character"."""

    model_config = ConfigDict(frozen=True)

    start_char: int | None = Field(default=0x0B, ge=0, le=255)
    end_char: int = Field(default=0x1C, ge=0, le=255)
    after_end_char: int | None = Field(default=0x0D, ge=0, le=255)
    segment_separator: int = Field(default=0x0D, ge=0, le=255)
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _valid(self) -> "FramingSettings":
        self.to_framing()  # Framing's own checks (distinct characters, ...)
        return self

    def to_framing(self) -> Framing:
        return Framing(
            start=b"" if self.start_char is None else bytes([self.start_char]),
            end=bytes([self.end_char]),
            after_end=b"" if self.after_end_char is None else bytes([self.after_end_char]),
            segment_sep=bytes([self.segment_separator]),
            max_frame_bytes=self.max_frame_bytes,
        )


class TcpSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    bind_host: str = "127.0.0.1"  # IP-Adresse Server
    port: int = Field(ge=1, le=65535)  # IP-Portnummer
    allowed_client: str | None = None  # IP-Adresse Client (None: any peer)
    framing: FramingSettings = Field(default_factory=FramingSettings)


class FileDropSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    directory: str = Field(min_length=1)  # Pfad Patientenbewegungen
    wildcard: str = "*.hl7"
    archive_directory: str = Field(min_length=1)  # Pfad archivierter HL7-Dateien

    @field_validator("wildcard")
    @classmethod
    def _wildcard(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\\" in v:
            raise ValueError("wildcard must be a file name pattern such as '*.hl7' (no directories)")
        return v.strip()

    @model_validator(mode="after")
    def _distinct(self) -> "FileDropSettings":
        if self.directory.rstrip("/\\") == self.archive_directory.rstrip("/\\"):
            raise ValueError("archive_directory must differ from directory (files would be read again)")
        return self


class AckSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    sending_application: str | None = "AUTOMAT"  # MSH-3 of our ACKs (None: copy MSH-5)
    sending_facility: str | None = None  # MSH-4 of our ACKs (None: copy MSH-6)


# --------------------------------------------------------------------------- interface


class Hl7InterfaceConfig(BaseModel):
    """Everything one HL7 interface (one KIS/LIS connection) needs."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    transport: Literal["tcp", "file"]
    tcp: TcpSettings | None = None
    file: FileDropSettings | None = None

    id_fields: IdFieldChoice = IdFieldChoice.MEDICO
    patient_id_type: str | None = None  # prefer the PID-3 repetition with this CX-5 (e.g. "PI")
    patient_id_authority: str | None = None  # ... and/or this assigning authority (CX-4)
    store_patient_number_in: Literal["S1", "S2"] | None = None
    store_case_number_in: Literal["S1", "S2"] | None = None

    case_creation: CaseCreation = CaseCreation.NO
    case_scope: CaseScope = CaseScope.PER_BILLING_UNIT
    order_interface: bool = False  # the KIS sends orders (ORC/OBR)
    case_per_order_segment: bool = False  # Fall je ORC/OBR

    discharge_diagnosis_types: frozenset[str] = frozenset({"F"})
    diagnosis_case_types: frozenset[CaseType] = frozenset(CaseType)
    purge_after_days: int | None = Field(default=None, ge=10)

    mapping: MappingTable = Field(default_factory=MappingTable)
    ack: AckSettings = Field(default_factory=AckSettings)
    charset: str | None = None  # force a Python codec instead of MSH-18 detection

    @field_validator("charset")
    @classmethod
    def _charset(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                codecs.lookup(v)
            except LookupError as e:
                raise ValueError(f"unknown charset {v!r}") from e
        return v

    @field_validator("discharge_diagnosis_types")
    @classmethod
    def _types(cls, v: frozenset[str]) -> frozenset[str]:
        return frozenset(t.strip() for t in v if t.strip())

    @model_validator(mode="after")
    def _consistent(self) -> "Hl7InterfaceConfig":
        if self.transport == "tcp" and self.tcp is None:
            raise ValueError("transport 'tcp' needs tcp settings")
        if self.transport == "file" and self.file is None:
            raise ValueError("transport 'file' needs file settings")
        if self.case_per_order_segment and not self.order_interface:
            raise ValueError("case_per_order_segment (Fall je ORC/OBR) needs order_interface: the KIS must send orders")
        if self.store_patient_number_in and self.store_patient_number_in == self.store_case_number_in:
            raise ValueError("patient and case number cannot both be stored in the same field")
        return self


# --------------------------------------------------------------------------- decisions


class PatientCaseIds(BaseModel):
    model_config = ConfigDict(frozen=True)

    patient_number: str
    patient_identifier: Identifier | None = None
    patient_field: str
    case_number: str
    case_identifier: Identifier | None = None
    case_field: str


def resolve_ids(msg: Hl7Message, cfg: Hl7InterfaceConfig) -> PatientCaseIds | Hl7Error:
    """Patient and order/case number from the fields ``cfg.id_fields`` names. DURIA: "Die
    unter Patient/Auftrag angegebenen Komponenten müssen immer besetzt sein" - an empty
    one is ``missing_field``."""
    choice = cfg.id_fields
    p = msg.patient
    pat: Identifier | None = None
    if choice.patient_field == "PID-3":
        if p is not None:
            if cfg.patient_id_type or cfg.patient_id_authority:
                pat = p.identifier(cfg.patient_id_type, cfg.patient_id_authority)
            else:
                pat = p.identifiers[0] if p.identifiers else None
    else:  # PID-2
        pat = p.external_id if p is not None else None
    if pat is None:
        want = ""
        if choice.patient_field == "PID-3" and (cfg.patient_id_type or cfg.patient_id_authority):
            want = f" with type {cfg.patient_id_type or '*'} / authority {cfg.patient_id_authority or '*'}"
        return Hl7Error(code=ErrorCode.MISSING_FIELD, field=choice.patient_field, segment="PID",
                        control_id=msg.control_id,
                        reason=f"no patient number in {choice.patient_field}{want} (setting {choice.value})")
    case: Identifier | None
    if choice.case_field == "PID-18":
        case = p.account_number if p is not None else None
        seg = "PID"
    else:
        case = msg.visit.visit_number if msg.visit is not None else None
        seg = "PV1"
    if case is None:
        return Hl7Error(code=ErrorCode.MISSING_FIELD, field=choice.case_field, segment=seg,
                        control_id=msg.control_id,
                        reason=f"no order/case number in {choice.case_field} (setting {choice.value})")
    return PatientCaseIds(
        patient_number=pat.id,
        patient_identifier=pat,
        patient_field=choice.patient_field,
        case_number=case.id,
        case_identifier=case,
        case_field=choice.case_field,
    )


def billable_diagnoses(msg: Hl7Message, cfg: Hl7InterfaceConfig, case_type: CaseType | None) -> list[Diagnosis]:
    """DG1 diagnoses that count for billing: only discharge diagnoses (DG1-6 in
    ``discharge_diagnosis_types``), and only for case types diagnoses are taken for
    (an unknown case type takes them). DG1-21 ``D`` (delete) entries are left out."""
    if case_type is not None and case_type not in cfg.diagnosis_case_types:
        return []
    return [
        d for d in msg.diagnoses
        if d.diagnosis_type in cfg.discharge_diagnosis_types and (d.action_code or "").upper() != "D"
    ]


class ImportDecision(BaseModel):
    """What the import does with one message (pure result; the actor acts on it)."""

    model_config = ConfigDict(frozen=True)

    ids: PatientCaseIds
    billing: BillingUnitMatch
    create_case: bool
    interactive: bool  # case_creation == yes: the user completes the data
    case_keys: list[str]  # one case per key (billing unit, order, or ORC/OBR)
    diagnoses: list[Diagnosis] = Field(default_factory=list)


def decide_import(msg: Hl7Message, cfg: Hl7InterfaceConfig) -> ImportDecision | Hl7Error:
    """DURIA's minimum requirements and switches applied to one parsed message:
    ids present, billing unit resolvable, ORC/OBR present when ``case_per_order_segment``
    asks for a case per order (only when cases are created at all)."""
    ids = resolve_ids(msg, cfg)
    if isinstance(ids, Hl7Error):
        return ids
    bu = resolve_billing_unit(msg, cfg.mapping)
    if isinstance(bu, Hl7Error):
        return bu
    create = cfg.case_creation != CaseCreation.NO
    keys: list[str] = []
    if create:
        if cfg.case_per_order_segment:
            orders = [o.placer_order_number or o.filler_order_number for o in msg.orders]
            orders = [o for o in orders if o]
            if not orders:
                return Hl7Error(code=ErrorCode.MISSING_SEGMENT, segment="ORC", control_id=msg.control_id,
                                reason="a case per ORC/OBR is configured, but the message has no order number "
                                       "(ORC-2/ORC-3/OBR-2/OBR-3)")
            keys = [f"{bu.billing_unit}/{ids.case_number}/{o}" for o in orders]
        elif cfg.case_scope == CaseScope.PER_ORDER:
            keys = [ids.case_number]
        else:
            keys = [f"{bu.billing_unit}/{ids.case_number}"]
    return ImportDecision(
        ids=ids,
        billing=bu,
        create_case=create,
        interactive=cfg.case_creation == CaseCreation.YES,
        case_keys=keys,
        diagnoses=billable_diagnoses(msg, cfg, bu.case_type),
    )


def purge_due(discharged_at: datetime, now: datetime, cfg: Hl7InterfaceConfig) -> bool:
    """Whether held HL7 data of a discharged, never imported patient is to be deleted.
    Meaningless (False) with ``all_background``, where everything is imported."""
    if cfg.purge_after_days is None or cfg.case_creation == CaseCreation.ALL_BACKGROUND:
        return False
    return now - discharged_at >= timedelta(days=cfg.purge_after_days)
