"""eAU payload: every KBV example in fixtures/kim/eau, the two faulty ones included."""

from __future__ import annotations

import re
from datetime import date

import pytest

from protocols.kim.answers import parse_fehler_nachricht
from protocols.kim.eau import (
    EauIssueCode,
    EauKind,
    PayloadErrorCode,
    PayloadType,
    detect_payload_type,
    parse_eau,
    validate_eau,
)
from protocols.kim.errors import EauError
from .conftest import fixture_files

# file → (kind, identifier uuid, AU type, KVNR, IK, practitioner id type, organization id type,
#         number of ICD diagnoses, AU start, AU end)
EXPECTED = {
    "Beispiel_1-eAU_ERST_GKV.xml": (EauKind.LIEFERUNG, "c038e978-a9f4-4656-b889-737b5c444cc9", "ERST", "X234567890", "104212059", "LANR", "BSNR", 4, date(2020, 2, 3), date(2020, 2, 28)),
    "Beispiel_15-eAU_ERST_GKV_Zahnarzt.xml": (EauKind.LIEFERUNG, "c038e978-a9f4-4656-b889-737b5c444cc9", "ERST", "X234567890", "104212059", "ZANR", "KZVA", 4, date(2020, 2, 3), date(2020, 2, 28)),
    "Beispiel_2-eAU_FOLGE_GKV.xml": (EauKind.LIEFERUNG, "2ed6995a-ddcb-4af9-af62-80dac413408b", "FOLGE", "X234567890", "104212059", "LANR", "BSNR", 6, None, date(2022, 10, 10)),
    "Beispiel_3-eAU_ERST_END_GKV.xml": (EauKind.LIEFERUNG, "a179dd37-8252-4b42-b89e-2a3dbdb89892", "ERST_END", "X234567890", "104212059", "LANR", "BSNR", 4, date(2020, 2, 3), date(2020, 2, 28)),
    "Beispiel_5-eAU_ERST_PKV.xml": (EauKind.LIEFERUNG, "28b4cfbc-e4cf-5c84-94bc-f903d1e9e40f", "ERST", "P123464113", "123456789", "LANR", "BSNR", 6, date(2022, 9, 29), date(2022, 10, 6)),
    "EEAU0_08b97c0c-6b65-4f33-a985-66ffd6fb2322.xml": (EauKind.LIEFERUNG, "08b97c0c-6b65-4f33-a985-66ffd6fb2322", "FOLGE", "X234567890", "104212059", "ZANR", "KZVA", 6, None, date(2025, 11, 15)),
    "Beispiel_Storno.xml": (EauKind.STORNO, "03687cfc-88ee-48e0-89d4-6d3673ab04cf", None, None, None, "LANR", "BSNR", 0, None, None),
}


@pytest.mark.parametrize("path", fixture_files("eau/*.xml"), ids=lambda p: p.name)
def test_every_eau_fixture(path):
    data = path.read_bytes()
    assert detect_payload_type(data) is PayloadType.FHIR_XML
    if path.name.startswith("Beispiel_eAU_Fehler_"):
        # Not an eAU at all: these are the insurer's answers (Fehlernachricht Kasse → Arzt,
        # OperationOutcome KBV_PR_EAU_health_insurance_Practitioner). Fed to the eAU
        # parser they are the wrong resource.
        with pytest.raises(EauError) as ei:
            parse_eau(data)
        assert ei.value.code == PayloadErrorCode.WRONG_RESOURCE
        assert ei.value.detail["resource"] == "OperationOutcome"
        return
    kind, ident, au_type, kvnr, ik, ptype, otype, n_icd, start, end = EXPECTED[path.name]
    doc = parse_eau(data)
    assert doc.kind is kind
    assert doc.identifier == f"urn:uuid:{ident}" and doc.identifier_uuid == ident
    assert doc.profile_version == "1.2"
    assert doc.au_type == au_type
    assert doc.practitioner.id_type == ptype and re.fullmatch(r"[0-9]{9}", doc.practitioner.number)
    assert doc.organization.id_type == otype and re.fullmatch(r"[0-9]{9}", doc.organization.number)
    assert len(doc.diagnoses) == n_icd
    assert validate_eau(doc) == []
    if kind is EauKind.STORNO:
        assert doc.patient is None and doc.au is None and doc.formular_art == "e013"
        return
    assert doc.formular_art == "e010"
    assert doc.patient.kvnr == kvnr and doc.patient.family and doc.patient.birth_date
    assert doc.coverage.insurer_ik == ik
    assert (doc.au.start, doc.au.end) == (start, end)
    assert doc.is_folge == au_type.startswith("FOLGE") and doc.is_erst == au_type.startswith("ERST")
    assert all(d.version for d in doc.diagnoses)


def test_first_example_in_detail(kim_fixtures):
    doc = parse_eau((kim_fixtures / "eau" / "Beispiel_1-eAU_ERST_GKV.xml").read_bytes())
    assert doc.patient.name == "Ludger Königsstein"
    assert doc.coverage.insurer_name == "AOK Rheinland/Hamburg" and doc.coverage.kind == "GKV"
    assert [(d.code, d.diagnosesicherheit, d.seitenlokalisation) for d in doc.diagnoses] == [
        ("E10.20", "G", None),
        ("N08.3", "G", None),
        ("S42.3", "G", "L"),
        ("S82.28", "G", "R"),
    ]
    assert doc.au.asserted == date(2020, 2, 3)
    assert doc.practitioner.family == "Müller" and doc.practitioner.prefix == "Dr. med."


def test_pkv_example_has_telematik_ids(kim_fixtures):
    doc = parse_eau((kim_fixtures / "eau" / "Beispiel_5-eAU_ERST_PKV.xml").read_bytes())
    assert doc.coverage.kind == "PKV"
    assert doc.practitioner.telematik_id == "1-748382202"
    assert doc.organization.telematik_id == "1-749999999"


def test_storno_cancels_the_folgebescheinigung(kim_fixtures):
    storno = parse_eau((kim_fixtures / "eau" / "Beispiel_Storno.xml").read_bytes(), expect=EauKind.STORNO)
    folge = parse_eau((kim_fixtures / "eau" / "Beispiel_2-eAU_FOLGE_GKV.xml").read_bytes())
    assert storno.is_storno and storno.cancelled_identifier == folge.identifier


def test_faulty_examples_are_error_answers(kim_fixtures):
    """What is 'wrong' with Beispiel_eAU_Fehler_*: they are OperationOutcomes (code 301
    naming a KIM Message-ID, code 100 naming a Bundle-Identifier), not eAU bundles."""
    f1 = parse_fehler_nachricht((kim_fixtures / "eau" / "Beispiel_eAU_Fehler_1.xml").read_bytes())
    assert f1.profile == "https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_health_insurance_Practitioner|1.2"
    assert (f1.severity, f1.code) == ("fatal", "301")
    assert f1.code_system == "https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_EAU_AU_ERROR_KASSE"
    assert f1.message_id == "96d6a790-afc2-4556-ab73-301e51a7bf30@kim.de" and f1.bundle_identifier is None
    assert "Stornomeldung" in f1.display
    f2 = parse_fehler_nachricht((kim_fixtures / "eau" / "Beispiel_eAU_Fehler_2.xml").read_bytes())
    assert (f2.severity, f2.code) == ("fatal", "100")
    assert f2.bundle_identifier == "urn:uuid:96d6a790-afc2-4556-ab73-301e51a7bf30" and f2.message_id is None
    assert "nicht bei der adressierten Krankenkasse versichert" in f2.display


# ---------------------------------------------------------------------------- technical faults


@pytest.fixture(scope="module")
def eau_xml() -> str:
    paths = fixture_files("eau/Beispiel_1-eAU_ERST_GKV.xml")
    if not paths:
        pytest.fail("fixtures missing (fixtures/ in the repository)")
    return paths[0].read_text(encoding="utf-8")


def _code(data: bytes, **kw) -> tuple[str, dict]:
    with pytest.raises(EauError) as ei:
        parse_eau(data, **kw)
    assert ei.value.reason and ei.value.fault().domain == "eau"
    return ei.value.code, ei.value.detail


def _drop_entry(xml: str, resource: str) -> str:
    return re.sub(r"<entry>\s*<fullUrl[^>]*/" + resource + r"/[^>]*>.*?</entry>", "", xml, flags=re.DOTALL)


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", PayloadErrorCode.NOT_XML),
        (b"not xml at all", PayloadErrorCode.NOT_XML),
        (b"<Bundle xmlns='http://hl7.org/fhir'><id value='1'/>", PayloadErrorCode.NOT_XML),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Bundle xmlns="http://hl7.org/fhir">&a;</Bundle>', PayloadErrorCode.NOT_XML),
        (b"%PDF-1.4 binary", PayloadErrorCode.NOT_XML),
        (b"<Bundle><id value='1'/></Bundle>", PayloadErrorCode.NOT_FHIR),
        (b"<au:Bescheinigung xmlns:au='urn:legacy'/>", PayloadErrorCode.NOT_FHIR),
        (b"<Patient xmlns='http://hl7.org/fhir'><id value='1'/></Patient>", PayloadErrorCode.WRONG_RESOURCE),
        (b"<Bundle xmlns='http://hl7.org/fhir'><id value='1'/></Bundle>", PayloadErrorCode.WRONG_PROFILE),
    ],
)
def test_technical_faults_are_distinguished(data, code):
    assert _code(data)[0] == code


def test_wrong_profile(eau_xml):
    code, detail = _code(eau_xml.replace("KBV_PR_EAU_Bundle|1.2", "KBV_PR_ERP_Bundle|1.1.0").encode())
    assert code == PayloadErrorCode.WRONG_PROFILE and "KBV_PR_ERP_Bundle" in detail["profile"]
    code, _ = _code(eau_xml.encode(), expect=EauKind.STORNO)
    assert code == PayloadErrorCode.WRONG_PROFILE


@pytest.mark.parametrize(
    "mutate,element",
    [
        (lambda x: re.sub(r"<identifier>\s*<system value=\"urn:ietf:rfc:3986\" />\s*<value[^>]*/>\s*</identifier>", "", x, count=1), "Bundle.identifier"),
        (lambda x: x.replace("<Composition ", "<Basic ").replace("</Composition>", "</Basic>"), "Composition"),
        (lambda x: _drop_entry(x, "Patient"), "Patient"),
        (lambda x: _drop_entry(x, "Practitioner"), "Practitioner"),
        (lambda x: _drop_entry(x, "Organization"), "Organization"),
        (lambda x: _drop_entry(x, "Coverage"), "Coverage"),
        (lambda x: x.replace('<end value="2020-02-28" />', ""), "Condition(AU).onsetPeriod.end"),
        (lambda x: x.replace("KBV_CS_EAU_AU_Type", "Other_Type"), "Composition.type (KBV_CS_EAU_AU_Type)"),
        (lambda x: re.sub(r'<family value="Königsstein">.*?</family>', "", x, count=1, flags=re.DOTALL), "Patient.name.family"),
        (lambda x: x.replace('<system value="http://fhir.de/sid/arge-ik/iknr" />\n\t\t\t\t\t\t<value value="104212059" />', ""), "Coverage.payor.identifier"),
    ],
)
def test_missing_mandatory_element_is_named(eau_xml, mutate, element):
    mutated = mutate(eau_xml)
    assert mutated != eau_xml
    code, detail = _code(mutated.encode())
    assert code == PayloadErrorCode.MISSING_ELEMENT
    assert detail["element"] == element


def test_missing_au_condition(eau_xml):
    mutated = re.sub(r"<entry>\s*<fullUrl[^>]*/Condition/2f8638b4[^>]*>.*?</entry>", "", eau_xml, flags=re.DOTALL)
    assert _code(mutated.encode())[1]["element"] == "Condition(AU)"


# ---------------------------------------------------------------------------- business validation


def test_business_validation_is_separate(eau_xml):
    doc = parse_eau(eau_xml.encode())

    def issues(**changes):
        return {i.code for i in validate_eau(doc.model_copy(update=changes, deep=True))}

    assert issues() == set()
    assert issues(au=doc.au.model_copy(update={"end": date(2020, 1, 1)})) == {EauIssueCode.PERIOD_END_BEFORE_START}
    assert issues(au=doc.au.model_copy(update={"start": None})) == {EauIssueCode.PERIOD_START_MISSING}
    assert issues(patient=doc.patient.model_copy(update={"kvnr": "x234567890"})) == {EauIssueCode.KVNR_FORMAT}
    assert issues(patient=doc.patient.model_copy(update={"kvnr": "X23456789"})) == {EauIssueCode.KVNR_FORMAT}
    assert issues(patient=doc.patient.model_copy(update={"kvnr": None})) == {EauIssueCode.KVNR_MISSING}
    assert issues(coverage=doc.coverage.model_copy(update={"insurer_ik": "10421205"})) == {EauIssueCode.IK_FORMAT}
    assert issues(diagnoses=[]) == {EauIssueCode.DIAGNOSIS_MISSING}
    bad_icd = [d.model_copy(update={"code": c}) for d, c in zip(doc.diagnoses, ("E1020", "XX.1", "e10.2", "S82.28"))]
    found = validate_eau(doc.model_copy(update={"diagnoses": bad_icd}))
    assert [i.element for i in found] == ["Condition(ICD)[0].code", "Condition(ICD)[1].code", "Condition(ICD)[2].code"]
    assert issues(practitioner=doc.practitioner.model_copy(update={"number": "12345"})) == {EauIssueCode.LANR_FORMAT}
    assert issues(organization=doc.organization.model_copy(update={"number": "A12345678"})) == {EauIssueCode.BSNR_FORMAT}
    # a business finding never carries personal data in its reason
    for i in validate_eau(doc.model_copy(update={"patient": doc.patient.model_copy(update={"kvnr": "bad"})})):
        assert "bad" not in i.reason and "Königsstein" not in i.reason


# ---------------------------------------------------------------------------- payload type


@pytest.mark.parametrize(
    "data,ptype",
    [
        (b"", PayloadType.EMPTY),
        (b'<?xml version="1.0"?>\n<!-- c --><Bundle xmlns="http://hl7.org/fhir"/>', PayloadType.FHIR_XML),
        (b'<au:X xmlns:au="urn:x"/>', PayloadType.XML),
        (b'{"resourceType": "OperationOutcome"}', PayloadType.FHIR_JSON),
        (b'{"a": 1}', PayloadType.JSON),
        (b"%PDF-1.7\n", PayloadType.PDF),
        (b"\x30\x82\x01\x00", PayloadType.CMS),
        (b"Sehr geehrte Damen und Herren", PayloadType.TEXT),
        (b"\xff\xfe\x00\x01\x02", PayloadType.BINARY),
    ],
)
def test_detect_payload_type(data, ptype):
    assert detect_payload_type(data) is ptype


@pytest.mark.parametrize("path", fixture_files("fhir-json/*.json"), ids=lambda p: p.name)
def test_json_bundles_are_fhir_json_not_xml(path):
    data = path.read_bytes()
    assert detect_payload_type(data) is PayloadType.FHIR_JSON
    assert _code(data)[0] == PayloadErrorCode.NOT_XML
