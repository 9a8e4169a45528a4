"""eEB Anfrage parsing (all gematik samples) and the Bescheinigung / Fehler answers."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from protocols.kim.answers import parse_fehler_nachricht
from protocols.kim.compose import MDN_HEADERS
from protocols.kim.eau import PayloadErrorCode
from protocols.kim.eeb import (
    EebBescheinigungData,
    EebFehlerCode,
    build_eeb_bescheinigung_mail,
    build_eeb_fehler_mail,
    parse_eeb_anfrage,
)
from protocols.kim.errors import AnswerError, EebError
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import unwrap_cms, verify_cms
from protocols.kim.procedures import Procedure, classify
from .conftest import fixture_files

# p7s sample (uuid suffix) → (known patient, KVNR, family, Leistungsdatum)
P7S = {
    "555": (True, "T555558879", None, date(2022, 12, 14)),
    "600": (True, "T029653290", None, date(2022, 11, 22)),
    "700": (True, "T029653290", None, date(2022, 12, 13)),
    "701": (True, "T029653290", "TK-eAU-Müller", date(2022, 12, 11)),
    "800": (False, None, "TK-eAU-Schmidt", date(2022, 12, 6)),
    "801": (False, None, "TK-eAU-Schmidt", date(2022, 12, 7)),
    "900": (True, "T029653290", None, date(2022, 12, 13)),
}


@pytest.mark.parametrize("path", fixture_files("p7s/*.p7s"), ids=lambda p: p.name)
def test_every_p7s_anfrage(path):
    anf = parse_eeb_anfrage(unwrap_cms(path.read_bytes()).content)
    known, kvnr, family, leistung = P7S[path.stem[-3:]]
    assert anf.request_uuid == path.stem.split("_", 2)[2]  # file name carries the request UUID
    assert anf.patient.known is known
    assert anf.patient.kvnr == kvnr
    assert anf.patient.family == family
    if not known:
        assert anf.patient.birth_date == date(1991, 1, 4) and anf.patient.given == "Wolfgang"
    assert anf.leistungsdatum == leistung
    assert anf.einverstaendnis is True
    assert anf.organization and anf.organization.bsnr


def test_extracted_anfrage(kim_fixtures):
    anf = parse_eeb_anfrage((kim_fixtures / "extracted" / "eeb-anfrage.signed-content.xml").read_bytes())
    assert anf.identifier == "urn:uuid:90c9ae58-5a9d-4861-b77d-665d10b2789d"
    assert anf.request_uuid == "90c9ae58-5a9d-4861-b77d-665d10b2789d"
    assert anf.insurer_ik == "101575519"
    assert anf.profile.endswith("/EEBAnfrageBundle")
    assert anf.organization.name == "Praxis Bülow-Bogen" and anf.organization.bsnr == "012345678"
    assert anf.timestamp == datetime.fromisoformat("2023-04-17T16:35:55.941+02:00")


def test_telematik_id_of_the_practice(kim_fixtures):
    data = unwrap_cms((kim_fixtures / "p7s" / "TEEB0_ANF_e71108ff-a936-44fa-9d7d-215a09428900.p7s").read_bytes()).content
    assert parse_eeb_anfrage(data).organization.telematik_id == "1-SMC-B-Testkarte-883110000095977"


def test_wrong_payloads(kim_fixtures):
    with pytest.raises(EebError) as ei:
        parse_eeb_anfrage((kim_fixtures / "extracted" / "eeb-bescheinigung.signed-content.xml").read_bytes())
    assert ei.value.code == PayloadErrorCode.WRONG_PROFILE
    with pytest.raises(EebError) as ei:
        parse_eeb_anfrage((kim_fixtures / "extracted" / "eeb-fehler.attachment.xml").read_bytes())
    assert ei.value.code == PayloadErrorCode.WRONG_RESOURCE
    with pytest.raises(EebError) as ei:
        parse_eeb_anfrage(b"\x00garbage")
    assert ei.value.code == PayloadErrorCode.NOT_XML
    xml = (kim_fixtures / "extracted" / "eeb-anfrage.signed-content.xml").read_text(encoding="utf-8")
    no_patient = xml[: xml.index("<entry><fullUrl value=\"https://easyti.ehex.de/fhir/Patient")] + xml[xml.index("<entry><fullUrl value=\"https://easyti.ehex.de/fhir/Organization"):]
    with pytest.raises(EebError) as ei:
        parse_eeb_anfrage(no_patient.encode())
    assert (ei.value.code, ei.value.element) == (PayloadErrorCode.MISSING_ELEMENT, "Patient")


def test_fixture_fehler_attachment_parses():
    path = fixture_files("extracted/eeb-fehler.attachment.xml")
    if not path:
        pytest.fail("fixtures missing (fixtures/ in the repository)")
    f = parse_fehler_nachricht(path[0].read_bytes())
    assert (f.code, f.severity) == ("101", "fatal")
    assert f.message_id == "561160987.8.1671194866195@localhost"


@pytest.fixture()
def request_mail(kim_fixtures):
    return parse_mail((kim_fixtures / "eeb-anfrage.eml").read_bytes())


def _no_mdn(raw: bytes) -> None:
    headers = raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    for h in MDN_HEADERS:
        assert f"\n{h}:" not in "\n" + headers


def test_bescheinigung_answer(request_mail, pki):
    anf = parse_eeb_anfrage(unwrap_cms(request_mail.single_attachment().data).content)
    data = EebBescheinigungData(
        kvnr=anf.patient.kvnr, family="TK-eAU-Müller", given="Peter", birth_date=date(1992, 1, 1),
        street="Speditionstr.", house_number="19", postal_code="40221", city="Düsseldorf",
        insurer_ik="101575519", insurer_name="Testkasse Nord", coverage_start=date(2023, 4, 17),
        coverage_end=date(2023, 6, 30), allgemeine_versicherungsdaten=b"\x1f\x8bVSD",
    )
    out = build_eeb_bescheinigung_mail(
        request_mail, anf, data, pki.insurer_signer, sender="eeb@testkasse.kim.telematik-test",
        bundle_uuid="796ca3a6-83de-4682-9345-3e9c79d25f78", date=datetime(2023, 4, 17, 14, 36, tzinfo=timezone.utc),
    )
    assert out.recipients == ["ehex-22@arv.kim.telematik-test"]  # the Reply-To
    assert out.subject == "TEEB0_BES_796ca3a6-83de-4682-9345-3e9c79d25f78"
    assert out.attachment_name == "TEEB0_BES_796ca3a6-83de-4682-9345-3e9c79d25f78.p7s"
    _no_mdn(out.raw)
    mail = parse_mail(out.raw)
    assert mail.in_reply_to == request_mail.message_id
    assert mail.dienstkennung.value == "eEB;Bescheinigung;V1.0"
    c = classify(mail)
    assert c.procedure is Procedure.EEB_BESCHEINIGUNG and c.naming_ok and c.environment == "T"
    att = mail.single_attachment()
    assert att.description == "eEB_BES"
    v = verify_cms(att.data, pki.trust_store())
    assert v.valid
    xml = v.content.decode()
    assert '<identifier value="90c9ae58-5a9d-4861-b77d-665d10b2789d" />' in xml  # response → request
    assert "EEBBescheinigungBundle" in xml and "urn:uuid:796ca3a6-83de-4682-9345-3e9c79d25f78" in xml
    assert 'value="101575519"' in xml and "Düsseldorf" in xml and "valueBase64Binary" in xml


def test_fehler_answer(request_mail):
    anf = parse_eeb_anfrage(unwrap_cms(request_mail.single_attachment().data).content)
    out = build_eeb_fehler_mail(
        request_mail, EebFehlerCode.NO_CONSENT, sender="eeb@testkasse.kim.telematik-test", anfrage=anf,
        outcome_id="8e1977b6-fadb-4cec-8019-d55131a6de03",
    )
    _no_mdn(out.raw)
    mail = parse_mail(out.raw)
    assert mail.dienstkennung.value == "eEB;Fehler;V1.0"
    assert mail.kim_headers["X-KIM-Fehlercode"] == "120"
    assert mail.in_reply_to == request_mail.message_id
    c = classify(mail)
    assert c.procedure is Procedure.EEB_FEHLER and c.naming_ok
    att = mail.single_attachment()
    assert att.filename == "TEEB0_FEH_8e1977b6-fadb-4cec-8019-d55131a6de03.xml"
    f = parse_fehler_nachricht(att.data)
    assert (f.code, f.severity, f.id) == ("120", "fatal", "8e1977b6-fadb-4cec-8019-d55131a6de03")
    assert f.bundle_identifier == anf.identifier
    assert f.code_system == "https://gematik.de/fhir/eeb/CodeSystem/EEBErrorcodeCS"
    # without a readable Anfrage the KIM Message-ID names the faulty request
    out = build_eeb_fehler_mail(request_mail, EebFehlerCode.KIM_INTEGRITY, sender="eeb@testkasse.kim.telematik-test")
    f = parse_fehler_nachricht(parse_mail(out.raw).single_attachment().data)
    assert f.message_id == request_mail.message_id_bare and f.bundle_identifier is None


def test_answer_needs_a_reply_address(request_mail):
    anonymous = request_mail.model_copy(update={"reply_to": None, "from_addr": None})
    with pytest.raises(AnswerError) as ei:
        build_eeb_fehler_mail(anonymous, EebFehlerCode.INVALID, sender="eeb@testkasse.kim.telematik-test")
    assert ei.value.code == "answer_no_reply_address"
