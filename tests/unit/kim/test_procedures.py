"""Procedure classification from Dienstkennung + subject + attachment naming."""

from __future__ import annotations

import pytest

from protocols.kim.compose import OutAttachment, compose
from protocols.kim.mime import parse_mail
from protocols.kim.procedures import DEFAULT_RULES, ClassificationReason, NamingIssueCode, Procedure, classify

UUID = "0b7e3c1a-2f4d-4e5f-8a9b-1c2d3e4f5a6b"


def _mail(dk: str | None, subject: str, attachments=None, text=None) -> bytes:
    headers = [("From", "praxis@arzt.kim.telematik-test"), ("To", "eau@kasse.kim.telematik-test"), ("Subject", subject)]
    if dk is not None:
        headers.append(("X-KIM-Dienstkennung", dk))
    return compose(headers, text=text, attachments=attachments or [])


def _eau_att(name=f"TEAU0_{UUID}.p7s", ctype="application/octet-stream", desc="eAU"):
    return OutAttachment(filename=name, data=b"\x30\x03\x02\x01\x00", content_type=ctype, description=desc)


@pytest.mark.parametrize(
    "fixture,procedure,version",
    [
        ("eeb-anfrage.eml", Procedure.EEB_ANFRAGE, "V1.1"),
        ("eeb-anfrage-2023-01.eml", Procedure.EEB_ANFRAGE, "V1.0"),
        ("eeb-bescheinigung.eml", Procedure.EEB_BESCHEINIGUNG, "V1.1"),
        ("eeb-fehler.eml", Procedure.EEB_FEHLER, "V1.1"),
    ],
)
def test_fixture_mails_classify_with_clean_naming(kim_fixtures, fixture, procedure, version):
    c = classify(parse_mail((kim_fixtures / fixture).read_bytes()))
    assert c.procedure is procedure
    assert c.reason is ClassificationReason.KNOWN and c.known
    assert c.dienstkennung.version == version
    assert c.naming_issues == []
    assert c.environment == "T"
    assert c.document_id and c.attachment_name and c.document_id in c.attachment_name


def test_generic_kim_mail_and_missing_header_are_emailplus(kim_fixtures):
    generic = classify(parse_mail((kim_fixtures / "api-kim" / "kas" / "1_2_Client-Mail_prozessiert.txt").read_bytes()))
    assert generic.procedure is Procedure.EMAILPLUS
    assert generic.reason is ClassificationReason.UNKNOWN_DIENSTKENNUNG
    missing = classify(parse_mail((kim_fixtures / "api-kim" / "kas" / "1_1_Client-Mail_empfangen.txt").read_bytes()))
    assert missing.procedure is Procedure.EMAILPLUS
    assert missing.reason is ClassificationReason.MISSING_DIENSTKENNUNG


@pytest.mark.parametrize(
    "dk,procedure,reason",
    [
        ("eAU;Lieferung;V1.2", Procedure.EAU_LIEFERUNG, ClassificationReason.KNOWN),
        ("eAU;Lieferung;V1.1", Procedure.EAU_LIEFERUNG, ClassificationReason.KNOWN),
        ("eau;lieferung;v1.2", Procedure.EAU_LIEFERUNG, ClassificationReason.KNOWN),
        ("eAU;Storno-Arzt;V1.2", Procedure.EAU_STORNO, ClassificationReason.KNOWN),
        ("eAU;Lieferung;V1.0", Procedure.EMAILPLUS, ClassificationReason.UNSUPPORTED_VERSION),
        ("eAU;Fehler-Kasse;V1.2", Procedure.EMAILPLUS, ClassificationReason.UNKNOWN_DIENSTKENNUNG),
        ("eAU;Lieferung", Procedure.EMAILPLUS, ClassificationReason.MALFORMED_DIENSTKENNUNG),
        (None, Procedure.EMAILPLUS, ClassificationReason.MISSING_DIENSTKENNUNG),
        ("EBZ;ANW;2.0.0", Procedure.EBZ, ClassificationReason.KNOWN),
        ("AAR;Antrag;V1.0", Procedure.AAR, ClassificationReason.KNOWN),
        ("KIM-Mail;Default;V1.0", Procedure.EMAILPLUS, ClassificationReason.UNKNOWN_DIENSTKENNUNG),
    ],
)
def test_dienstkennung_decides(dk, procedure, reason):
    c = classify(parse_mail(_mail(dk, f"TEAU0_{UUID}", [_eau_att()])))
    assert (c.procedure, c.reason) == (procedure, reason)


def test_eau_naming_ok_gives_document_id():
    c = classify(parse_mail(_mail("eAU;Lieferung;V1.2", f"EEAU0_{UUID}", [_eau_att(name=f"EEAU0_{UUID}.p7s")])))
    assert c.naming_ok
    assert c.environment == "E"
    assert c.document_id == UUID
    assert c.attachment_name == f"EEAU0_{UUID}.p7s"


@pytest.mark.parametrize(
    "subject,att,code",
    [
        (f"eAU {UUID}", _eau_att(), NamingIssueCode.SUBJECT),
        (f"TEAU0_{UUID}", _eau_att(name="eau.p7s"), NamingIssueCode.ATTACHMENT_NAME),
        (f"TEAU0_{UUID}", _eau_att(ctype="application/pkcs7-mime"), NamingIssueCode.CONTENT_TYPE),
        (f"TEAU0_{UUID}", _eau_att(desc="AU"), NamingIssueCode.DESCRIPTION),
        (f"TEAU0_{UUID}", _eau_att(name=f"EEAU0_{UUID}.p7s"), NamingIssueCode.ENVIRONMENT),
    ],
)
def test_eau_naming_issues(subject, att, code):
    c = classify(parse_mail(_mail("eAU;Lieferung;V1.2", subject, [att])))
    assert c.procedure is Procedure.EAU_LIEFERUNG
    assert [i.code for i in c.naming_issues] == [code]


def test_eau_without_or_with_two_attachments():
    none = classify(parse_mail(_mail("eAU;Lieferung;V1.2", f"TEAU0_{UUID}", text="x")))
    assert [i.code for i in none.naming_issues] == [NamingIssueCode.ATTACHMENT_MISSING]
    two = classify(parse_mail(_mail("eAU;Lieferung;V1.2", f"TEAU0_{UUID}", [_eau_att(), _eau_att(name="b.pdf")])))
    assert NamingIssueCode.ATTACHMENT_COUNT in [i.code for i in two.naming_issues]


def test_eeb_older_content_description_is_accepted():
    att = OutAttachment(f"TEEB0_ANF_{UUID}.p7s", b"\x30\x00", description="eEB")
    c = classify(parse_mail(_mail("eEB;Anfrage;V1.0", f"TEEB0_ANF_{UUID}", [att])))
    assert c.procedure is Procedure.EEB_ANFRAGE and c.naming_ok


def test_emailplus_gets_a_suggestion_from_the_naming():
    c = classify(parse_mail(_mail(None, f"TEAU0_{UUID}", [_eau_att()])))
    assert c.procedure is Procedure.EMAILPLUS
    assert c.suggested is Procedure.EAU_LIEFERUNG
    c = classify(parse_mail(_mail(None, "Rückfrage", text="Bitte um Rückruf")))
    assert c.suggested is None


def test_ebz_and_aar_values_are_configurable():
    rules = {k: v for k, v in DEFAULT_RULES.items() if not k.startswith(("EBZ", "AAR"))}
    rules["EBZ;ANW;2.0.0"] = Procedure.EBZ
    rules["Reha;Antrag;*"] = Procedure.AAR
    assert classify(parse_mail(_mail("EBZ;ANW;2.0.0", "x", text="x")), rules).procedure is Procedure.EBZ
    ebz_other = classify(parse_mail(_mail("EBZ;Plan;V1", "x", text="x")), rules)
    assert (ebz_other.procedure, ebz_other.reason) == (Procedure.EMAILPLUS, ClassificationReason.UNKNOWN_DIENSTKENNUNG)
    assert classify(parse_mail(_mail("Reha;Antrag;V9", "x", text="x")), rules).procedure is Procedure.AAR
    # the exact rule wins over a wildcard one
    rules["eAU;*;*"] = Procedure.EMAILPLUS
    assert classify(parse_mail(_mail("eAU;Lieferung;V1.2", f"TEAU0_{UUID}", [_eau_att()])), rules).procedure is Procedure.EAU_LIEFERUNG
