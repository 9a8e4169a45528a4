"""DFT^P03 export of billed services, round-tripped through the parser."""

from __future__ import annotations

from datetime import date, datetime, timezone
from decimal import Decimal

import pytest

from protocols.hl7 import (
    BilledService,
    CaseRef,
    Hl7InterfaceConfig,
    Hl7Message,
    IdFieldChoice,
    build_dft_p03,
    parse_message,
    resolve_ids,
)

NOW = datetime(2024, 3, 2, 8, 0, tzinfo=timezone.utc)
SERVICES = [
    BilledService(
        service_date=date(2024, 3, 1), code="01210", coding_system="EBM", text="Notfallpauschale | Tag",
        quantity=Decimal("1"), amount=Decimal("13.7"), unit_price=Decimal("13.70"), transaction_id="L-1",
        department="NOTF", performed_by="LANR123", diagnosis_codes=["S52.5", "W01.9"], procedure_code="5-790.2b",
    ),
    BilledService(service_date=datetime(2024, 3, 1, 22, 15), code="1", coding_system="GOAE", quantity=Decimal("2.5"),
                  transaction_type="CD", transaction_id="L-2"),
]


def build(choice=IdFieldChoice.MEDICO, **kw):
    case = CaseRef(patient_number="4711", case_number="0815", assigning_authority="Klinik", id_fields=choice,
                   patient_class="O", point_of_care="NOTF", facility="CHIR", contract_code="GKV",
                   family_name="Müller", given_name="Jörg", birth_date=date(1970, 1, 2), sex="M")
    out = build_dft_p03(case, SERVICES, now=NOW, control_id="DFT1", receiving_application="KIS",
                        receiving_facility="KLINIK", **kw)
    m = parse_message(out.to_bytes())
    assert isinstance(m, Hl7Message), m
    return out, m


def test_round_trip_header_and_structure():
    out, m = build()
    assert out.control_id == "DFT1" and out.er7.endswith("\r")
    assert m.segment_names == ["MSH", "EVN", "PID", "PV1", "FT1", "FT1"]
    h = m.header
    assert (h.message_type, h.trigger_event, h.message_structure, h.version) == ("DFT", "P03", "DFT_P03", "2.5")
    assert (h.sending_application, h.receiving_application, h.receiving_facility) == ("AUTOMAT", "KIS", "KLINIK")
    assert h.sent_at == NOW and h.charset == "UNICODE UTF-8" and m.charset == "utf-8"
    assert m.event.event_type == "P03"
    assert m.warnings == []


def test_round_trip_services():
    _, m = build()
    t1, t2 = m.transactions
    assert (t1.set_id, t1.transaction_id, t1.transaction_type) == ("1", "L-1", "CG")
    assert t1.transaction_date == datetime(2024, 3, 1) and t1.posting_date == NOW
    assert (t1.code.code, t1.code.text, t1.code.coding_system) == ("01210", "Notfallpauschale | Tag", "EBM")
    assert t1.description == "Notfallpauschale | Tag"  # the | was escaped on the wire
    assert (t1.quantity, t1.amount_extended, t1.amount_unit, t1.currency) == (
        Decimal(1), Decimal("13.70"), Decimal("13.70"), "EUR")
    assert t1.department == "NOTF" and t1.performed_by == "LANR123"
    assert [(d.code, d.coding_system) for d in t1.diagnoses] == [("S52.5", "I10"), ("W01.9", "I10")]
    assert (t1.procedure_code.code, t1.procedure_code.coding_system) == ("5-790.2b", "OPS")
    assert (t2.transaction_type, t2.quantity, t2.amount_extended) == ("CD", Decimal("2.5"), None)
    assert t2.transaction_date == datetime(2024, 3, 1, 22, 15)
    assert m.patient.names[0].family == "Müller" and m.patient.birth_date == date(1970, 1, 2)
    assert m.visit.patient_class == "O" and m.visit.contract_code == "GKV"
    assert (m.visit.location.point_of_care, m.visit.location.facility) == ("NOTF", "CHIR")


@pytest.mark.parametrize("choice", list(IdFieldChoice))
def test_ids_go_where_the_interface_reads_them(choice):
    _, m = build(choice)
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, id_fields=choice)
    ids = resolve_ids(m, cfg)
    assert (ids.patient_number, ids.case_number) == ("4711", "0815")
    assert ids.patient_identifier.assigning_authority == "Klinik"
    assert ids.patient_identifier.type_code == "PI"
    assert ids.case_identifier.type_code == "VN"


def test_version_23_and_latin1():
    out, m = build(version="2.3", charset="8859/1")
    assert out.charset == "iso8859-1"
    assert out.to_bytes().count("ü".encode("latin-1")) == 1
    assert m.header.message_structure is None and m.header.version == "2.3"
    assert m.patient.names[0].family == "Müller"


def test_bad_arguments_raise():
    case = CaseRef(patient_number="1", case_number="2")
    with pytest.raises(ValueError):
        build_dft_p03(case, [])
    with pytest.raises(ValueError):
        build_dft_p03(case, SERVICES, version="2.9")
    with pytest.raises(ValueError):
        build_dft_p03(case, SERVICES, charset="UNICODE UTF-16")
    with pytest.raises(ValueError):
        BilledService(service_date=date(2024, 1, 1), code="1", quantity=Decimal("NaN"))


def test_minimal_case():
    out = build_dft_p03(CaseRef(patient_number="1", case_number="2"), SERVICES[:1], now=NOW, control_id="X")
    m = parse_message(out.er7)
    assert isinstance(m, Hl7Message)
    assert m.patient.identifiers[0].id == "1" and m.visit.visit_number.id == "2"
    assert m.patient.names == []
