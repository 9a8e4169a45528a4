"""KIM parsers under random and mutated input: MIME + headers, PKCS#7, FHIR (eAU, eEB).

The contract (``protocols/kim/errors.py``): every parser returns a typed result or raises
its :class:`KimError` subclass - never anything else - and a catch-all must not be what
produced the error (a reason like ``"... (TypeError)"`` means an internal exception was
swallowed: a bug hiding behind a generic code). Security properties on top: a container
that was tampered with never verifies as valid *with other content*, and the header-only
parsers the mailbox actor runs before a slip exists never raise at all.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from protocols.kim.eau import detect_payload_type, parse_eau, validate_eau
from protocols.kim.eeb import parse_eeb_anfrage
from protocols.kim.errors import CmsError, EauError, EebError, KimError, MimeError
from protocols.kim.mime import parse_dienstkennung, parse_mail
from protocols.kim.pkcs7 import SignatureStatus, TrustStore, to_der, unwrap_cms, verify_cms
from protocols.kim.procedures import classify
from protocols.kim.roadmap import peek_procedure
from tests.unit.fuzz._fuzz import fuzz, mutated, text_mutations, tried

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "kim"
#: a catch-all names the exception class in its reason: "(TypeError)". Input errors of the
#: libraries below (ValueError, ParseError, UnicodeError, ...) are fine; these are bugs:
_SWALLOWED = re.compile(r"\((TypeError|AttributeError|KeyError|IndexError|NameError|AssertionError|"
                        r"ZeroDivisionError|UnboundLocalError|NotImplementedError|StopIteration)\)")


def no_swallowed(err: KimError) -> None:
    m = _SWALLOWED.search(err.reason)
    assert not m, f"catch-all hid an internal {m.group(1)}: {err!r}"


@lru_cache(maxsize=1)
def samples() -> dict[str, bytes]:
    from protocols.kim.generator import MailGenerator, make_pki

    pki = make_pki(3)
    g = MailGenerator(11, pki=pki)
    eau, eeb, storno = g.eau(), g.eeb_anfrage(), None
    storno = g.eau_storno()
    out = {"eau_mail": eau.raw, "eeb_mail": eeb.raw, "storno_mail": storno.raw}
    for name in ("eeb-anfrage.eml", "eeb-bescheinigung.eml", "eeb-fehler.eml", "eeb-anfrage-2023-01.eml"):
        p = FIXTURES / name
        if p.exists():
            out[name] = p.read_bytes()
    m = parse_mail(eau.raw)
    out["p7s"] = m.single_attachment().data
    out["eau_xml"] = unwrap_cms(out["p7s"]).content
    out["eeb_xml"] = unwrap_cms(parse_mail(eeb.raw).single_attachment().data).content
    for p in sorted((FIXTURES / "eau").glob("*.xml")):
        out[f"eau/{p.name}"] = p.read_bytes()
    for p in sorted((FIXTURES / "p7s").glob("*.p7s"))[:3]:
        out[f"p7s/{p.name}"] = p.read_bytes()
    return out


def _all() -> tuple[bytes, ...]:
    return tuple(samples().values())


def _mails() -> list[str]:
    return [k for k in samples() if k.endswith((".eml", "_mail"))]


def _use_mail(raw: bytes) -> None:
    """What the technical steps do with a mail: parse, classify, pick the attachment."""
    tried("kim.mime.parse_mail")
    try:
        m = parse_mail(raw)
    except MimeError as e:
        no_swallowed(e)
        return
    assert m.size == len(raw)
    try:
        classify(m)
    except KimError as e:
        no_swallowed(e)
    try:
        a = m.single_attachment(suffix=".p7s")
    except MimeError:
        return
    _use_p7s(a.data)


def _use_p7s(data: bytes) -> None:
    tried("kim.pkcs7.unwrap_cms")
    try:
        sd = unwrap_cms(data)
    except CmsError as e:
        no_swallowed(e)
        sd = None
    tried("kim.pkcs7.verify_cms")
    res = verify_cms(data, TrustStore())  # never raises; untrusted at most
    assert res.status is not SignatureStatus.VALID  # nothing is trusted here
    if sd is not None:
        _use_payload(sd.content)


def _use_payload(data: bytes) -> None:
    tried("kim.fhir.detect_payload_type")
    detect_payload_type(data)
    tried("kim.fhir.parse_eau")
    try:
        doc = parse_eau(data)
        validate_eau(doc)
    except EauError as e:
        no_swallowed(e)
    tried("kim.fhir.parse_eeb_anfrage")
    try:
        parse_eeb_anfrage(data)
    except EebError as e:
        no_swallowed(e)


# ----------------------------------------------------------------------------- MIME
@fuzz()
@given(st.binary(max_size=4096))
def test_random_bytes_are_a_typed_mime_error_or_a_mail(raw):
    _use_mail(raw)
    tried("kim.roadmap.peek_procedure")
    peek_procedure(raw)


@fuzz()
@given(st.data())
def test_mutated_mails_never_crash_the_technical_layer(data):
    key = data.draw(st.sampled_from(_mails()))
    raw = data.draw(mutated(samples()[key], _all()))
    _use_mail(raw)
    tried("kim.roadmap.peek_procedure")
    peek_procedure(raw)  # the mailbox actor runs this before a slip exists: must never raise


_HEADER_NAMES = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "In-Reply-To",
                 "X-KIM-Dienstkennung", "Content-Type", "Content-Transfer-Encoding", "MIME-Version",
                 "Content-Disposition", "X-KIM-Sendersystem")
_HDR_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)


@st.composite
def header_blocks(draw):
    lines = []
    for _ in range(draw(st.integers(0, 14))):
        name = draw(st.sampled_from(_HEADER_NAMES) | st.text("abcXYZ-:", min_size=1, max_size=12))
        value = draw(_HDR_TEXT | st.sampled_from(
            ("=?utf-8?B?w6TDtsO8?=", "=?iso-8859-1?Q?M=FCller?=", "=?bogus?X?zz?=", "<a@b>", "<<>>", "multipart/mixed",
             'multipart/mixed; boundary=""', "text/plain; charset=x-unknown", "base64", "eAU;Lieferung;V1.2",
             "eAU;Lieferung;V1.2;", ";;", "attachment; filename*=UTF-8''%FF%FE", "Mon, 99 Foo 2024 99:99:99 +9999")))
        fold = draw(st.sampled_from(("", "\r\n ", "\r\n\t", "\n ")))
        lines.append(f"{name}: {fold}{value}")
    body = draw(st.binary(max_size=300))
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


@fuzz()
@given(header_blocks())
def test_arbitrary_header_blocks(raw):
    _use_mail(raw)
    tried("kim.roadmap.peek_procedure")
    peek_procedure(raw)


@fuzz()
@given(st.lists(_HDR_TEXT, max_size=4) | _HDR_TEXT | st.none())
def test_dienstkennung_parser_is_total(value):
    tried("kim.mime.parse_dienstkennung")
    dk = parse_dienstkennung(value)
    if dk.status.value == "valid":
        assert dk.value and dk.value.count(";") == 2


@fuzz()
@given(st.text(alphabet="abcAZ09 .-", max_size=12), st.text(alphabet="abcAZ09 .-", max_size=12),
       st.text(alphabet="abcAZ09 .-", max_size=8))
def test_dienstkennung_valid_iff_three_clean_parts(a, b, c):
    """Property: ``a;b;c`` is valid <=> each part is non-blank without inner double blanks;
    the normalised value parses to the same Dienstkennung."""
    tried("kim.mime.parse_dienstkennung")
    dk = parse_dienstkennung(f"{a};{b};{c}")
    clean = all(p.strip() and "  " not in p.strip() for p in (a, b, c))
    assert (dk.status.value == "valid") == clean, (a, b, c, dk)
    if clean:
        assert (dk.anwendung, dk.nachrichtentyp, dk.version) == (a.strip(), b.strip(), c.strip())
        assert parse_dienstkennung(dk.value) == dk.model_copy(update={"raw": dk.value})


@fuzz()
@given(st.text(alphabet="abc09 ;", max_size=20))
def test_a_valid_dienstkennung_has_three_well_formed_parts(value):
    tried("kim.mime.parse_dienstkennung")
    dk = parse_dienstkennung(value)
    if dk.status.value == "valid":
        parts = [dk.anwendung, dk.nachrichtentyp, dk.version]
        assert all(p and ";" not in p and p == p.strip() for p in parts), dk
        assert parse_dienstkennung(dk.value).value == dk.value


# ----------------------------------------------------------------------------- PKCS#7
@fuzz()
@given(st.data())
def test_mutated_containers_are_typed_errors_or_unverifiable(data):
    keys = [k for k in samples() if k.startswith("p7s")]
    raw = data.draw(mutated(samples()[data.draw(st.sampled_from(keys))], _all()))
    _use_p7s(raw)
    tried("kim.pkcs7.to_der")
    try:
        to_der(raw)
    except CmsError as e:
        no_swallowed(e)


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        ln = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        ln = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + ln + body


asn1 = st.recursive(
    st.builds(_tlv, st.sampled_from((0x02, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x17, 0x18, 0x01, 0x03)),
              st.binary(max_size=24)),
    lambda kids: st.builds(lambda tag, xs: _tlv(tag, b"".join(xs)), st.sampled_from((0x30, 0x31, 0xA0, 0xA1, 0xA3)),
                           st.lists(kids, max_size=5)),
    max_leaves=30,
)

_SIGNED_DATA_OID = bytes.fromhex("06092a864886f70d010702")


@fuzz()
@given(asn1, st.booleans())
def test_structured_asn1_garbage(body, as_signed_data):
    """DER that parses as ASN.1 but is no SignedData (or a SignedData with a garbage body)."""
    der = _tlv(0x30, _SIGNED_DATA_OID + _tlv(0xA0, body)) if as_signed_data else body
    _use_p7s(der)


@fuzz(0.5)
@given(st.data())
def test_tampered_signed_content_never_verifies_with_other_content(data):
    """Security property: whatever byte of a validly signed container changes, it either
    fails verification or still carries exactly the content that was signed."""
    from protocols.kim.generator import make_pki

    pki = make_pki(3)
    p7s = samples()["p7s"]
    original = unwrap_cms(p7s).content
    raw = data.draw(mutated(p7s))
    tried("kim.pkcs7.verify_cms(tamper)")
    res = verify_cms(raw, TrustStore([pki.ca_cert]))
    if res.status is SignatureStatus.VALID:
        assert res.content == original


# ----------------------------------------------------------------------------- FHIR payloads
@fuzz()
@given(st.data())
def test_mutated_fhir_payloads(data):
    keys = [k for k in samples() if k.endswith(("_xml", ".xml"))]
    raw = data.draw(mutated(samples()[data.draw(st.sampled_from(keys))], _all()))
    _use_payload(raw)


@fuzz()
@given(st.data())
def test_xml_aware_mutations_of_fhir_payloads(data):
    keys = [k for k in samples() if k.endswith(("_xml", ".xml"))]
    text = samples()[data.draw(st.sampled_from(keys))].decode("utf-8", "replace")
    edited = data.draw(text_mutations(text))
    _use_payload(edited.encode("utf-8", "surrogatepass"))


@fuzz()
@given(st.sampled_from((
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><Bundle xmlns="http://hl7.org/fhir">&b;</Bundle>',
    b'<!DOCTYPE Bundle SYSTEM "file:///etc/passwd"><Bundle xmlns="http://hl7.org/fhir"/>',
    b'<?xml version="1.0" encoding="x-nonsense"?><Bundle xmlns="http://hl7.org/fhir"/>',
    b'<?xml version="1.0" encoding="utf-16"?><Bundle xmlns="http://hl7.org/fhir"/>',
    b"\xef\xbb\xbf" + b"<Bundle xmlns='http://hl7.org/fhir'><meta><profile value=''/></meta></Bundle>",
    b"<Bundle xmlns='http://hl7.org/fhir'>" + b"<entry>" * 5000 + b"</entry>" * 5000 + b"</Bundle>",
    b"{\"resourceType\": \"Bundle\"}",
)), st.binary(max_size=16))
def test_hostile_xml_is_refused_cleanly(payload, tail):
    _use_payload(payload + tail)
