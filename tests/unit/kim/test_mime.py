"""MIME + KIM headers on the real gematik sample mails and on hand-made edge cases."""

from __future__ import annotations

import hashlib

import pytest

from protocols.kim.compose import OutAttachment, compose
from protocols.kim.errors import MimeError
from protocols.kim.mime import DienstkennungStatus, MimeErrorCode, parse_dienstkennung, parse_mail
from .conftest import fixture_files


@pytest.mark.parametrize("path", fixture_files("*.eml"), ids=lambda p: p.name)
def test_every_fixture_mail_parses_without_defects(path):
    raw = path.read_bytes()
    mail = parse_mail(raw)
    assert mail.defects == []
    assert mail.message_id and mail.message_id.startswith("<")
    assert mail.from_addr and mail.to
    assert mail.dienstkennung.status is DienstkennungStatus.VALID
    assert mail.dienstkennung.anwendung == "eEB"
    assert mail.content_hash == hashlib.sha256(raw).hexdigest()
    assert mail.size == len(raw)
    for att in mail.attachments:
        assert att.size == len(att.data) > 0


def test_eeb_anfrage_headers_and_attachment(kim_fixtures):
    mail = parse_mail((kim_fixtures / "eeb-anfrage.eml").read_bytes())
    assert mail.message_id == "<1122966724.1.1681742158295@[192.168.200.196]>"
    assert mail.message_id_bare == "1122966724.1.1681742158295@[192.168.200.196]"
    assert mail.from_addr == "ehex-22@arv.kim.telematik-test"
    assert mail.reply_to == "ehex-22@arv.kim.telematik-test"
    assert mail.to == ["tk@dgn.kim.telematik-test"]
    assert mail.subject == "TEEB0_ANF_90c9ae58-5a9d-4861-b77d-665d10b2789d"
    assert mail.date is not None and mail.date.year == 2023
    assert mail.dienstkennung.value == "eEB;Anfrage;V1.1"
    assert (mail.dienstkennung.anwendung, mail.dienstkennung.nachrichtentyp, mail.dienstkennung.version) == (
        "eEB",
        "Anfrage",
        "V1.1",
    )
    assert mail.kim_headers["X-KIM-Sendersystem"] == "easyTI;2.2.1-SNAPSHOT"
    assert mail.body_text and "eEB Anfrage" in mail.body_text
    att = mail.single_attachment()
    assert att.filename == "TEEB0_ANF_90c9ae58-5a9d-4861-b77d-665d10b2789d.p7s"
    assert att.content_type == "application/octet-stream"
    assert att.description == "eEB_ANF"
    assert att.data[:1] == b"\x30"  # DER


def test_client_reports_are_listed_but_not_the_required_attachment(kim_fixtures):
    mail = parse_mail((kim_fixtures / "eeb-anfrage-2023-01.eml").read_bytes())
    names = [a.filename for a in mail.attachments]
    assert names == [
        "TEEB0_ANF_e71108ff-a936-44fa-9d7d-215a09428900.p7s",
        "Pruefungsdetails_20230105_1330.txt",
        "Signaturpruefungsbericht_20230105_1330.pdf",
    ]
    att = mail.single_attachment()
    assert att.filename.endswith(".p7s")
    # SOURCES.md: the attachment is byte-identical to the separate .p7s sample
    assert att.data == (kim_fixtures / "p7s" / "TEEB0_ANF_e71108ff-a936-44fa-9d7d-215a09428900.p7s").read_bytes()
    with pytest.raises(MimeError) as ei:
        mail.single_attachment(include_reports=True)
    assert ei.value.code == MimeErrorCode.TOO_MANY_ATTACHMENTS


def test_bescheinigung_refers_to_the_request(kim_fixtures):
    req = parse_mail((kim_fixtures / "eeb-anfrage.eml").read_bytes())
    bes = parse_mail((kim_fixtures / "eeb-bescheinigung.eml").read_bytes())
    assert bes.in_reply_to == req.message_id
    assert bes.dienstkennung.nachrichtentyp == "Bescheinigung"
    assert set(bes.kim_headers) >= {"X-KIM-Ursprungssystem", "X-KIM-Sendersystem", "X-KIM-Support", "X-KIM-Dienstkennung"}


def test_fehler_mail_keeps_raw_utf8_in_quoted_printable(kim_fixtures):
    mail = parse_mail((kim_fixtures / "eeb-fehler.eml").read_bytes())
    assert mail.kim_headers["X-KIM-Fehlercode"] == "101"
    assert "entschlüsselt" in (mail.body_text or "")
    att = mail.single_attachment(suffix=".xml")
    assert att.content_type == "application/xml" and att.description == "eEB_FEH"
    assert att.data == (kim_fixtures / "extracted" / "eeb-fehler.attachment.xml").read_bytes()


def test_kas_samples_show_kim_transport_headers(kim_fixtures):
    mail = parse_mail((kim_fixtures / "api-kim" / "kas" / "2_4_Client-Mail_finalisiert.txt").read_bytes())
    assert "X-KIM-DecryptionResult" in mail.kim_headers
    assert "X-KIM-IntegrityCheckResult" in mail.kim_headers
    assert mail.dienstkennung.value == "KIM-Mail;Default;V1.0"
    assert mail.to == ["user.test15@gematik.kim.telematik-test"]


def test_rfc822_wrap_is_one_attachment(kim_fixtures):
    mail = parse_mail((kim_fixtures / "api-kim" / "smime-profil" / "inputEmail.txt.01.rfc822wrap").read_bytes())
    assert len(mail.attachments) == 1
    inner = mail.attachments[0]
    assert inner.content_type == "message/rfc822"
    assert b"X-KIM-Dienstkennung: KIM-Mail;Default;V1.0" in inner.data


# ---------------------------------------------------------------------------- Dienstkennung


@pytest.mark.parametrize(
    "value,status",
    [
        ("eAU;Lieferung;V1.2", DienstkennungStatus.VALID),
        ("  eAU ; Lieferung ; V1.2  ", DienstkennungStatus.VALID),
        ("EBZ;ANW;2.0.0;", DienstkennungStatus.VALID),
        (None, DienstkennungStatus.MISSING),
        ("", DienstkennungStatus.MISSING),
        ("   ", DienstkennungStatus.MISSING),
        ("eAU;Lieferung", DienstkennungStatus.MALFORMED),
        ("eAU;;V1.2", DienstkennungStatus.MALFORMED),
        ("eAU;Lieferung;V1.2;x", DienstkennungStatus.MALFORMED),
        ("eAU Lieferung V1.2", DienstkennungStatus.MALFORMED),
        ("eAU;Liefer\x00ung;V1.2", DienstkennungStatus.MALFORMED),
    ],
)
def test_dienstkennung_parse(value, status):
    dk = parse_dienstkennung(value)
    assert dk.status is status
    if status is DienstkennungStatus.VALID:
        assert dk.value and dk.value.count(";") == 2
    if status is DienstkennungStatus.MALFORMED:
        assert dk.reason


def test_conflicting_dienstkennung_headers_are_malformed_identical_ones_are_fine():
    assert parse_dienstkennung(["eAU;Lieferung;V1.2", "eEB;Anfrage;V1.0"]).status is DienstkennungStatus.MALFORMED
    assert parse_dienstkennung(["eAU;Lieferung;V1.2", "eAU;Lieferung;V1.2"]).status is DienstkennungStatus.VALID
    raw = compose(
        [("From", "a@x.de"), ("To", "b@y.de"), ("X-KIM-Dienstkennung", "eAU;Lieferung;V1.2"), ("X-KIM-Dienstkennung", "eAU;Storno-Arzt;V1.2")],
        text="x",
    )
    mail = parse_mail(raw)
    assert mail.dienstkennung.status is DienstkennungStatus.MALFORMED
    assert any("DuplicateHeader" in d for d in mail.defects)


def test_missing_dienstkennung_header():
    mail = parse_mail(compose([("From", "a@x.de"), ("To", "b@y.de"), ("Subject", "Hallo")], text="Hallo"))
    assert mail.dienstkennung.status is DienstkennungStatus.MISSING
    assert mail.attachments == []


def test_encoded_words_and_multiple_recipients():
    raw = compose(
        [
            ("From", '"Praxis Dr. Müller" <praxis@arzt.kim.telematik-test>'),
            ("To", "a@kasse.kim.telematik-test, Kasse B <b@kasse.kim.telematik-test>"),
            ("Subject", "Rückfrage zur Arbeitsunfähigkeitsbescheinigung"),
        ],
        text="Grüße",
    )
    mail = parse_mail(raw)
    assert mail.subject == "Rückfrage zur Arbeitsunfähigkeitsbescheinigung"
    assert mail.from_addr == "praxis@arzt.kim.telematik-test"
    assert mail.reply_address == "praxis@arzt.kim.telematik-test"
    assert mail.to == ["a@kasse.kim.telematik-test", "b@kasse.kim.telematik-test"]
    assert mail.body_text == "Grüße"


# ---------------------------------------------------------------------------- errors


def _err(raw: bytes, **kw) -> str:
    with pytest.raises(MimeError) as ei:
        parse_mail(raw, **kw)
    assert ei.value.reason
    return ei.value.code


def test_empty_mail():
    assert _err(b"") == MimeErrorCode.EMPTY
    assert _err(b"\r\n \r\n") == MimeErrorCode.EMPTY


def test_oversized_is_checked_before_parsing():
    raw = compose([("From", "a@x.de")], text="x" * 5000)
    assert _err(raw, max_bytes=1000) == MimeErrorCode.OVERSIZED
    assert parse_mail(raw, max_bytes=None).body_text


def test_no_header_fields_is_broken():
    assert _err(b"\x00\x01\x02 garbage without headers\r\n\r\nbody") == MimeErrorCode.BROKEN


def test_boundary_mismatch_is_broken():
    raw = compose(
        [("From", "a@x.de"), ("To", "b@y.de")],
        attachments=[OutAttachment("a.p7s", b"\x30\x00")],
        boundary="BOUNDARY",
    ).replace(b"--BOUNDARY", b"--OTHER")
    assert _err(raw) == MimeErrorCode.BROKEN


def test_multipart_without_boundary_is_broken():
    raw = b"From: a@x.de\r\nContent-Type: multipart/mixed\r\n\r\nno parts here\r\n"
    assert _err(raw) == MimeErrorCode.BROKEN


def test_not_bytes():
    with pytest.raises(MimeError) as ei:
        parse_mail("From: a@x.de\r\n\r\nx")  # type: ignore[arg-type]
    assert ei.value.code == MimeErrorCode.BROKEN


def test_single_attachment_errors():
    none = parse_mail(compose([("From", "a@x.de")], text="kein Anhang"))
    with pytest.raises(MimeError) as ei:
        none.single_attachment()
    assert ei.value.code == MimeErrorCode.NO_ATTACHMENT
    two = parse_mail(
        compose([("From", "a@x.de")], attachments=[OutAttachment("a.p7s", b"1"), OutAttachment("b.p7s", b"2")])
    )
    with pytest.raises(MimeError) as ei:
        two.single_attachment()
    assert ei.value.code == MimeErrorCode.TOO_MANY_ATTACHMENTS
    assert ei.value.fault().domain == "mime"
    with pytest.raises(MimeError) as ei:
        two.single_attachment(suffix=".xml")
    assert ei.value.code == MimeErrorCode.NO_ATTACHMENT


def test_tolerated_defects_are_reported():
    raw = (
        b"From: a@x.de\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: application/octet-stream; name=a.p7s\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"MIIB*invalid*base64\r\n--B--\r\n"
    )
    mail = parse_mail(raw)
    assert len(mail.attachments) == 1
    assert any("Base64" in d for d in mail.defects)


def test_long_non_ascii_subject_is_folded_and_decoded():
    subject = "Rückfrage zur Arbeitsunfähigkeitsbescheinigung, Ärztin Dr. Österreicher-Lüdenscheidt " * 3
    raw = compose([("From", "a@x.de"), ("Subject", subject.strip())], text="x")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert parse_mail(raw).subject == subject.strip()
