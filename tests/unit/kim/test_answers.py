"""eAU;Fehler-Kasse;V1.2 answers: only for technical / signature / address faults."""

from __future__ import annotations

import re

import pytest

from protocols.kim.answers import (
    EAU_FEHLER_PROFILE,
    EauFehlerCode,
    build_eau_fehler_mail,
    build_eau_operation_outcome,
    eau_fehler_code_for,
    parse_fehler_nachricht,
)
from protocols.kim.compose import MDN_HEADERS, compose
from protocols.kim.eau import EauIssueCode, PayloadErrorCode
from protocols.kim.errors import AnswerError
from protocols.kim.generator import Fault
from protocols.kim.mime import MimeErrorCode, parse_mail
from protocols.kim.pkcs7 import CmsErrorCode, VerifyCode, verify_cms
from protocols.kim.procedures import ClassificationReason, classify

SENDER = "eau@testkasse.kim.telematik-test"


def test_error_answer_for_a_tampered_eau(gen, pki):
    m = gen.eau(Fault.BROKEN_SIGNATURE)
    req = parse_mail(m.raw)
    v = verify_cms(req.single_attachment().data, pki.trust_store())
    code = eau_fehler_code_for(v.code)
    assert code is EauFehlerCode.SIGNED_DATA_MISMATCH
    out = build_eau_fehler_mail(req, code, sender=SENDER, outcome_id="c42a922c-c1fa-4aed-a2ba-7e658aecb7dc")
    assert out.recipients == [req.reply_to] == [m.sender]
    assert out.dienstkennung == "eAU;Fehler-Kasse;V1.2"
    assert out.attachment_name == "TEAU0_Fehler_c42a922c-c1fa-4aed-a2ba-7e658aecb7dc.xml"
    header_block = out.raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    for h in MDN_HEADERS:  # no read receipt
        assert f"{h}:" not in header_block
    ans = parse_mail(out.raw)
    assert ans.dienstkennung.value == "eAU;Fehler-Kasse;V1.2"
    assert ans.to == [m.sender] and ans.in_reply_to == m.message_id
    att = ans.single_attachment()
    assert re.fullmatch(r"[ET]EAU0_Fehler_[0-9a-f-]+\.xml", att.filename)
    assert att.content_type == "application/xml"
    f = parse_fehler_nachricht(att.data)
    assert (f.severity, f.code, f.profile) == ("fatal", "202", EAU_FEHLER_PROFILE)
    assert f.message_id == m.message_id.strip("<>")  # Message-ID without angle brackets
    # an eAU error answer is not mistaken for an incoming procedure
    assert classify(ans).reason is ClassificationReason.UNKNOWN_DIENSTKENNUNG
    # the answer carries no personal data of the faulty mail
    assert m.patient_name.encode() not in out.raw and m.kvnr.encode() not in out.raw


def test_bundle_identifier_is_named_when_the_bundle_was_read(gen):
    m = gen.eau()
    req = parse_mail(m.raw)
    out = build_eau_fehler_mail(req, EauFehlerCode.WRONG_ADDRESS, sender=SENDER, bundle_identifier=f"urn:uuid:{m.bundle_id}", environment="E")
    f = parse_fehler_nachricht(parse_mail(out.raw).single_attachment().data)
    assert f.code == "100" and f.bundle_identifier == f"urn:uuid:{m.bundle_id}" and f.message_id is None
    assert out.attachment_name.startswith("EEAU0_Fehler_")


def test_operation_outcome_matches_the_kbv_example_structure(kim_fixtures):
    ours = parse_fehler_nachricht(
        build_eau_operation_outcome(EauFehlerCode.STORNO_FORMAT, outcome_id="x", message_id="<96d6a790-afc2-4556-ab73-301e51a7bf30@kim.de>")
    )
    kbv = parse_fehler_nachricht((kim_fixtures / "eau" / "Beispiel_eAU_Fehler_1.xml").read_bytes())
    for field in ("profile", "severity", "code", "code_system", "display", "message_id"):
        assert getattr(ours, field) == getattr(kbv, field), field
    kbv2 = parse_fehler_nachricht((kim_fixtures / "eau" / "Beispiel_eAU_Fehler_2.xml").read_bytes())
    assert EauFehlerCode(kbv2.code).display == kbv2.display


@pytest.mark.parametrize(
    "fault,expected",
    [
        (VerifyCode.DIGEST_MISMATCH, EauFehlerCode.SIGNED_DATA_MISMATCH),
        (VerifyCode.SIGNATURE_INVALID, EauFehlerCode.SIGNED_DATA_MISMATCH),
        (VerifyCode.UNKNOWN_ISSUER, EauFehlerCode.CERTIFICATE_INVALID),
        (VerifyCode.CERT_EXPIRED, EauFehlerCode.CERTIFICATE_INVALID),
        (VerifyCode.NOT_CMS, EauFehlerCode.SIGNATURE_FORMAT),
        (CmsErrorCode.UNSIGNED_PAYLOAD, EauFehlerCode.NOT_SIGNED),
        (PayloadErrorCode.NOT_XML, EauFehlerCode.PAYLOAD_INVALID),
        (PayloadErrorCode.NOT_FHIR, EauFehlerCode.PAYLOAD_INVALID),
        (PayloadErrorCode.WRONG_PROFILE, EauFehlerCode.PAYLOAD_INVALID),
        (PayloadErrorCode.MISSING_ELEMENT, EauFehlerCode.PAYLOAD_INVALID),
        (MimeErrorCode.TOO_MANY_ATTACHMENTS, EauFehlerCode.PAYLOAD_INVALID),
        ("wrong_address", EauFehlerCode.WRONG_ADDRESS),
        # never answered: business content, duplicates, a valid signature
        (EauIssueCode.PERIOD_END_BEFORE_START, None),
        (EauIssueCode.ICD_FORMAT, None),
        (EauIssueCode.KVNR_FORMAT, None),
        ("duplicate", None),
        (VerifyCode.OK, None),
    ],
)
def test_fault_to_answer_code(fault, expected):
    assert eau_fehler_code_for(fault) is expected


def test_storno_format_faults_use_301():
    assert eau_fehler_code_for(PayloadErrorCode.NOT_FHIR, storno=True) is EauFehlerCode.STORNO_FORMAT
    assert eau_fehler_code_for(VerifyCode.DIGEST_MISMATCH, storno=True) is EauFehlerCode.SIGNED_DATA_MISMATCH


def test_codes_are_in_the_specified_range():
    for c in EauFehlerCode:
        assert 100 <= int(c.value) <= 314 and c.display and c.category in ("address", "technical", "signature")


def test_answer_errors(gen):
    req = parse_mail(gen.eau().raw)
    with pytest.raises(AnswerError) as ei:
        build_eau_fehler_mail(req, "999", sender=SENDER)  # type: ignore[arg-type]
    assert ei.value.code == "answer_not_allowed"
    with pytest.raises(AnswerError) as ei:
        build_eau_fehler_mail(req.model_copy(update={"reply_to": None, "from_addr": None}), EauFehlerCode.NOT_SIGNED, sender=SENDER)
    assert ei.value.code == "answer_no_reply_address"
    with pytest.raises(AnswerError):
        build_eau_operation_outcome(EauFehlerCode.NOT_SIGNED, outcome_id="x")


def test_reply_to_wins_over_from(gen):
    raw = gen.eau().raw.replace(b"Reply-To: praxis-", b"Reply-To: antwort-", 1)
    req = parse_mail(raw)
    out = build_eau_fehler_mail(req, EauFehlerCode.NOT_SIGNED, sender=SENDER)
    assert out.recipients[0].startswith("antwort-") and req.from_addr.startswith("praxis-")


def test_compose_refuses_read_receipts():
    with pytest.raises(ValueError):
        compose([("From", SENDER), ("Disposition-Notification-To", SENDER)], text="x")

