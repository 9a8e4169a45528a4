"""Billed services back to the KIS: DFT^P03 (detail financial transaction) messages.

DURIA reports billed services to the hospital system "mit dem FT1-Segment (Financial
Transaction)". One message per case: ``MSH, EVN, PID, PV1, FT1 …`` - one FT1 per billed
service. Patient and case number go into the fields the interface reads them from
(:class:`~protocols.hl7.config.IdFieldChoice`), so a Prosight interface gets the order
number back in PID-18, an SMS interface the patient number in PID-2, and so on.

FT1 layout used (HL7 v2.5 numbering, unchanged 2.3 - 2.8 for these fields):
FT1-2 transaction id (stable id of the service, for later cancellation), FT1-4 service
date, FT1-5 posting date, FT1-6 type (``CG`` charge, ``CD`` credit = cancellation),
FT1-7 code ``code^text^system`` (e.g. ``01100^…^EBM`` or ``1^…^GOAE``), FT1-8
description, FT1-10 quantity, FT1-11 extended amount and FT1-12 unit amount as
``amount&EUR``, FT1-13 department, FT1-19 diagnoses, FT1-20 performed by, FT1-21 ordered
by, FT1-23 filler order number, FT1-25 procedure code (e.g. OPS).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocols.hl7.ack import new_control_id
from protocols.hl7.config import IdFieldChoice
from protocols.hl7.er7 import DEFAULT_ENCODING, escape, format_ts, version_tuple
from protocols.hl7.parse import SUPPORTED_VERSIONS, charset_codec

ENC = DEFAULT_ENCODING


class BilledService(BaseModel):
    """One billed service of a case."""

    model_config = ConfigDict(frozen=True)

    service_date: date | datetime
    code: str = Field(min_length=1)
    coding_system: str | None = None  # e.g. EBM, GOAE, OPS, or a house catalogue
    text: str | None = None
    quantity: Decimal = Decimal(1)
    transaction_type: str = "CG"  # CG charge, CD credit (cancellation)
    transaction_id: str | None = None
    amount: Decimal | None = None  # FT1-11 extended amount
    unit_price: Decimal | None = None  # FT1-12
    currency: str = "EUR"
    department: str | None = None  # FT1-13
    diagnosis_codes: list[str] = Field(default_factory=list)  # FT1-19 (ICD-10-GM)
    diagnosis_coding_system: str = "I10"
    performed_by: str | None = None  # FT1-20
    ordered_by: str | None = None  # FT1-21
    filler_order_number: str | None = None  # FT1-23
    procedure_code: str | None = None  # FT1-25 (OPS)
    procedure_coding_system: str | None = "OPS"

    @field_validator("quantity", "amount", "unit_price")
    @classmethod
    def _finite(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and not v.is_finite():
            raise ValueError("must be a finite number")
        return v


class CaseRef(BaseModel):
    """The case the services belong to, as the KIS knows it."""

    model_config = ConfigDict(frozen=True)

    patient_number: str = Field(min_length=1)
    case_number: str = Field(min_length=1)
    id_fields: IdFieldChoice = IdFieldChoice.MEDICO
    assigning_authority: str | None = None  # CX-4, e.g. "Klinik"
    patient_class: str = "O"  # PV1-2
    point_of_care: str | None = None  # PV1-3.1
    facility: str | None = None  # PV1-3.4
    contract_code: str | None = None  # PV1-24
    family_name: str | None = None  # PID-5 (optional: the numbers identify the case)
    given_name: str | None = None
    birth_date: date | None = None
    sex: str | None = None


class OutboundMessage(BaseModel):
    """A message we send. ``er7`` is CR-separated with a trailing CR."""

    model_config = ConfigDict(frozen=True)

    control_id: str
    er7: str
    charset: str = "utf-8"  # Python codec matching MSH-18

    def to_bytes(self) -> bytes:
        return self.er7.encode(self.charset)


def _num(d: Decimal) -> str:
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def _money(d: Decimal | None, currency: str) -> str:
    if d is None:
        return ""
    return f"{format(d.quantize(Decimal('0.01')), 'f')}{ENC.subcomponent}{escape(currency, ENC)}"


def _cx(ident: str, authority: str | None, type_code: str) -> str:
    c = ENC.component
    return c.join([escape(ident, ENC), "", "", escape(authority or "", ENC), type_code])


def _fields(name: str, values: dict[int, str]) -> str:
    n = max(values) if values else 0
    return ENC.field.join([name] + [values.get(i, "") for i in range(1, n + 1)])


def build_dft_p03(
    case: CaseRef,
    services: list[BilledService],
    *,
    sending_application: str = "AUTOMAT",
    sending_facility: str | None = None,
    receiving_application: str | None = None,
    receiving_facility: str | None = None,
    control_id: str | None = None,
    now: datetime | None = None,
    version: str = "2.5",
    processing_id: str = "P",
    charset: str = "UNICODE UTF-8",
) -> OutboundMessage:
    """Build one DFT^P03 for ``case`` with one FT1 per service. Raises ``ValueError`` on
    our own bad arguments (no services, unsupported version or charset) - these come
    from the application, not from the wire."""
    if not services:
        raise ValueError("a DFT^P03 needs at least one service")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported HL7 version {version!r}")
    codec = charset_codec(charset)
    if codec is None:
        raise ValueError(f"unsupported MSH-18 charset {charset!r}")
    e = lambda v: escape(v or "", ENC)  # noqa: E731
    c = ENC.component
    ctrl = control_id or new_control_id()
    ts = format_ts(now or datetime.now().astimezone())
    mtype = f"DFT{c}P03" + (f"{c}DFT_P03" if version_tuple(version) >= (2, 3, 1) else "")

    msh = _fields("MSH", {
        1: "", 2: "", 3: e(sending_application), 4: e(sending_facility), 5: e(receiving_application),
        6: e(receiving_facility), 7: ts, 9: mtype, 10: e(ctrl), 11: e(processing_id), 12: version,
        18: e(charset),
    })
    # MSH-1 is the separator itself and MSH-2 the encoding characters
    msh = "MSH" + ENC.field + ENC.msh2 + msh[len("MSH||") :]
    evn = _fields("EVN", {1: "P03", 2: ts})

    pid: dict[int, str] = {1: "1"}
    pv1: dict[int, str] = {1: "1", 2: e(case.patient_class)}
    patient_cx = _cx(case.patient_number, case.assigning_authority, "PI")
    case_cx = _cx(case.case_number, case.assigning_authority, "VN")
    if case.id_fields.patient_field == "PID-2":
        pid[2] = patient_cx
    else:
        pid[3] = patient_cx
    if case.id_fields.case_field == "PID-18":
        pid[18] = case_cx
    else:
        pv1[19] = case_cx
    pid.setdefault(3, "")  # PID-3 is required: keep the field position even if empty
    pid[5] = c.join([e(case.family_name), e(case.given_name)]).rstrip(c)
    if case.birth_date:
        pid[7] = format_ts(case.birth_date)
    if case.sex:
        pid[8] = e(case.sex)
    if case.point_of_care or case.facility:
        pv1[3] = c.join([e(case.point_of_care), "", "", e(case.facility)]).rstrip(c)
    if case.contract_code:
        pv1[24] = e(case.contract_code)

    segments = [msh, evn, _fields("PID", pid), _fields("PV1", pv1)]
    for i, s in enumerate(services, start=1):
        ft1: dict[int, str] = {
            1: str(i),
            2: e(s.transaction_id),
            4: format_ts(s.service_date),
            5: ts,
            6: e(s.transaction_type),
            7: c.join([e(s.code), e(s.text), e(s.coding_system)]).rstrip(c),
            8: e(s.text),
            10: _num(s.quantity),
            11: _money(s.amount, s.currency),
            12: _money(s.unit_price, s.currency),
            13: e(s.department),
            19: ENC.repetition.join(
                c.join([e(code), "", e(s.diagnosis_coding_system)]) for code in s.diagnosis_codes
            ),
            20: e(s.performed_by),
            21: e(s.ordered_by),
            23: e(s.filler_order_number),
        }
        if s.procedure_code:
            ft1[25] = c.join([e(s.procedure_code), "", e(s.procedure_coding_system)]).rstrip(c)
        segments.append(_fields("FT1", ft1).rstrip(ENC.field))
    er7 = "\r".join(seg.rstrip(ENC.field) if not seg.startswith("MSH") else seg for seg in segments) + "\r"
    return OutboundMessage(control_id=ctrl, er7=er7, charset=codec)
