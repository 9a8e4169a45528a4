"""Typed model of an inbound HL7 v2 message, as far as the billing import needs it.

Conventions (German HL7 - "HL7-D" / wiki.hl7.de profiles, IHE PAM for ZBE):

* PID-3 carries the patient number as ``nnn^^^Klinik^PI`` (CX: id, check digit, check
  digit scheme, assigning authority, identifier type code ``PI`` = patient internal id).
* PV1-19 carries the case number ("Fallnummer"/"Aufnahmenummer") as ``nnn^^^Klinik^VN``
  (``VN`` = visit number).
* PV1-2 is the patient class ("Versorgungsart"): ``I`` inpatient, ``O`` outpatient,
  ``N`` not applicable, ``E`` emergency, ``P`` pre-admit, ``R`` recurring, ``B`` obstetrics.
* PV1-3 is the location: component 1 the point of care / nursing unit (Station,
  "pflegerische OE"), 2 room, 3 bed, 4 facility (in German feeds often the department,
  "fachliche OE"). PV1-10 is the hospital service (Fachabteilung).
* PV1-24 is the contract code ("Abrechnungsverfahren"/Kostenträgerart in DURIA's mapping).
* DG1-3 is the diagnosis code as ``K57.1^Appendizitis^I10-2004`` (code, text, catalogue),
  DG1-6 the diagnosis type (HL7 table 0052: ``A`` admitting, ``W`` working, ``F`` final;
  German systems add site-specific values), DG1-15 the priority (``1`` = Hauptdiagnose).
* ZBE (movement, "Bewegung", from IHE PAM as used in the German ADT profile):
  ZBE-1 movement id, ZBE-2 start, ZBE-3 end, ZBE-4 action ``INSERT``/``UPDATE``/
  ``DELETE`` (IHE international uses ``CANCEL``), ZBE-5 historic movement Y/N,
  ZBE-6 original trigger event, ZBE-7 responsible medical ward.

Typed fields map the HL7 explicit null ``""`` to ``None``; :meth:`Hl7Message.get` returns
the raw text (``'""'`` included) for any field path.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from protocols.hl7.er7 import HL7_NULL, EncodingChars, FieldPath, RawSegment, read_path
from protocols.hl7.errors import Hl7Error, Hl7Warning

_FROZEN = ConfigDict(frozen=True)


class Identifier(BaseModel):
    """CX: ``id^check digit^check digit scheme^assigning authority^type code^facility``."""

    model_config = _FROZEN

    id: str
    check_digit: str | None = None
    assigning_authority: str | None = None  # CX-4.1 (namespace id), e.g. "Klinik"
    assigning_authority_id: str | None = None  # CX-4.2 (universal id, e.g. an OID)
    type_code: str | None = None  # CX-5, e.g. PI, VN, MR
    assigning_facility: str | None = None  # CX-6.1


class PersonName(BaseModel):
    """XPN: ``family^given^further given^suffix^prefix^degree^name type``."""

    model_config = _FROZEN

    family: str | None = None
    given: str | None = None
    middle: str | None = None
    suffix: str | None = None
    prefix: str | None = None
    degree: str | None = None
    name_type: str | None = None  # XPN-7: L legal, B birth, M maiden, ...


class Location(BaseModel):
    """PL: ``point of care^room^bed^facility^status^person location type^building^floor``."""

    model_config = _FROZEN

    point_of_care: str | None = None
    room: str | None = None
    bed: str | None = None
    facility: str | None = None
    status: str | None = None
    location_type: str | None = None
    building: str | None = None
    floor: str | None = None

    @property
    def function_area(self) -> str | None:
        """Funktionsbereich in the German reading of PL: the point of care (Station,
        Ambulanz) in PV1-3.1. The mapping table's source field is configurable."""
        return self.point_of_care

    @property
    def discipline(self) -> str | None:
        """Fachdisziplin / fachliche OE in the German reading of PL: PV1-3.4."""
        return self.facility


class CodedValue(BaseModel):
    """CE/CWE/CNE first triplet: ``code^text^coding system``."""

    model_config = _FROZEN

    code: str | None = None
    text: str | None = None
    coding_system: str | None = None


class MessageHeader(BaseModel):
    """MSH."""

    model_config = _FROZEN

    encoding: EncodingChars
    sending_application: str | None = None  # MSH-3.1
    sending_facility: str | None = None  # MSH-4.1
    receiving_application: str | None = None  # MSH-5.1
    receiving_facility: str | None = None  # MSH-6.1
    sent_at: datetime | None = None  # MSH-7
    message_type: str  # MSH-9.1, e.g. ADT
    trigger_event: str | None = None  # MSH-9.2, e.g. A01
    message_structure: str | None = None  # MSH-9.3, e.g. ADT_A01
    control_id: str  # MSH-10
    processing_id: str | None = None  # MSH-11.1: P production, T training, D debugging
    version: str  # MSH-12.1, e.g. 2.5
    version_country: str | None = None  # MSH-12.2.1, e.g. DEU
    accept_ack_type: str | None = None  # MSH-15: AL, NE, ER, SU
    application_ack_type: str | None = None  # MSH-16: AL, NE, ER, SU
    country_code: str | None = None  # MSH-17
    charset: str | None = None  # MSH-18 (first repetition), e.g. "UNICODE UTF-8", "8859/1"
    language: str | None = None  # MSH-19.1

    @property
    def enhanced_ack_mode(self) -> bool:
        """HL7 v2 §2.9: original mode when MSH-15 and MSH-16 are both empty."""
        return bool(self.accept_ack_type or self.application_ack_type)


class EventInfo(BaseModel):
    """EVN."""

    model_config = _FROZEN

    event_type: str | None = None  # EVN-1 (backwards compatible copy of MSH-9.2)
    recorded_at: datetime | None = None  # EVN-2
    planned_at: datetime | None = None  # EVN-3
    reason_code: str | None = None  # EVN-4
    operator_id: str | None = None  # EVN-5.1
    occurred_at: datetime | None = None  # EVN-6


class Patient(BaseModel):
    """PID. Names and birth date are left out of ``repr`` (no personal data in logs)."""

    model_config = _FROZEN

    set_id: str | None = None
    external_id: Identifier | None = None  # PID-2 (SMS puts the patient number here)
    identifiers: list[Identifier] = Field(default_factory=list)  # PID-3
    alternate_ids: list[Identifier] = Field(default_factory=list)  # PID-4
    names: list[PersonName] = Field(default_factory=list, repr=False)  # PID-5
    birth_date: date | None = Field(default=None, repr=False)  # PID-7
    sex: str | None = None  # PID-8
    account_number: Identifier | None = None  # PID-18 (Prosight: the order/case number)

    def identifier(self, type_code: str | None = None, authority: str | None = None) -> Identifier | None:
        """First PID-3 repetition matching ``type_code``/``authority`` (each optional)."""
        for ident in self.identifiers:
            if type_code is not None and ident.type_code != type_code:
                continue
            if authority is not None and ident.assigning_authority != authority:
                continue
            return ident
        return None


class Visit(BaseModel):
    """PV1."""

    model_config = _FROZEN

    set_id: str | None = None
    patient_class: str | None = None  # PV1-2
    location: Location | None = None  # PV1-3
    admission_type: str | None = None  # PV1-4
    prior_location: Location | None = None  # PV1-6
    attending_doctor_id: str | None = None  # PV1-7.1
    hospital_service: str | None = None  # PV1-10
    admit_source: str | None = None  # PV1-14
    patient_type: str | None = None  # PV1-18
    visit_number: Identifier | None = None  # PV1-19
    financial_class: str | None = None  # PV1-20.1
    contract_code: str | None = None  # PV1-24 (first repetition)
    discharge_disposition: str | None = None  # PV1-36
    admit_at: datetime | None = None  # PV1-44
    discharge_at: datetime | None = None  # PV1-45 (first repetition)


class Diagnosis(BaseModel):
    """DG1."""

    model_config = _FROZEN

    set_id: str | None = None
    coding_method: str | None = None  # DG1-2 (withdrawn in 2.6+, e.g. I9, I10)
    code: str | None = None  # DG1-3.1
    text: str | None = None  # DG1-3.2, else DG1-4
    coding_system: str | None = None  # DG1-3.3, else DG1-2
    diagnosed_at: datetime | None = None  # DG1-5
    diagnosis_type: str | None = None  # DG1-6
    priority: str | None = None  # DG1-15 (1 = Hauptdiagnose)
    clinician_id: str | None = None  # DG1-16.1
    classification: str | None = None  # DG1-17
    identifier: str | None = None  # DG1-20.1 (German profile: stable id of the diagnosis)
    action_code: str | None = None  # DG1-21: A add, D delete, U update

    @property
    def is_primary(self) -> bool:
        return self.priority == "1"


class FinancialTransaction(BaseModel):
    """FT1 (one billed service / charge)."""

    model_config = _FROZEN

    set_id: str | None = None  # FT1-1
    transaction_id: str | None = None  # FT1-2
    batch_id: str | None = None  # FT1-3
    transaction_date: datetime | None = None  # FT1-4.1
    transaction_date_end: datetime | None = None  # FT1-4.2
    posting_date: datetime | None = None  # FT1-5
    transaction_type: str | None = None  # FT1-6: CG charge, CD credit, PY payment, AJ adjustment
    code: CodedValue | None = None  # FT1-7 (e.g. EBM/GOÄ number)
    description: str | None = None  # FT1-8
    quantity: Decimal | None = None  # FT1-10
    amount_extended: Decimal | None = None  # FT1-11.1.1
    currency: str | None = None  # FT1-11.1.2
    amount_unit: Decimal | None = None  # FT1-12.1.1
    department: str | None = None  # FT1-13.1
    diagnoses: list[CodedValue] = Field(default_factory=list)  # FT1-19
    performed_by: str | None = None  # FT1-20.1
    ordered_by: str | None = None  # FT1-21.1
    filler_order_number: str | None = None  # FT1-23.1
    procedure_code: CodedValue | None = None  # FT1-25 (e.g. OPS)


class Order(BaseModel):
    """One order: an ORC with the OBR that follows it, or an OBR on its own."""

    model_config = _FROZEN

    order_control: str | None = None  # ORC-1 (NW new, CA cancel, RE results, ...)
    placer_order_number: str | None = None  # ORC-2.1, else OBR-2.1
    placer_namespace: str | None = None  # ORC-2.2 / OBR-2.2
    filler_order_number: str | None = None  # ORC-3.1, else OBR-3.1
    filler_namespace: str | None = None
    placer_group_number: str | None = None  # ORC-4.1
    order_status: str | None = None  # ORC-5
    service: CodedValue | None = None  # OBR-4
    observed_at: datetime | None = None  # OBR-7
    has_orc: bool = False
    has_obr: bool = False


class MovementAction(StrEnum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"  # German profile
    CANCEL = "CANCEL"  # IHE PAM international
    REFERENCE = "REFERENCE"


class Movement(BaseModel):
    """ZBE (IHE PAM movement segment, German ADT profile)."""

    model_config = _FROZEN

    movement_id: str | None = None  # ZBE-1.1
    movement_namespace: str | None = None  # ZBE-1.2
    started_at: datetime | None = None  # ZBE-2
    ended_at: datetime | None = None  # ZBE-3
    action: MovementAction | None = None  # ZBE-4
    historic: bool | None = None  # ZBE-5 (Y/N)
    original_trigger: str | None = None  # ZBE-6
    responsible_ward: str | None = None  # ZBE-7 (XON-10 organisation id, else XON-1)


class Hl7Message(BaseModel):
    """A parsed message: header, the domain segments typed, all segments raw."""

    model_config = _FROZEN

    header: MessageHeader
    # the domain parts are personal data: kept out of repr() so logging a message is safe
    event: EventInfo | None = Field(default=None, repr=False)
    patient: Patient | None = Field(default=None, repr=False)
    visit: Visit | None = Field(default=None, repr=False)
    diagnoses: list[Diagnosis] = Field(default_factory=list, repr=False)
    transactions: list[FinancialTransaction] = Field(default_factory=list, repr=False)
    orders: list[Order] = Field(default_factory=list, repr=False)
    movement: Movement | None = Field(default=None, repr=False)
    segments: list[RawSegment] = Field(default_factory=list, repr=False)
    charset: str = "utf-8"  # Python codec the bytes were decoded with
    warnings: list[Hl7Warning] = Field(default_factory=list)

    # shortcuts
    @property
    def message_type(self) -> str:
        return self.header.message_type

    @property
    def trigger_event(self) -> str | None:
        return self.header.trigger_event

    @property
    def control_id(self) -> str:
        return self.header.control_id

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    def segments_named(self, name: str) -> list[RawSegment]:
        return [s for s in self.segments if s.name == name]

    def get(self, path: str | FieldPath, occurrence: int = 1) -> str | None:
        """Value at a field path such as ``"PV1-19.1"`` in the ``occurrence``-th segment of
        that name; ``None`` when the segment is absent, ``""`` when the field is empty.
        Raises ``ValueError`` for a malformed *path* (a programming/config error)."""
        fp = path if isinstance(path, FieldPath) else FieldPath.parse(path)
        segs = self.segments_named(fp.segment)
        if occurrence < 1 or occurrence > len(segs):
            return None
        return read_path(segs[occurrence - 1], fp, self.header.encoding)

    def value(self, path: str | FieldPath, occurrence: int = 1) -> str | None:
        """Like :meth:`get`, but always a leaf: a path without component/subcomponent
        reads the first one (``"PV1-10"`` = ``"PV1-10.1.1"``). Empty and the HL7 null
        ``""`` give ``None``. Meant for configured fields (patient/case number, mapping)."""
        fp = path if isinstance(path, FieldPath) else FieldPath.parse(path)
        if not (fp.segment == "MSH" and fp.field in (1, 2)):
            fp = fp.model_copy(update={"component": fp.component or 1, "subcomponent": fp.subcomponent or 1})
        v = self.get(fp, occurrence)
        if v is None:
            return None
        v = v.strip()
        return None if v in ("", HL7_NULL) else v

    def to_er7(self, segment_sep: str = "\r") -> str:
        """The message as ER7 text (segments as received, CR-separated, trailing CR)."""
        enc = self.header.encoding
        return "".join(s.to_er7(enc) + segment_sep for s in self.segments)


class Hl7Batch(BaseModel):
    """An HL7 batch file: ``[FHS] {BHS {MSH ...} BTS} [FTS]``, or simply several messages
    one after another. Each message parses (or fails) on its own."""

    model_config = _FROZEN

    file_header: RawSegment | None = None
    batch_headers: list[RawSegment] = Field(default_factory=list)
    messages: list[Hl7Message | Hl7Error] = Field(default_factory=list)
    warnings: list[Hl7Warning] = Field(default_factory=list)

    @property
    def ok(self) -> list[Hl7Message]:
        return [m for m in self.messages if isinstance(m, Hl7Message)]

    @property
    def failed(self) -> list[Hl7Error]:
        return [m for m in self.messages if not isinstance(m, Hl7Message)]

