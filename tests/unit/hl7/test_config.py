"""Interface configuration, mapping-table precedence and the import decisions."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydantic import ValidationError

from protocols.hl7 import (
    CaseCreation,
    CaseScope,
    CaseType,
    ErrorCode,
    FileDropSettings,
    FrameDecoder,
    FramingSettings,
    Hl7Error,
    Hl7InterfaceConfig,
    Hl7Message,
    IdFieldChoice,
    MappingRow,
    MappingTable,
    billable_diagnoses,
    decide_import,
    parse_message,
    purge_due,
    resolve_billing_unit,
    resolve_ids,
)

from ._files import fixture_bytes


def seg(name: str, fields: dict[int, str]) -> str:
    n = max(fields)
    return "|".join([name] + [fields.get(i, "") for i in range(1, n + 1)]) + "\r"


def adt(patient_class="O", contract="GKV", area="NOTF", discipline="CHIR", service="", extra=""):
    text = (
        "MSH|^~\\&|KIS|KLINIK|DURIA|PRAX1|20240301101500||ADT^A01^ADT_A01|MSG1|P|2.5\r"
        "EVN|A01|20240301101500\r"
        + seg("PID", {1: "1", 2: "S-77^^^SMS", 3: "4711^^^Klinik^PI~99^^^KV^KVNR", 18: "A-123^^^Klinik^AN"})
        + seg("PV1", {1: "1", 2: patient_class, 3: f"{area}^^^{discipline}", 10: service,
                      19: "0815^^^Klinik^VN", 24: contract})
        + extra
    )
    m = parse_message(text)
    assert isinstance(m, Hl7Message), m
    return m


TABLE = MappingTable(rows=[
    MappingRow(billing_unit="PRAX1"),  # catch-all
    MappingRow(patient_class="O", billing_unit="PRAX2", case_type=CaseType.STATUTORY),
    MappingRow(patient_class="O", contract_code="BG", billing_unit="PRAX3", case_type=CaseType.BG),
    MappingRow(patient_class="O", contract_code="BG", function_area="NOTF", discipline="CHIR", billing_unit="PRAX4"),
    MappingRow(patient_class="I", contract_code="PKV", function_area=" ", discipline="", billing_unit="PRAX5",
               case_type=CaseType.PRIVATE),
])


@pytest.mark.parametrize(
    "pc, contract, area, disc, unit",
    [
        ("O", "GKV", "NOTF", "CHIR", "PRAX2"),  # only patient class specific
        ("O", "BG", "AMB", "INN", "PRAX3"),  # class + contract beat class alone
        ("O", "BG", "NOTF", "CHIR", "PRAX4"),  # fully specific wins
        ("I", "PKV", "STAT1", "INN", "PRAX5"),  # blank in the mask = any
        ("I", "GKV", "STAT1", "INN", "PRAX1"),  # falls back to the catch-all
        ("", "", "", "", "PRAX1"),  # empty fields match only wildcards
    ],
)
def test_most_specific_row_wins(pc, contract, area, disc, unit):
    m = adt(pc, contract, area, disc)
    match = resolve_billing_unit(m, TABLE)
    assert not isinstance(match, Hl7Error), match
    assert match.billing_unit == unit
    assert TABLE.rows[match.row_index].billing_unit == unit


def test_wildcard_normalisation():
    row = MappingRow(patient_class=" ", contract_code="", function_area=None, discipline="*", billing_unit=" P1 ")
    assert row.key() == ("*", "*", "*", "*") and row.billing_unit == "P1" and row.specificity == 0


def test_no_match_is_unknown_billing_unit():
    table = MappingTable(rows=[MappingRow(patient_class="I", billing_unit="STAT")])
    e = resolve_billing_unit(adt("O", "GKV"), table)
    assert isinstance(e, Hl7Error) and e.code == ErrorCode.UNKNOWN_BILLING_UNIT
    assert "unknown billing unit" in e.reason and "O/GKV/NOTF/CHIR" in e.reason
    assert e.severity == "error" and e.control_id == "MSG1"  # answered AE
    assert resolve_billing_unit(adt(), MappingTable()).code == ErrorCode.UNKNOWN_BILLING_UNIT


def test_equally_specific_rows_with_different_units_are_ambiguous():
    table = MappingTable(rows=[
        MappingRow(patient_class="O", billing_unit="A"),
        MappingRow(contract_code="GKV", billing_unit="B"),
    ])
    e = resolve_billing_unit(adt("O", "GKV"), table)
    assert e.code == ErrorCode.AMBIGUOUS_BILLING_UNIT and "A, B" in e.reason
    same = MappingTable(rows=[
        MappingRow(patient_class="O", billing_unit="A"),
        MappingRow(contract_code="GKV", billing_unit="A"),
    ])
    assert resolve_billing_unit(adt("O", "GKV"), same).billing_unit == "A"


def test_duplicate_rows_are_a_config_error():
    with pytest.raises(ValidationError, match="same key"):
        MappingTable(rows=[MappingRow(patient_class="O", billing_unit="A"),
                           MappingRow(patient_class="O", function_area=" ", billing_unit="B")])


def test_configurable_source_fields():
    table = MappingTable(discipline_field="PV1-10", rows=[
        MappingRow(discipline="UCH", billing_unit="UNFALL"),
        MappingRow(billing_unit="REST"),
    ])
    assert resolve_billing_unit(adt(service="UCH"), table).billing_unit == "UNFALL"
    assert resolve_billing_unit(adt(service="INN"), table).billing_unit == "REST"
    with pytest.raises(ValidationError):
        MappingTable(discipline_field="PV1-x")


def test_sap_fixture_through_mapping():
    m = parse_message(fixture_bytes("ipf/sap-ish_adt_a01_v25.hl7"))
    table = MappingTable(rows=[MappingRow(patient_class="I", function_area="ISKA", billing_unit="STATION")])
    assert resolve_billing_unit(m, table).billing_unit == "STATION"


# ------------------------------------------------------------------ patient / case fields


@pytest.mark.parametrize(
    "choice, patient, case",
    [
        (IdFieldChoice.PROSIGHT, "4711", "A-123"),
        (IdFieldChoice.SMS, "S-77", "0815"),
        (IdFieldChoice.MEDICO, "4711", "0815"),
    ],
)
def test_id_field_choices(choice, patient, case):
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, id_fields=choice)
    ids = resolve_ids(adt(), cfg)
    assert (ids.patient_number, ids.case_number) == (patient, case)
    assert (ids.patient_field, ids.case_field) == tuple(choice.value.split("/"))


def test_patient_id_type_selects_repetition():
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, patient_id_type="KVNR")
    assert resolve_ids(adt(), cfg).patient_number == "99"
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, patient_id_type="XX")
    e = resolve_ids(adt(), cfg)
    assert e.code == ErrorCode.MISSING_FIELD and e.field == "PID-3" and "XX" in e.reason


def test_missing_configured_field_is_an_error():
    m = parse_message(fixture_bytes("cdc-trusted-intermediary/001_Epic_ORM_O01_dg1_in1_gt1.hl7"))
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575})
    e = resolve_ids(m, cfg)  # PID-3 empty in this feed
    assert e.code == ErrorCode.MISSING_FIELD and e.field == "PID-3"
    sms = cfg.model_copy(update={"id_fields": IdFieldChoice.SMS})
    e = resolve_ids(m, sms)  # PID-2 there, but no PV1
    assert e.code == ErrorCode.MISSING_FIELD and e.field == "PV1-19"
    prosight = cfg.model_copy(update={"id_fields": IdFieldChoice.PROSIGHT})
    assert resolve_ids(m, prosight).code == ErrorCode.MISSING_FIELD


# ------------------------------------------------------------------ config validation


def test_purge_period_minimum_ten_days():
    base = dict(name="kis", transport="tcp", tcp={"port": 2575})
    assert Hl7InterfaceConfig(**base, purge_after_days=10).purge_after_days == 10
    with pytest.raises(ValidationError, match="greater than or equal to 10"):
        Hl7InterfaceConfig(**base, purge_after_days=9)
    assert Hl7InterfaceConfig(**base).purge_after_days is None


def test_purge_due():
    base = dict(name="kis", transport="tcp", tcp={"port": 2575})
    cfg = Hl7InterfaceConfig(**base, purge_after_days=10, case_creation=CaseCreation.YES)
    t0 = datetime(2024, 3, 1)
    assert not purge_due(t0, t0 + timedelta(days=9, hours=23), cfg)
    assert purge_due(t0, t0 + timedelta(days=10), cfg)
    all_bg = cfg.model_copy(update={"case_creation": CaseCreation.ALL_BACKGROUND})
    assert not purge_due(t0, t0 + timedelta(days=100), all_bg)  # "hat keine Bedeutung"
    assert not purge_due(t0, t0 + timedelta(days=100), Hl7InterfaceConfig(**base))


def test_transport_settings_must_match():
    with pytest.raises(ValidationError, match="tcp settings"):
        Hl7InterfaceConfig(name="kis", transport="tcp")
    with pytest.raises(ValidationError, match="file settings"):
        Hl7InterfaceConfig(name="kis", transport="file")
    cfg = Hl7InterfaceConfig(name="kis", transport="file",
                             file={"directory": "/in", "wildcard": "*.HL7", "archive_directory": "/in/archiv"})
    assert cfg.file.wildcard == "*.HL7"
    with pytest.raises(ValidationError, match="differ"):
        FileDropSettings(directory="/in", archive_directory="/in/")
    with pytest.raises(ValidationError, match="wildcard"):
        FileDropSettings(directory="/in", archive_directory="/arch", wildcard="sub/*.hl7")


def test_case_per_order_needs_order_interface():
    with pytest.raises(ValidationError, match="order_interface"):
        Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, case_per_order_segment=True)
    Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575}, case_per_order_segment=True,
                       order_interface=True)


def test_other_validation():
    base = dict(name="kis", transport="tcp", tcp={"port": 2575})
    with pytest.raises(ValidationError):
        Hl7InterfaceConfig(**base, charset="klingon")
    with pytest.raises(ValidationError):
        Hl7InterfaceConfig(name="bad name!", transport="tcp", tcp={"port": 2575})
    with pytest.raises(ValidationError):
        Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 0})
    with pytest.raises(ValidationError):
        Hl7InterfaceConfig(**base, store_patient_number_in="S1", store_case_number_in="S1")


def test_framing_settings_from_ascii_codes():
    fs = FramingSettings(start_char=2, end_char=3, after_end_char=None, segment_separator=10)
    f = fs.to_framing()
    assert (f.start, f.end, f.after_end, f.segment_sep) == (b"\x02", b"\x03", b"", b"\n")
    (frame,) = FrameDecoder(f).feed(b"\x02MSH|^~\\&|\n\x03")
    assert frame.payload == b"MSH|^~\\&|\n"
    assert FramingSettings().to_framing().start == b"\x0b"
    with pytest.raises(ValidationError):
        FramingSettings(start_char=0x1C)  # same as the end char
    with pytest.raises(ValidationError):
        FramingSettings(end_char=300)


def test_config_round_trips_as_json():
    cfg = Hl7InterfaceConfig(
        name="kis", transport="tcp", tcp={"port": 2575, "framing": {"after_end_char": None}},
        id_fields="PID-2/PV1-19", case_creation="background", case_scope="per_order",
        discharge_diagnosis_types={"F", "EN"}, diagnosis_case_types={"statutory"}, purge_after_days=30,
        mapping={"rows": [{"patient_class": "O", "billing_unit": "PRAX1"}]},
    )
    again = Hl7InterfaceConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.id_fields is IdFieldChoice.SMS and again.tcp.framing.to_framing().after_end == b""


# ------------------------------------------------------------------ decisions


DG1 = (
    seg("DG1", {1: "1", 3: "S52.5^Fraktur Radius^I10-2024", 6: "A", 15: "2"})
    + seg("DG1", {1: "2", 3: "S52.5^Fraktur Radius^I10-2024", 6: "F", 15: "1"})
    + seg("DG1", {1: "3", 3: "W01.9^Sturz^I10-2024", 6: "F", 15: "2", 21: "D"})
    + seg("DG1", {1: "4", 3: "Z96.6^Endoprothese^I10-2024", 6: "EN", 15: "3"})
)


def test_only_discharge_diagnoses_are_billed():
    m = adt(extra=DG1)
    cfg = Hl7InterfaceConfig(name="kis", transport="tcp", tcp={"port": 2575})
    assert [d.set_id for d in billable_diagnoses(m, cfg, None)] == ["2"]  # F, not deleted
    de = cfg.model_copy(update={"discharge_diagnosis_types": frozenset({"F", "EN"})})
    billed = billable_diagnoses(m, de, CaseType.STATUTORY)
    assert [d.code for d in billed] == ["S52.5", "Z96.6"] and billed[0].is_primary
    kasse_only = de.model_copy(update={"diagnosis_case_types": frozenset({CaseType.STATUTORY})})
    assert billable_diagnoses(m, kasse_only, CaseType.BG) == []


def test_decide_import():
    base = dict(name="kis", transport="tcp", tcp={"port": 2575}, mapping=TABLE)
    m = adt("O", "BG", "AMB", "INN", extra=DG1)
    d = decide_import(m, Hl7InterfaceConfig(**base))
    assert (d.create_case, d.case_keys, d.billing.billing_unit) == (False, [], "PRAX3")
    d = decide_import(m, Hl7InterfaceConfig(**base, case_creation="yes"))
    assert d.create_case and d.interactive and d.case_keys == ["PRAX3/0815"]
    assert [x.set_id for x in d.diagnoses] == ["2"]
    d = decide_import(m, Hl7InterfaceConfig(**base, case_creation="background", case_scope=CaseScope.PER_ORDER))
    assert not d.interactive and d.case_keys == ["0815"]
    per_orc = Hl7InterfaceConfig(**base, case_creation="background", order_interface=True,
                                 case_per_order_segment=True)
    e = decide_import(m, per_orc)
    assert isinstance(e, Hl7Error) and e.code == ErrorCode.MISSING_SEGMENT and e.segment == "ORC"
    with_orders = adt("O", "BG", "AMB", "INN", extra="ORC|NW|A1^KIS\rOBR|1|A1^KIS\rORC|NW|A2^KIS\r")
    assert decide_import(with_orders, per_orc).case_keys == ["PRAX3/0815/A1", "PRAX3/0815/A2"]
    unknown = decide_import(adt("X"), Hl7InterfaceConfig(**base | {"mapping": MappingTable()}))
    assert unknown.code == ErrorCode.UNKNOWN_BILLING_UNIT
