"""Every file in the shared HL7 v2 fixtures parses to the right typed values (or, for
INVALID_*, to the expected typed error). Values asserted here were read from the files."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from protocols.hl7 import (
    ErrorCode,
    Hl7Batch,
    Hl7Error,
    Hl7Message,
    MovementAction,
    parse_batch,
    parse_message,
    parse_messages,
)

from ._files import all_fixture_names, fixture_bytes

# file -> [(type, trigger, structure, control id, version)] per message
EXPECTED_HEADERS = {
    "cdc-trusted-intermediary/001_ADT_A01_v28.hl7": [("ADT", "A01", "ADT_A01", "MSG00001", "2.8")],
    "cdc-trusted-intermediary/001_Epic_ORM_O01_dg1_in1_gt1.hl7": [("ORM", "O01", None, "550162", "2.3")],
    "cdc-trusted-intermediary/001_Natus_ACK.hl7": [("ACK", None, None, "A0A173B79-D7AC-444F-99E7-C96B4A68B188", "2.5.1")],
    "cdc-trusted-intermediary/002_Epic_ORU_R01.hl7": [("ORU", "R01", None, "169066674328696234", "2.3")],
    "cdc-trusted-intermediary/005_AL_ORU_R01_fhs_bhs_batch.hl7": [("ORU", "R01", "ORU_R01", "858625", "2.5.1")],
    "cdc-trusted-intermediary/005_MN_ADT_A01_v23_nk1_obx.hl7": [("ADT", "A01", None, "407750281", "2.3")],
    "cdc-trusted-intermediary/008_ORU_R01_micro_character_encoding.hl7": [("ORU", "R01", "ORU_R01", "008", "2.5.1")],
    "ipf/mdm_t02_ed_base64_zbe.hl7": [("MDM", "T02", None, "123456", "2.5")],
    "ipf/orbis_mdm_t01_v25deu_zbe.hl7": [("MDM", "T01", None, "283148", "2.5")],
    "ipf/oru_r01_v24_zbe_zyx.hl7": [("ORU", "R01", None, "20050915785887650000", "2.4")],
    "ipf/sap-ish_adt_a01_v25.hl7": [("ADT", "A01", "ADT_A01", "123456", "2.5")],
    "ipf/sap-ish_adt_a08_v25.hl7": [("ADT", "A08", None, "123456", "2.5")],
    "ms-fhir-converter/ADT-A02-01.hl7": [("ADT", "A02", "ADT_A02", "MSG00001", "2.8")],
    "ms-fhir-converter/ADT-A03-01.hl7": [("ADT", "A03", "ADT_A03", "MSG00001", "2.8")],
    "ms-fhir-converter/BAR-P01-01.hl7": [("BAR", "P01", "BAR_P01", "MSG00001", "2.8")],
    "ms-fhir-converter/DFT-P03-01.hl7": [("DFT", "P03", "DFT_P03", "MSG00001", "2.8")],
    "ms-fhir-converter/DFT-P03-02.hl7": [("DFT", "P03", "DFT_P03", "MSG00001", "2.8")],
    "python-hl7/adt_a01_dg1_in1_v23.hl7": [("ADT", "A01", None, "Q150084616T145947960", "2.3")],
    "python-hl7/batch_bhs_adt_a04_1msg.hl7": [("ADT", "A04", "ADT_A01", "12334456778890", "2.5")],
    "python-hl7/batch_bhs_adt_a04_2msgs.hl7": [
        ("ADT", "A04", "ADT_A01", "12334456778890", "2.5"),
        ("ADT", "A04", "ADT_A01", "12334456778891", "2.5"),
    ],
    "python-hl7/file_fhs_2batches_adt_a04.hl7": [
        ("ADT", "A04", "ADT_A01", "12334456778890", "2.5"),
        ("ADT", "A04", "ADT_A01", "12334456778891", "2.5"),
        ("ADT", "A04", "ADT_A01", "12334456778890", "2.5"),
    ],
    "python-hl7/oru_r01_glucose_v24.hl7": [("ORU", "R01", None, "CNTRL-3456", "2.4")],
}
INVALID = {"python-hl7/INVALID_file_bhs_inside_msg.hl7"}


def one(name: str, **kw) -> Hl7Message:
    msg = parse_message(fixture_bytes(name), **kw)
    assert isinstance(msg, Hl7Message), msg
    return msg


def test_fixture_list_is_complete():
    names = set(all_fixture_names())
    if not names:
        pytest.fail("fixtures not available (fixtures/ in the repository)")
    assert names == set(EXPECTED_HEADERS) | INVALID


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADERS))
def test_every_fixture_parses(name):
    results = parse_messages(fixture_bytes(name))
    assert all(isinstance(r, Hl7Message) for r in results), results
    got = [
        (m.header.message_type, m.header.trigger_event, m.header.message_structure, m.control_id, m.header.version)
        for m in results
    ]
    assert got == EXPECTED_HEADERS[name]
    # the same result without the hl7apy pass (only the warnings about it may differ)
    fast = parse_messages(fixture_bytes(name), validate=False)
    assert [m.model_dump(exclude={"warnings"}) for m in fast] == [m.model_dump(exclude={"warnings"}) for m in results]


def test_invalid_bhs_inside_message_is_a_typed_error():
    data = fixture_bytes("python-hl7/INVALID_file_bhs_inside_msg.hl7")
    err = parse_batch(data)
    assert isinstance(err, Hl7Error)
    assert err.code == ErrorCode.BATCH_STRUCTURE
    assert err.segment == "BHS"
    assert "inside a message" in err.reason
    assert err.severity == "reject"
    assert parse_messages(data) == [err]
    single = parse_message(data)
    assert isinstance(single, Hl7Error) and single.code == ErrorCode.UNEXPECTED_BATCH


# ------------------------------------------------------------------ ADT (German/SAP IS-H)


def test_sap_ish_adt_a01():
    m = one("ipf/sap-ish_adt_a01_v25.hl7")
    h = m.header
    assert (h.sending_application, h.sending_facility) == ("SAP-ISH", "HZL")
    assert h.receiving_application is None
    assert h.sent_at == datetime(2004, 8, 5, 15, 26, 37)
    assert h.processing_id == "T"
    assert h.accept_ack_type == "ER" and h.application_ack_type is None
    assert h.enhanced_ack_mode
    assert m.event.event_type == "A01" and m.event.recorded_at == datetime(2004, 8, 5, 15, 26, 37)
    p = m.patient
    assert [i.id for i in p.identifiers] == ["79471"]
    assert (p.names[0].family, p.names[0].given) == ("Nachname", "Vorname")
    assert p.sex == "M" and p.birth_date is None
    v = m.visit
    assert v.patient_class == "I"
    assert (v.location.point_of_care, v.location.room, v.location.bed) == ("ISKA", "13", "4")
    assert v.admission_type == "R"
    assert v.visit_number.id == "79237645"
    assert v.admit_at == datetime(2004, 8, 5)
    assert m.segment_names == ["MSH", "EVN", "PID", "NK1", "PV1"]
    assert m.warnings == []


def test_sap_ish_adt_a08_keeps_hl7_null():
    m = one("ipf/sap-ish_adt_a08_v25.hl7")
    assert m.get("PID-6") == '""'  # explicit null: "delete the birth name"
    assert m.value("PID-6") is None
    assert m.get("PID-11.1") == '""' and m.get("PID-11.3") == "Foo"
    assert m.visit.visit_number.id == "79237645"
    assert m.get("PV1-8") == "823745217"


def test_cdc_adt_a01_v28():
    m = one("cdc-trusted-intermediary/001_ADT_A01_v28.hl7")
    assert m.header.sending_application == "ADT1"
    assert m.header.receiving_application == "GHH LAB, INC."
    assert m.header.processing_id == "D"
    first, second = m.patient.identifiers
    assert (first.id, first.check_digit, first.assigning_authority, first.type_code, first.assigning_facility) == (
        "PATID1234", "5", "ADT1", "MR", "GOOD HEALTH HOSPITAL")
    assert (second.id, second.assigning_authority, second.type_code) == ("123456789", "USSSA", "SS")
    assert m.patient.identifier(type_code="SS").id == "123456789"
    acct = m.patient.account_number
    assert (acct.id, acct.check_digit, acct.assigning_authority, acct.type_code) == ("PATID12345001", "2", "ADT1", "AN")
    assert m.patient.birth_date == date(1961, 6, 15)
    assert (m.patient.names[0].family, m.patient.names[0].given, m.patient.names[0].suffix) == ("DOGCOW", "CLARUS", "III")
    v = m.visit
    assert v.patient_class == "I" and v.location.point_of_care == "2000" and v.location.bed == "01"
    assert v.attending_doctor_id == "004777" and v.hospital_service == "SUR" and v.admit_source == "ADM"
    assert m.event.recorded_at == datetime(2007, 8, 18, 11, 23)


def test_cdc_adt_a01_v23_without_structure():
    m = one("cdc-trusted-intermediary/005_MN_ADT_A01_v23_nk1_obx.hl7")
    assert m.patient.identifiers[0].id == "11102779"
    assert m.patient.identifiers[0].assigning_authority == "SCH"
    assert m.patient.birth_date == date(2023, 5, 4)
    assert m.visit.patient_class == "I" and m.visit.attending_doctor_id == "00909"
    assert m.segment_names.count("NK1") == 2 and "OBX" in m.segment_names


def test_python_hl7_adt_a01_with_dg1_and_in1():
    m = one("python-hl7/adt_a01_dg1_in1_v23.hl7")
    assert [w.code for w in m.warnings] == ["missing_evn"]  # 2.3 feed without EVN: tolerated
    p = m.patient
    assert p.external_id.id == "2148790" and p.external_id.assigning_authority == "MSH_MRN"
    assert [(i.id, i.type_code) for i in p.identifiers] == [("2148790", "MR"), ("162840", "CM")]
    assert [i.id for i in p.alternate_ids] == ["3722", "184737", "Q2147670"]
    assert (p.account_number.id, p.account_number.assigning_authority, p.account_number.type_code) == (
        "O75622322", "MSH_FIN_NBR", "FIN NB")
    assert p.birth_date == date(1952, 11, 29) and p.sex == "F"
    v = m.visit
    assert v.patient_class == "I"
    assert (v.location.point_of_care, v.location.room, v.location.bed) == ("MBN1", "MBN1", "06")
    assert v.hospital_service == "NUR" and v.visit_number.id == "01" and v.financial_class == "T22"
    assert v.admit_at == datetime(2014, 2, 10, 22, 53)
    assert v.discharge_at is None and m.get("PV1-45") == '""'
    (dg,) = m.diagnoses
    assert (dg.code, dg.text, dg.coding_system, dg.coding_method, dg.diagnosis_type) == (
        "440.21", "ATHEROSCLEROSIS W/INT CLAUDCTN", "I9", "I9", "A")
    assert m.segment_names.count("IN1") == 3


def test_ms_adt_a02_and_a03():
    tz0215 = timezone(timedelta(hours=2, minutes=15))
    tz0110 = timezone(timedelta(hours=1, minutes=10))
    for name in ("ms-fhir-converter/ADT-A02-01.hl7", "ms-fhir-converter/ADT-A03-01.hl7"):
        m = one(name)
        assert m.header.sent_at == datetime(1989, 8, 18, 11, 26, tzinfo=tz0215)
        assert (m.header.sending_application, m.header.sending_facility) == ("ADTApp", "GHHSFacility")
        assert (m.header.country_code, m.header.language) == ("USA", "en-US")
        assert m.patient.external_id.id == "1234567" and m.patient.external_id.check_digit == "4"
        assert m.patient.identifiers[0].assigning_authority_id == "2.16.1"
        assert m.visit.patient_class == "P"
        assert m.visit.location.point_of_care == "HUH AE OMU"  # PV1-3.1.1 (PV1-3.1 has subcomponents)
        assert m.visit.location.facility == "HOMERTON UNIVER"
        assert m.visit.admit_source == "NHS Provider-General (inc.A&E-this Hosp)"  # \T\ unescaped
        assert m.visit.visit_number.id == "40007716" and m.visit.visit_number.type_code == "AM"
        assert m.visit.admit_at == datetime(2015, 2, 8, 11, 34, 19, tzinfo=tz0110)
    a03 = one("ms-fhir-converter/ADT-A03-01.hl7")
    assert a03.visit.discharge_at == datetime(2015, 2, 9, 11, 34, 19, tzinfo=tz0110)
    (dg,) = a03.diagnoses
    assert (dg.code, dg.coding_system, dg.diagnosis_type, dg.priority, dg.identifier, dg.action_code) == (
        "422504002", "SCT", "A", "1", "DI20", "A")


def test_ms_bar_p01():
    m = one("ms-fhir-converter/BAR-P01-01.hl7")
    assert m.diagnoses[0].code == "422504002"
    assert "PRT" in m.segment_names and "ACC" in m.segment_names


# ------------------------------------------------------------------ DFT / FT1


def test_ms_dft_p03_ft1_and_orders():
    m = one("ms-fhir-converter/DFT-P03-01.hl7")
    t1, t2 = m.transactions
    assert t1.set_id == "1" and t1.transaction_id == "12345"
    assert t1.transaction_date == datetime(2019, 11, 22) and t1.posting_date == datetime(2019, 11, 22)
    assert t1.transaction_type == "CG"
    assert (t1.code.code, t1.code.text, t1.code.coding_system) == ("71045", "Xray exam chest 1 view", "C4")
    assert t1.quantity == Decimal(2)
    assert (t1.amount_extended, t1.currency, t1.amount_unit) == (Decimal(100), "USD", Decimal(50))
    assert t1.department == "RAD-1"
    assert [d.code for d in t1.diagnoses] == ["29857009", "68235000"]
    assert t1.performed_by == "9941339108" and t1.procedure_code.code == "71045"
    assert (t2.code.code, t2.quantity, t2.amount_extended) == ("626.2", Decimal(1), Decimal(120))
    assert t2.procedure_code.text == "first op visit"
    assert [(d.code, d.diagnosis_type) for d in m.diagnoses] == [("29857009", "F"), ("68235000", "F")]
    (o,) = m.orders
    assert (o.order_control, o.placer_order_number, o.filler_order_number, o.order_status) == (
        "RE", "PLACER", "FILLER", "CM")
    assert o.service.code == "57698-3" and o.has_orc and o.has_obr


def test_ms_dft_p03_two_orders():
    m = one("ms-fhir-converter/DFT-P03-02.hl7")
    assert [(o.placer_order_number, o.filler_order_number) for o in m.orders] == [
        ("PLACER", "FILLER"), ("PLACER-2", "FILLER-2")]
    assert len(m.transactions) == 2


# ------------------------------------------------------------------ orders / results


def test_epic_orm_o01():
    m = one("cdc-trusted-intermediary/001_Epic_ORM_O01_dg1_in1_gt1.hl7")
    p = m.patient
    assert p.external_id.id == "E7082628" and p.external_id.type_code == "EPI"  # PID-2
    assert p.identifiers == []  # PID-3 empty in this feed
    assert p.birth_date is None and m.get("PID-7") == "DOB"
    assert any(w.code == "bad_timestamp" and w.field == "PID-7" for w in m.warnings)
    assert [(d.code, d.coding_system, d.diagnosis_type) for d in m.diagnoses] == [
        ("Z00.00", "ICD-10", None), ("E11.51", "ICD-10", None)]
    (o,) = m.orders
    assert (o.order_control, o.placer_order_number, o.placer_namespace, o.placer_group_number) == (
        "CA", "968906415", "EPIC", "968906412")
    assert o.service.code == "140285"


def test_epic_oru_r01_obr_without_orc():
    m = one("cdc-trusted-intermediary/002_Epic_ORU_R01.hl7")
    (o,) = m.orders
    assert not o.has_orc and o.has_obr
    assert (o.placer_order_number, o.placer_namespace) == ("1008303116", "EPC")
    assert (o.filler_order_number, o.filler_namespace) == ("23MAYO-265S0173", "Beaker")
    assert m.patient.identifiers[0].id == "MRN"
    assert m.segment_names.count("NTE") == 28


def test_oru_glucose():
    m = one("python-hl7/oru_r01_glucose_v24.hl7")
    assert m.patient.identifiers[0].id == "555-44-4444"
    assert m.patient.birth_date is None  # "196203520" is no date
    (o,) = m.orders
    assert (o.placer_order_number, o.filler_order_number) == ("845439", "1045813")
    assert (o.service.code, o.service.text) == ("1554-5", "GLUCOSE")
    assert o.observed_at == datetime(2002, 2, 15, 7, 30)
    assert m.get("OBX-5", occurrence=2) == "^182"


def test_micro_sign_utf8():
    m = one("cdc-trusted-intermediary/008_ORU_R01_micro_character_encoding.hl7")
    assert m.header.charset is None and m.charset == "utf-8"
    assert m.get("OBX-6") == "µmol/L"
    assert m.header.processing_id == "N"
    assert m.patient.identifiers[0].assigning_authority is None
    assert m.patient.identifiers[0].assigning_authority_id == "NPI"
    (o,) = m.orders
    assert (o.order_control, o.placer_order_number, o.placer_group_number) == ("RE", "7181233072", "189430284")


# ------------------------------------------------------------------ Z-segments (ZBE)


def test_orbis_mdm_with_deu_version_and_zbe():
    m = one("ipf/orbis_mdm_t01_v25deu_zbe.hl7")
    h = m.header
    assert h.version == "2.5" and h.version_country == "DEU"
    assert (h.accept_ack_type, h.application_ack_type, h.country_code) == ("NE", "NE", "DEU")
    assert h.charset == "UNICODE UTF-8" and m.charset == "utf-8"
    assert m.patient.identifiers[0].id == "156154"
    assert m.patient.names[0].name_type == "L"
    assert m.patient.birth_date == date(1992, 4, 26) and m.patient.sex == "F"
    assert m.visit is None
    assert m.movement.movement_id == "1234" and m.movement.started_at is None


def test_mdm_t02_zbe_start():
    m = one("ipf/mdm_t02_ed_base64_zbe.hl7")
    assert m.movement.movement_id == "1234"
    assert m.movement.started_at == datetime(2008, 1, 4, 12, 0)
    assert m.visit.visit_number.id == "333444555" and m.visit.admit_at == datetime(2007, 11, 14)
    assert m.get("OBX-5.3") == "text/rtf;charset=UTF8"


def test_oru_with_zbe_and_unknown_z_segment():
    m = one("ipf/oru_r01_v24_zbe_zyx.hl7")
    assert m.segment_names[-2:] == ["ZBE", "ZYX"]
    assert m.movement.movement_id == "1"
    assert m.movement.started_at is None  # ZBE-2 is "2" here
    codes = {w.code for w in m.warnings}
    assert "unknown_charset" in codes  # MSH-18 is "code1~code2" in this sample
    assert [i.id for i in m.patient.identifiers] == ["HL007545P", "ID2"]
    assert m.patient.account_number.id == "0007111"
    assert [(o.placer_order_number, o.filler_order_number) for o in m.orders] == [
        ("0007111", "HL007545P"), ("0007111", "HL007545P")]
    assert m.get("OBX-5[3]") == "300"


def test_zbe_action_values():
    base = fixture_bytes("ipf/sap-ish_adt_a01_v25.hl7").rstrip(b"\r")
    for raw, expected in [(b"DELETE", MovementAction.DELETE), (b"insert", MovementAction.INSERT),
                          (b"UPDATE", MovementAction.UPDATE), (b"CANCEL", MovementAction.CANCEL)]:
        m = parse_message(base + b"\rZBE|4711^KIS|20240301101500||" + raw + b"|N|A02|^^^^^^^^^CHIR\r")
        assert m.movement.action == expected
        assert (m.movement.movement_id, m.movement.movement_namespace) == ("4711", "KIS")
        assert m.movement.started_at == datetime(2024, 3, 1, 10, 15)
        assert m.movement.historic is False and m.movement.original_trigger == "A02"
        assert m.movement.responsible_ward == "CHIR"
    m = parse_message(base + b"\rZBE|1|20240301||MOVE\r")
    assert m.movement.action is None and any(w.code == "bad_movement_action" for w in m.warnings)


# ------------------------------------------------------------------ batches


def test_batch_one_message():
    b = parse_batch(fixture_bytes("python-hl7/batch_bhs_adt_a04_1msg.hl7"))
    assert isinstance(b, Hl7Batch)
    assert b.file_header is None and len(b.batch_headers) == 1
    (m,) = b.ok
    assert m.header.charset == "ASCII" and m.charset == "ascii"
    assert (m.patient.identifiers[0].id, m.patient.identifiers[0].assigning_authority,
            m.patient.identifiers[0].type_code) == ("0000112234", "100", "A")
    assert m.visit.patient_class == "O" and m.visit.attending_doctor_id is None
    assert b.warnings == []


def test_batch_file_with_two_batches():
    b = parse_batch(fixture_bytes("python-hl7/file_fhs_2batches_adt_a04.hl7"))
    assert isinstance(b, Hl7Batch)
    assert b.file_header.fields[10] == "abchs20070101123401.hl7"  # FHS-10 file name
    assert [h.fields[11] for h in b.batch_headers] == ["abchs20070101123401-1", "abchs20070101123401-2"]
    assert [m.control_id for m in b.ok] == ["12334456778890", "12334456778891", "12334456778890"]
    assert b.failed == [] and b.warnings == []


def test_cdc_batch_without_trailers_warns():
    b = parse_batch(fixture_bytes("cdc-trusted-intermediary/005_AL_ORU_R01_fhs_bhs_batch.hl7"))
    assert {w.code for w in b.warnings} == {"batch_unclosed", "file_unclosed"}
    (m,) = b.ok
    assert m.header.sending_facility == "Any facility USA"
    assert m.header.charset == "UNICODE UTF-8"
    pid = m.patient.identifiers[0]
    assert (pid.id, pid.assigning_authority, pid.assigning_authority_id) == ("ty6vmz", "Any lab USA", "00D1063590")
    # one ORC with five OBRs: the first OBR belongs to the ORC, each further OBR is an order
    assert len(m.orders) == 5 and m.orders[0].has_orc and not m.orders[1].has_orc
    assert {o.placer_order_number for o in m.orders} == {"094127"}
