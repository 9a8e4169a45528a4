"""Fuzz properties: random and mutated input only ever yields the typed errors."""

from __future__ import annotations

from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.kim.eau import detect_payload_type, parse_eau
from protocols.kim.eeb import parse_eeb_anfrage
from protocols.kim.errors import CmsError, EauError, EebError, MimeError
from protocols.kim.generator import MailGenerator, make_pki
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import SignatureStatus, unwrap_cms, verify_cms
from protocols.kim.procedures import classify

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@lru_cache(maxsize=1)
def _samples() -> dict[str, bytes]:
    pki = make_pki(7)
    g = MailGenerator(99, pki=pki)
    eau = g.eau()
    eeb = g.eeb_anfrage()
    eau_mail = parse_mail(eau.raw)
    p7s = eau_mail.single_attachment().data
    return {
        "eau_mail": eau.raw,
        "eeb_mail": eeb.raw,
        "p7s": p7s,
        "eau_xml": unwrap_cms(p7s).content,
        "eeb_xml": unwrap_cms(parse_mail(eeb.raw).single_attachment().data).content,
    }


@st.composite
def mutated(draw, key: str):
    data = bytearray(_samples()[key])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "truncate", "splice")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice" and data:
            other = _samples()[draw(st.sampled_from(sorted(_samples())))]
            start = draw(st.integers(0, len(other) - 1))
            data[pos:pos] = other[start : start + draw(st.integers(1, 200))]
    return bytes(data)


def _mail_roundtrip(raw: bytes) -> None:
    try:
        mail = parse_mail(raw)
    except MimeError as e:
        assert e.code and e.reason
        return
    classify(mail)
    try:
        att = mail.single_attachment()
    except MimeError:
        return
    _cms_roundtrip(att.data)


def _cms_roundtrip(data: bytes) -> None:
    r = verify_cms(data, make_pki(7).trust_store())
    assert r.status in SignatureStatus
    try:
        sd = unwrap_cms(data)
    except CmsError as e:
        assert e.code and e.reason
        return
    _payload_roundtrip(sd.content)


def _payload_roundtrip(data: bytes) -> None:
    detect_payload_type(data)
    try:
        parse_eau(data)
    except EauError as e:
        assert e.code and e.reason
    try:
        parse_eeb_anfrage(data)
    except EebError as e:
        assert e.code and e.reason


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_into_every_parser(data):
    _mail_roundtrip(data)
    _cms_roundtrip(data)
    _payload_roundtrip(data)


@FUZZ
@given(st.lists(st.sampled_from([
    b"From: a@x.de\r\n", b"To: b@y.de\r\n", b"X-KIM-Dienstkennung: eAU;Lieferung;V1.2\r\n",
    b"Content-Type: multipart/mixed; boundary=B\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Subject: =?utf-8?B?w7w=?=\r\n", b"\r\n", b"--B\r\n", b"--B--\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%FF%FE.p7s\r\n", b"MIIB\r\n", b"\xff\xfe\r\n",
]), max_size=40))
def test_structured_garbage_mails(parts):
    _mail_roundtrip(b"".join(parts))


@FUZZ
@given(mutated("eau_mail"))
def test_mutated_eau_mails(raw):
    _mail_roundtrip(raw)


@FUZZ
@given(mutated("eeb_mail"))
def test_mutated_eeb_mails(raw):
    _mail_roundtrip(raw)


@FUZZ
@given(mutated("p7s"))
def test_mutated_cms(data):
    _cms_roundtrip(data)


@FUZZ
@given(mutated("eau_xml"))
def test_mutated_eau_payload(data):
    _payload_roundtrip(data)


@FUZZ
@given(mutated("eeb_xml"))
def test_mutated_eeb_payload(data):
    _payload_roundtrip(data)
