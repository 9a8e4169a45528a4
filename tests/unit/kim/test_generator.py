"""The generator's mails round-trip through the parsers to the outcome each fault promises."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from protocols.kim.eau import parse_eau, validate_eau
from protocols.kim.eeb import parse_eeb_anfrage
from protocols.kim.errors import EauError, EebError, MimeError
from protocols.kim.generator import (
    DEFAULT_MIX,
    EXPECTED_CODE,
    SUPPORTED_FAULTS,
    Fault,
    MailGenerator,
    bench,
    kvnr_check_digit,
    main,
    make_pki,
)
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import unwrap_cms, verify_cms
from protocols.kim.procedures import Procedure, classify

LIMIT = 250_000  # the gen fixture makes oversized mails of 300,000 bytes


def technical_layer(raw: bytes, intended: Procedure, trust, seen: set[str]) -> str:
    """A miniature of the technical road map: the first typed fault code, or "ok"."""
    try:
        mail = parse_mail(raw, max_bytes=LIMIT)
    except MimeError as e:
        return e.code
    c = classify(mail)
    if c.procedure is Procedure.EMAILPLUS:
        return "ok" if intended is Procedure.EMAILPLUS else c.reason.value
    assert c.procedure is intended
    try:
        att = mail.single_attachment()
    except MimeError as e:
        return e.code
    v = verify_cms(att.data, trust)
    if not v.valid:
        return v.code.value
    try:
        if intended in (Procedure.EAU_LIEFERUNG, Procedure.EAU_STORNO):
            doc = parse_eau(v.content)
            if doc.identifier in seen:
                return "duplicate"
            seen.add(doc.identifier)
        elif intended is Procedure.EEB_ANFRAGE:
            parse_eeb_anfrage(v.content)
    except (EauError, EebError) as e:
        return e.code
    return "ok"


@pytest.mark.parametrize(
    "procedure,fault",
    sorted(((p, f) for p, fs in SUPPORTED_FAULTS.items() for f in fs), key=lambda x: (x[0].value, x[1].value)),
    ids=lambda x: x.value,
)
def test_every_procedure_and_fault_ends_as_promised(gen, pki, procedure, fault):
    seen: set[str] = set()
    if fault is Fault.DUPLICATE:
        original = gen.generate(procedure)
        assert technical_layer(original.raw, procedure, pki.trust_store(), seen) == "ok"
    m = gen.generate(procedure, fault)
    assert (m.procedure, m.fault) == (procedure, fault)
    assert m.expected_code == EXPECTED_CODE[fault]
    assert technical_layer(m.raw, procedure, pki.trust_store(), seen) == (m.expected_code or "ok")
    if fault is Fault.DUPLICATE:
        assert m.duplicate_of == original.message_id and m.message_id != original.message_id
        assert m.bundle_id == original.bundle_id
        a = parse_mail(m.raw).single_attachment()
        assert a.data == parse_mail(original.raw).single_attachment().data  # same file hash


def test_unsupported_combinations_are_refused(gen):
    with pytest.raises(ValueError):
        gen.emailplus(Fault.BROKEN_SIGNATURE)
    with pytest.raises(ValueError):
        gen.eeb_anfrage(Fault.DUPLICATE)
    with pytest.raises(ValueError):
        gen.generate(Procedure.EEB_BESCHEINIGUNG)


def test_eau_roundtrip_and_realistic_size(gen, pki):
    for _ in range(60):
        m = gen.eau()
        assert 10_000 <= m.size <= 30_000
        mail = parse_mail(m.raw)
        c = classify(mail)
        assert c.procedure is Procedure.EAU_LIEFERUNG and c.naming_ok and c.document_id == m.bundle_id
        assert mail.message_id == m.message_id and mail.to == [m.recipient] and mail.reply_to == m.sender
        v = verify_cms(mail.single_attachment().data, pki.trust_store())
        assert v.valid
        doc = parse_eau(v.content)
        assert doc.identifier_uuid == m.bundle_id
        assert doc.patient.name == m.patient_name and doc.patient.kvnr == m.kvnr
        assert validate_eau(doc) == []
        assert 1 <= len(doc.diagnoses) <= 4 and doc.au.end >= (doc.au.start or doc.au.end)


def test_every_mail_carries_its_synthetic_patient(gen):
    for proc in (Procedure.EAU_LIEFERUNG, Procedure.EEB_ANFRAGE, Procedure.EBZ, Procedure.AAR, Procedure.EMAILPLUS):
        m = gen.generate(proc)
        assert m.patient_name and m.kvnr
        assert re.fullmatch(r"[A-Z][0-9]{9}", m.kvnr)
        assert kvnr_check_digit(m.kvnr[0], m.kvnr[1:9]) == int(m.kvnr[9])
        mail = parse_mail(m.raw)
        if mail.attachments:
            text = unwrap_cms(mail.single_attachment().data).content.decode()
        else:
            text = mail.body_text
        given, family = m.patient_name.split(" ", 1)
        assert m.kvnr in text and given in text and family in text


def test_storno_cancels_an_earlier_eau(gen, pki):
    first = gen.eau()
    storno = gen.eau_storno(cancels=first)
    assert storno.patient_name is None and storno.cancels == first.bundle_id
    mail = parse_mail(storno.raw)
    assert classify(mail).procedure is Procedure.EAU_STORNO
    doc = parse_eau(verify_cms(mail.single_attachment().data, pki.trust_store()).content)
    assert doc.is_storno and doc.cancelled_identifier == f"urn:uuid:{first.bundle_id}"
    assert storno.recipient == first.recipient and storno.sender == first.sender


def test_deterministic_per_seed(pki):
    def fingerprint(seed):
        g = MailGenerator(seed, pki=pki)
        out = []
        for m in g.mix(40, fault_rate=0.3):
            mail = parse_mail(m.raw, max_bytes=None)
            content = None
            if m.fault not in (Fault.BROKEN_MIME,) and mail.attachments:
                try:
                    content = unwrap_cms(mail.attachments[0].data).content
                except Exception:
                    content = mail.attachments[0].data
            out.append((m.procedure, m.fault, m.message_id, m.subject, m.bundle_id, m.patient_name, m.kvnr, m.recipient, content))
        return out

    assert fingerprint(11) == fingerprint(11)
    assert fingerprint(11) != fingerprint(12)


def test_pki_is_deterministic_per_seed():
    a = make_pki.__wrapped__(3)
    b = make_pki.__wrapped__(3)
    assert a.ca_pem() == b.ca_pem()
    assert a.practice_signers[0].cert == b.practice_signers[0].cert
    assert make_pki.__wrapped__(4).ca_pem() != a.ca_pem()
    assert make_pki(3) is make_pki(3)  # cached: generate once, reuse


def test_rsa_pki(gen):
    pki = make_pki(1, "rsa", practices=1)
    g = MailGenerator(1, pki=pki)
    m = g.eau()
    v = verify_cms(parse_mail(m.raw).single_attachment().data, pki.trust_store())
    assert v.valid and unwrap_cms(parse_mail(m.raw).single_attachment().data).signature_algorithm == "rsassa_pkcs1v15"


def test_mix_shares_and_faults(pki):
    g = MailGenerator(5, pki=pki, oversize_bytes=300_000)
    mails = list(g.mix(800))
    shares = Counter(m.procedure for m in mails)
    for proc, weight in DEFAULT_MIX.items():
        assert abs(shares[proc] / 800 - weight) < 0.04, proc
    assert all(m.fault is Fault.NONE for m in mails)
    seen: set[str] = set()
    faulty = 0
    for m in g.mix(150, fault_rate=0.3):
        faulty += m.fault is not Fault.NONE
        assert technical_layer(m.raw, m.procedure, pki.trust_store(), seen) == (m.expected_code or "ok"), m.fault
    assert 25 <= faulty <= 70


def test_bench_and_cli(tmp_path, capsys):
    r = bench(20)
    assert set(r) >= {"eau_mails_per_s", "eau_mails_per_cpu_s", "eau_avg_bytes", "mix_mails_per_s"}
    assert main(["--out", str(tmp_path), "-n", "6"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "trusted-ca.pem" in files and len([f for f in files if f.endswith(".eml")]) == 6
    assert main(["--bench", "-n", "10"]) == 0
    assert "mails/s" in capsys.readouterr().out
