"""CMS SignedData: the real gematik .p7s samples (TEST-ONLY SMC-B CA, not included) and
containers signed with the generator's test PKI."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from asn1crypto import cms as acms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from protocols.kim.errors import CmsError
from protocols.kim.generator import issue_cert, pki_name
from protocols.kim.mime import parse_mail
from protocols.kim.pkcs7 import (
    CmsErrorCode,
    SignatureStatus,
    Signer,
    TrustStore,
    VerifyCode,
    to_der,
    unwrap_cms,
    verify_cms,
)
from .conftest import fixture_files

AT_2023 = datetime(2023, 6, 1, tzinfo=timezone.utc)  # within the samples' certificate validity
AT_2026 = datetime(2026, 1, 1, tzinfo=timezone.utc)  # after it (valid until 2025-09-29)
PAYLOAD = b'<?xml version="1.0"?><Bundle xmlns="http://hl7.org/fhir"><id value="1234"/></Bundle>'


def _fixture_containers() -> list[tuple[str, bytes]]:
    out = [(p.name, p.read_bytes()) for p in fixture_files("p7s/*.p7s")]
    for p in fixture_files("*.eml"):
        mail = parse_mail(p.read_bytes())
        for a in mail.attachments:
            if (a.filename or "").endswith(".p7s"):
                out.append((f"{p.name}:{a.filename}", a.data))
    return out


CONTAINERS = _fixture_containers()


@pytest.mark.parametrize("name,data", CONTAINERS, ids=[n for n, _ in CONTAINERS])
def test_gematik_samples_signature_ok_signer_untrusted(name, data, pki):
    sd = unwrap_cms(data)
    assert sd.content.lstrip(b"\xef\xbb\xbf").startswith(b"<?xml")
    assert sd.signature_algorithm == "rsassa_pss"
    assert sd.digest_algorithm == "sha256"
    assert sd.signed_attributes and sd.signing_time is not None
    assert sd.signer is not None and "TEST-ONLY" in sd.signer.subject
    # no trust anchors at all
    r = verify_cms(data, at=AT_2023)
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.NO_TRUST_ANCHORS)
    assert r.signature_ok and not r.trusted
    # trusting only our own test CA: the gematik SMC-B CA is unknown
    r = verify_cms(data, pki.trust_store(), at=AT_2023)
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.UNKNOWN_ISSUER)
    assert r.signature_ok and r.content == sd.content


@pytest.mark.parametrize("name,data", CONTAINERS, ids=[n for n, _ in CONTAINERS])
def test_gematik_samples_valid_when_signer_is_pinned(name, data):
    signer = unwrap_cms(data).signer.certificate()
    r = verify_cms(data, TrustStore([signer]), at=AT_2023)
    assert r.status is SignatureStatus.VALID and r.valid and r.trusted
    assert r.chain[0].sha256 == r.signer.sha256
    expired = verify_cms(data, [signer], at=AT_2026)
    assert (expired.status, expired.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.CERT_EXPIRED)


@pytest.mark.parametrize("name,data", CONTAINERS, ids=[n for n, _ in CONTAINERS])
def test_gematik_samples_tampered_content_is_a_broken_signature(name, data):
    content = unwrap_cms(data).content
    i = data.find(content[:40])
    if i < 0:  # BER: content split into chunks – tamper inside the first chunk
        i = data.find(content[:16])
    assert i > 0
    bad = bytearray(data)
    bad[i + 10] ^= 0x01
    r = verify_cms(bytes(bad), [unwrap_cms(data).signer.certificate()], at=AT_2023)
    assert (r.status, r.code) == (SignatureStatus.BROKEN_SIGNATURE, VerifyCode.DIGEST_MISMATCH)


def test_extracted_payloads_match(kim_fixtures):
    anf = parse_mail((kim_fixtures / "eeb-anfrage.eml").read_bytes()).single_attachment()
    assert unwrap_cms(anf.data).content == (kim_fixtures / "extracted" / "eeb-anfrage.signed-content.xml").read_bytes()
    bes = parse_mail((kim_fixtures / "eeb-bescheinigung.eml").read_bytes()).single_attachment()
    # BER, indefinite length, content in 1000-byte chunks
    assert bes.data[:4] == bytes.fromhex("30800609")
    assert unwrap_cms(bes.data).content == (kim_fixtures / "extracted" / "eeb-bescheinigung.signed-content.xml").read_bytes()


def test_kim_smime_profile_sample(kim_fixtures):
    signed = (kim_fixtures / "api-kim" / "smime-profil" / "inputEmail.txt.02.signedcms").read_bytes()
    sd = unwrap_cms(signed)
    assert b"X-KIM-Dienstkennung: KIM-Mail;Default;V1.0" in sd.content
    assert verify_cms(signed, [sd.signer.certificate()], at=datetime(2021, 1, 1, tzinfo=timezone.utc)).valid
    enc = (kim_fixtures / "api-kim" / "smime-profil" / "inputEmail.txt.04.encryptedcms").read_bytes()
    with pytest.raises(CmsError) as ei:
        unwrap_cms(enc)
    assert ei.value.code == CmsErrorCode.NOT_SIGNED_DATA
    r = verify_cms(enc)
    assert (r.status, r.code) == (SignatureStatus.NOT_CMS, VerifyCode.NOT_SIGNED_DATA)


# ---------------------------------------------------------------------------- input forms / not CMS


def test_pem_and_base64_inputs(pki):
    der = pki.practice_signers[0].sign(PAYLOAD)
    pem = b"-----BEGIN PKCS7-----\n" + base64.encodebytes(der) + b"-----END PKCS7-----\n"
    b64 = base64.encodebytes(der)
    for form in (der, pem, b64, b"  \r\n" + pem):
        assert to_der(form) == der
        assert verify_cms(form, pki.trust_store()).valid


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", CmsErrorCode.NOT_CMS),
        (b"hello world, this is not a container", CmsErrorCode.NOT_CMS),
        (PAYLOAD, CmsErrorCode.UNSIGNED_PAYLOAD),
        (b"\xef\xbb\xbf" + PAYLOAD, CmsErrorCode.UNSIGNED_PAYLOAD),
        (b'{"resourceType": "Bundle"}', CmsErrorCode.UNSIGNED_PAYLOAD),
        (b"%PDF-1.4 ...", CmsErrorCode.UNSIGNED_PAYLOAD),
        (b"\x30\x82\xff\xff\x00", CmsErrorCode.NOT_CMS),
        (b"\x30\x03\x02\x01\x00", CmsErrorCode.NOT_CMS),
        (b"-----BEGIN PKCS7-----\nAAAA\n", CmsErrorCode.NOT_CMS),
    ],
)
def test_not_cms(data, code):
    with pytest.raises(CmsError) as ei:
        unwrap_cms(data)
    assert ei.value.code == code
    r = verify_cms(data)
    assert r.status is SignatureStatus.NOT_CMS
    assert r.content is None and not r.signature_ok


def test_detached_signature_is_not_usable(pki):
    s = pki.practice_signers[0]
    det = pkcs7.PKCS7SignatureBuilder().set_data(PAYLOAD).add_signer(s.cert, s.key, hashes.SHA256()).sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    )
    with pytest.raises(CmsError) as ei:
        unwrap_cms(det)
    assert ei.value.code == CmsErrorCode.DETACHED
    assert verify_cms(det, pki.trust_store()).code is VerifyCode.DETACHED


# ---------------------------------------------------------------------------- generated containers


def test_generated_ec_signature_valid(pki):
    der = pki.practice_signers[0].sign(PAYLOAD)
    sd = unwrap_cms(der)
    assert sd.content == PAYLOAD and sd.content_type == "data"
    assert sd.signature_algorithm == "ecdsa" and sd.signed_attributes
    r = verify_cms(der, pki.trust_store())
    assert r.status is SignatureStatus.VALID and r.code is VerifyCode.OK
    assert [c.subject for c in r.chain][-1] == r.chain[-1].subject
    assert len(r.chain) == 2  # signer → CA


def test_rogue_signer_is_untrusted(pki):
    r = verify_cms(pki.rogue_signer.sign(PAYLOAD), pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.UNKNOWN_ISSUER)
    assert r.signature_ok
    # …unless the rogue CA is trusted too
    assert verify_cms(pki.rogue_signer.sign(PAYLOAD), TrustStore([pki.ca_cert, pki.rogue_ca_cert])).valid


@pytest.fixture(scope="module")
def rsa_signer(pki):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = issue_cert(pki_name("Praxis RSA TEST-ONLY", "RSA NOT-VALID"), key, pki.ca_cert.subject, pki.ca_key, 77, ca=False)
    return key, cert


@pytest.mark.parametrize("pss", [False, True])
def test_rsa_pkcs1v15_and_pss(pki, rsa_signer, pss):
    key, cert = rsa_signer
    der = Signer(key=key, cert=cert, rsa_pss=pss).sign(PAYLOAD)
    sd = unwrap_cms(der)
    assert sd.signature_algorithm == ("rsassa_pss" if pss else "rsassa_pkcs1v15")
    assert verify_cms(der, pki.trust_store()).valid
    bad = der.replace(b'value="1234"', b'value="1235"')
    assert verify_cms(bad, pki.trust_store()).code is VerifyCode.DIGEST_MISMATCH


def test_tampered_signed_attributes_break_the_signature(pki):
    der = pki.practice_signers[0].sign(PAYLOAD)
    si = acms.ContentInfo.load(der)["content"]["signer_infos"][0]
    st = next(a for a in si["signed_attrs"] if a["type"].native == "signing_time")["values"][0].dump()
    i = der.find(st)
    assert i > 0
    bad = bytearray(der)
    bad[i + 3] = ord("0") if bad[i + 3] != ord("0") else ord("1")  # a digit of the year
    r = verify_cms(bytes(bad), pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.BROKEN_SIGNATURE, VerifyCode.SIGNATURE_INVALID)


def test_signature_without_signed_attributes(pki):
    s = pki.practice_signers[1]
    der = pkcs7.PKCS7SignatureBuilder().set_data(PAYLOAD).add_signer(s.cert, s.key, hashes.SHA256()).sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.NoAttributes, pkcs7.PKCS7Options.Binary]
    )
    sd = unwrap_cms(der)
    assert not sd.signed_attributes and sd.signing_time is None
    assert verify_cms(der, pki.trust_store()).valid
    bad = der.replace(b'value="1234"', b'value="1235"')
    assert verify_cms(bad, pki.trust_store()).code is VerifyCode.SIGNATURE_INVALID


def test_missing_signer_certificate(pki):
    s = pki.practice_signers[0]
    der = pkcs7.PKCS7SignatureBuilder().set_data(PAYLOAD).add_signer(s.cert, s.key, hashes.SHA256()).sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.NoCerts, pkcs7.PKCS7Options.Binary]
    )
    r = verify_cms(der, pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.BROKEN_SIGNATURE, VerifyCode.SIGNER_CERT_MISSING)


def _signer_with(pki, *, not_before=None, not_after=None, issuer=None, issuer_key=None, ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    kw = {}
    if not_before:
        kw["not_before"] = not_before
    if not_after:
        kw["not_after"] = not_after
    cert = issue_cert(
        pki_name("Praxis Sonderfall TEST-ONLY", "X NOT-VALID"), key, issuer or pki.ca_cert.subject,
        issuer_key or pki.ca_key, 99, ca=ca, **kw,
    )
    return Signer(key=key, cert=cert)


def test_validity_dates(pki):
    now = datetime.now(timezone.utc)
    old = _signer_with(pki, not_before=now - timedelta(days=400), not_after=now - timedelta(days=30))
    r = verify_cms(old.sign(PAYLOAD), pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.CERT_EXPIRED)
    assert verify_cms(old.sign(PAYLOAD), pki.trust_store(), at=now - timedelta(days=60)).valid
    future = _signer_with(pki, not_before=now + timedelta(days=30), not_after=now + timedelta(days=400))
    r = verify_cms(future.sign(PAYLOAD), pki.trust_store())
    assert r.code is VerifyCode.CERT_NOT_YET_VALID
    naive = datetime(2030, 1, 1)  # naive datetimes are UTC
    assert verify_cms(pki.practice_signers[0].sign(PAYLOAD), pki.trust_store(), at=naive).valid


def test_forged_issuer_name_fails_the_chain_signature(pki):
    # claims our CA as issuer, but is signed with another key
    forged = _signer_with(pki, issuer_key=ec.generate_private_key(ec.SECP256R1()))
    r = verify_cms(forged.sign(PAYLOAD), pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.CHAIN_SIGNATURE_INVALID)
    assert r.signature_ok


def test_intermediate_in_container_and_end_entity_cannot_issue(pki):
    ikey = ec.generate_private_key(ec.SECP256R1())
    iname = pki_name("Zwischen-CA TEST-ONLY", "Sub NOT-VALID")
    inter = issue_cert(iname, ikey, pki.ca_cert.subject, pki.ca_key, 500, ca=True)
    leaf = _signer_with(pki, issuer=iname, issuer_key=ikey)
    der = Signer(key=leaf.key, cert=leaf.cert, extra_certs=(inter,)).sign(PAYLOAD)
    r = verify_cms(der, pki.trust_store())
    assert r.valid and len(r.chain) == 3
    # without the intermediate in the container the issuer is unknown
    assert verify_cms(leaf.sign(PAYLOAD), pki.trust_store()).code is VerifyCode.UNKNOWN_ISSUER
    # an end-entity certificate (no CA flag) cannot act as issuer
    ee_as_issuer = issue_cert(iname, ikey, pki.ca_cert.subject, pki.ca_key, 501, ca=False)
    der = Signer(key=leaf.key, cert=leaf.cert, extra_certs=(ee_as_issuer,)).sign(PAYLOAD)
    assert verify_cms(der, pki.trust_store()).code is VerifyCode.ISSUER_NOT_CA


def test_trust_store_from_pem(pki):
    store = TrustStore.from_pem(pki.ca_pem() + pki.rogue_ca_cert.public_bytes(serialization.Encoding.PEM))
    assert len(store) == 2
    store.add(pki.ca_pem())  # duplicates are ignored
    assert len(store) == 2
    assert isinstance(store.anchors[0], x509.Certificate)


# ---------------------------------------------------------------------------- remembered checks


def test_a_practice_certificate_is_checked_against_its_ca_once_and_still_judged_per_mail(pki):
    """The chain check remembers that the CA signed a practice's certificate (a fact of the
    two certificates' bytes); what depends on the mail - its content, its signing time - is
    judged again for every mail."""
    from protocols.kim import pkcs7 as p

    signer = pki.practice_signers[2]
    before = p._issued_by.cache_info()
    first = verify_cms(signer.sign(PAYLOAD), pki.trust_store())
    second = verify_cms(signer.sign(PAYLOAD + b"<!-- zweite AU -->"), pki.trust_store())
    assert first.valid and second.valid
    after = p._issued_by.cache_info()
    assert after.hits >= before.hits + 1  # the second mail did not verify the CA's signature again
    assert first.chain[0] is second.chain[0]  # one frozen CertInfo per certificate
    # the same certificate, a mail signed after it expired: rejected although its chain is known
    late = verify_cms(signer.sign(PAYLOAD), pki.trust_store(), at=datetime(2200, 1, 1, tzinfo=timezone.utc))
    assert late.code is VerifyCode.CERT_EXPIRED
    # the same signer, the content altered after signing: broken, not "known good"
    tampered = signer.sign(PAYLOAD).replace(b'value="1234"', b'value="1235"')
    assert verify_cms(tampered, pki.trust_store()).code is VerifyCode.DIGEST_MISMATCH


def test_a_forged_certificate_with_a_known_certificates_names_is_not_taken_for_it(pki):
    """Regression guard for the remembered chain check: it is keyed by the certificates'
    bytes, so a certificate naming the same subject, issuer and serial as one already
    checked - but signed by another key - still fails the chain."""
    good = _signer_with(pki)  # serial 99, "Praxis Sonderfall", issued by our CA
    assert verify_cms(good.sign(PAYLOAD), pki.trust_store()).valid
    forged = _signer_with(pki, issuer_key=ec.generate_private_key(ec.SECP256R1()))  # same names and serial
    assert forged.cert.subject == good.cert.subject and forged.cert.serial_number == good.cert.serial_number
    r = verify_cms(forged.sign(PAYLOAD), pki.trust_store())
    assert (r.status, r.code) == (SignatureStatus.UNTRUSTED_SIGNER, VerifyCode.CHAIN_SIGNATURE_INVALID)


def test_the_signature_of_one_container_is_checked_once_for_the_tampering_and_the_trust_step(pki):
    from protocols.kim import pkcs7 as p

    sd = unwrap_cms(pki.practice_signers[0].sign(PAYLOAD))
    assert verify_cms(sd, TrustStore()).code is VerifyCode.NO_TRUST_ANCHORS  # verify_signature's call: signature ok
    assert sd._signature_check == (VerifyCode.OK, "signature valid")
    sd._signature_check = (VerifyCode.SIGNATURE_INVALID, "pinned")  # the trust step reuses what was found
    assert verify_cms(sd, pki.trust_store()).code is VerifyCode.SIGNATURE_INVALID
    # a container unwrapped afresh is checked afresh
    assert verify_cms(unwrap_cms(pki.practice_signers[0].sign(PAYLOAD)), pki.trust_store()).valid
