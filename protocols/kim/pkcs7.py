"""PKCS#7 / CMS SignedData (RFC 5652): unwrap a ``.p7s``, verify its signature and signer.

ASN.1 is read with ``asn1crypto`` (DER and BER, e.g. indefinite lengths as sent by some
KIM clients), the crypto is done with ``cryptography``.

* :func:`unwrap_cms` – the encapsulated content, certificates and signer info of a DER,
  PEM or base64 ``.p7s``; raises :class:`~protocols.kim.errors.CmsError`
  (:class:`CmsErrorCode`).
* :func:`verify_cms` – never raises on bad input; returns a :class:`VerificationResult`
  with one of four :class:`SignatureStatus` values and a finer :class:`VerifyCode`:

  ============================  =====================================================
  ``valid``                     signature over the content is correct and the signer
                                chains to a trusted CA (validity dates checked at ``at``)
  ``broken_signature``          message digest or signature does not match (tampered),
                                no signer info / certificate, unsupported algorithm
  ``untrusted_signer``          signature is correct, but the signer certificate does
                                not chain to a trust anchor, or is outside its validity
  ``not_cms``                   not a CMS SignedData container at all (plain payload,
                                garbage, EnvelopedData, detached signature)
  ============================  =====================================================

Signatures: signed attributes (messageDigest check + signature over the DER of the
signed attributes) or, without signed attributes, directly over the content; RSA
PKCS#1 v1.5, RSASSA-PSS (parameters from the AlgorithmIdentifier) and ECDSA.

Trust: a :class:`TrustStore` of CA certificates. The signer chains to it through
certificates in the container or in the store (issuer name + signature of the issuer,
issuer must be a CA); a certificate that is itself in the store is trusted directly
(e.g. a pinned signer certificate).

:class:`Signer` makes CMS SignedData with ``cryptography``'s ``PKCS7SignatureBuilder``
(signed attributes: contentType, signingTime, messageDigest).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Iterable, Sequence

from asn1crypto import cms as acms
from asn1crypto import core as acore
from asn1crypto import x509 as ax
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from protocols.kim.errors import CmsError


class CmsErrorCode(StrEnum):
    NOT_CMS = "cms_not_cms"  # garbage / not ASN.1 ContentInfo
    UNSIGNED_PAYLOAD = "cms_unsigned_payload"  # a plain XML/JSON/PDF/text payload, not signed at all
    NOT_SIGNED_DATA = "cms_not_signed_data"  # CMS, but e.g. (Auth)EnvelopedData
    DETACHED = "cms_detached"  # SignedData without encapsulated content
    NO_SIGNER = "cms_no_signer"  # SignedData without SignerInfo


class SignatureStatus(StrEnum):
    VALID = "valid"
    BROKEN_SIGNATURE = "broken_signature"
    UNTRUSTED_SIGNER = "untrusted_signer"
    NOT_CMS = "not_cms"


class VerifyCode(StrEnum):
    OK = "ok"
    # status not_cms
    NOT_CMS = "not_cms"
    UNSIGNED_PAYLOAD = "unsigned_payload"
    NOT_SIGNED_DATA = "not_signed_data"
    DETACHED = "detached_content"
    # status broken_signature
    NO_SIGNER_INFO = "no_signer_info"
    SIGNER_CERT_MISSING = "signer_certificate_missing"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    DIGEST_MISMATCH = "digest_mismatch"
    SIGNATURE_INVALID = "signature_invalid"
    # status untrusted_signer
    NO_TRUST_ANCHORS = "no_trust_anchors"
    UNKNOWN_ISSUER = "unknown_issuer"
    ISSUER_NOT_CA = "issuer_not_ca"
    CHAIN_SIGNATURE_INVALID = "chain_signature_invalid"
    CERT_EXPIRED = "certificate_expired"
    CERT_NOT_YET_VALID = "certificate_not_yet_valid"


_STATUS_OF: dict[VerifyCode, SignatureStatus] = {
    VerifyCode.OK: SignatureStatus.VALID,
    VerifyCode.NOT_CMS: SignatureStatus.NOT_CMS,
    VerifyCode.UNSIGNED_PAYLOAD: SignatureStatus.NOT_CMS,
    VerifyCode.NOT_SIGNED_DATA: SignatureStatus.NOT_CMS,
    VerifyCode.DETACHED: SignatureStatus.NOT_CMS,
    VerifyCode.NO_SIGNER_INFO: SignatureStatus.BROKEN_SIGNATURE,
    VerifyCode.SIGNER_CERT_MISSING: SignatureStatus.BROKEN_SIGNATURE,
    VerifyCode.UNSUPPORTED_ALGORITHM: SignatureStatus.BROKEN_SIGNATURE,
    VerifyCode.DIGEST_MISMATCH: SignatureStatus.BROKEN_SIGNATURE,
    VerifyCode.SIGNATURE_INVALID: SignatureStatus.BROKEN_SIGNATURE,
    VerifyCode.NO_TRUST_ANCHORS: SignatureStatus.UNTRUSTED_SIGNER,
    VerifyCode.UNKNOWN_ISSUER: SignatureStatus.UNTRUSTED_SIGNER,
    VerifyCode.ISSUER_NOT_CA: SignatureStatus.UNTRUSTED_SIGNER,
    VerifyCode.CHAIN_SIGNATURE_INVALID: SignatureStatus.UNTRUSTED_SIGNER,
    VerifyCode.CERT_EXPIRED: SignatureStatus.UNTRUSTED_SIGNER,
    VerifyCode.CERT_NOT_YET_VALID: SignatureStatus.UNTRUSTED_SIGNER,
}

_CMS_TO_VERIFY = {
    CmsErrorCode.NOT_CMS: VerifyCode.NOT_CMS,
    CmsErrorCode.UNSIGNED_PAYLOAD: VerifyCode.UNSIGNED_PAYLOAD,
    CmsErrorCode.NOT_SIGNED_DATA: VerifyCode.NOT_SIGNED_DATA,
    CmsErrorCode.DETACHED: VerifyCode.DETACHED,
    CmsErrorCode.NO_SIGNER: VerifyCode.NO_SIGNER_INFO,
}

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3_256": hashes.SHA3_256,
    "sha3_384": hashes.SHA3_384,
    "sha3_512": hashes.SHA3_512,
}


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise _Unsupported(f"digest algorithm {name!r}") from None


class _Unsupported(Exception):
    pass


# ---------------------------------------------------------------------------- models


class CertInfo(BaseModel):
    """Facts about one X.509 certificate (subject names of SMC-B certs name institutions)."""

    model_config = ConfigDict(frozen=True)

    subject: str
    issuer: str
    serial: str  # hex
    not_before: datetime
    not_after: datetime
    sha256: str  # fingerprint of the DER
    der: bytes = Field(repr=False)

    @classmethod
    def of(cls, cert: x509.Certificate) -> "CertInfo":
        """The facts of ``cert``; frozen, so one instance per certificate is shared (a
        practice's every mail carries the same signer and CA certificates)."""
        return _cert_info(cert)

    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


@functools.lru_cache(maxsize=1024)
def _cert_info(cert: x509.Certificate) -> CertInfo:  # x509.Certificate hashes and compares by its DER
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertInfo(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(der).hexdigest(),
        der=der,
    )


def _name(n: x509.Name) -> str:
    try:
        return n.rfc4514_string()
    except Exception:
        return repr(n)


class CmsSignedData(BaseModel):
    """An unwrapped CMS SignedData (first SignerInfo; KIM containers have one)."""

    content: bytes = Field(repr=False)
    content_type: str  # e.g. "data"
    certificates: list[CertInfo]
    signer: CertInfo | None  # certificate matching the SignerInfo's sid, if included
    digest_algorithm: str
    signature_algorithm: str
    signing_time: datetime | None
    signed_attributes: bool
    signer_count: int

    _signer_info: Any = PrivateAttr(default=None)
    _signer_cert: Any = PrivateAttr(default=None)
    _certs: list = PrivateAttr(default_factory=list)
    # the signature check's outcome, once made (the container's bytes do not change; the
    # tampering check and the trust check of one mail both need it)
    _signature_check: tuple | None = PrivateAttr(default=None)


class VerificationResult(BaseModel):
    """Outcome of :func:`verify_cms`. ``content`` is present whenever the container could
    be unwrapped – use it only if ``status`` is ``valid`` (or for reading the ids an
    error answer needs)."""

    status: SignatureStatus
    code: VerifyCode
    reason: str
    signature_ok: bool = False
    trusted: bool = False
    content: bytes | None = Field(default=None, repr=False)
    signer: CertInfo | None = None
    chain: list[CertInfo] = Field(default_factory=list)  # signer … trust anchor
    signing_time: datetime | None = None

    @property
    def valid(self) -> bool:
        return self.status is SignatureStatus.VALID


# ---------------------------------------------------------------------------- trust


class TrustStore:
    """A set of trusted CA certificates (trust anchors)."""

    def __init__(self, certs: Iterable[x509.Certificate | bytes] = ()) -> None:
        self._certs: list[x509.Certificate] = []
        self._fps: set[bytes] = set()
        for c in certs:
            self.add(c)

    @classmethod
    def from_pem(cls, data: bytes) -> "TrustStore":
        """From a PEM bundle (several ``-----BEGIN CERTIFICATE-----`` blocks)."""
        return cls(x509.load_pem_x509_certificates(data))

    def add(self, cert: x509.Certificate | bytes) -> None:
        if isinstance(cert, (bytes, bytearray)):
            cert = bytes(cert)
            cert = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") else x509.load_der_x509_certificate(cert)
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in self._fps:
            self._fps.add(fp)
            self._certs.append(cert)

    def contains(self, cert: x509.Certificate) -> bool:
        return cert.fingerprint(hashes.SHA256()) in self._fps

    @property
    def anchors(self) -> list[x509.Certificate]:
        return list(self._certs)

    def __len__(self) -> int:
        return len(self._certs)

    def __iter__(self):
        return iter(self._certs)


def _as_store(trust: TrustStore | Iterable[x509.Certificate | bytes] | None) -> TrustStore:
    if trust is None:
        return TrustStore()
    if isinstance(trust, TrustStore):
        return trust
    return TrustStore(trust)


# ---------------------------------------------------------------------------- unwrap

_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END [A-Z0-9 ]+-----", re.DOTALL)
_B64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


def to_der(data: bytes) -> bytes:
    """DER/BER bytes of a ``.p7s`` given as DER, PEM or base64. Raises :class:`CmsError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CmsError(CmsErrorCode.NOT_CMS, f"container must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CmsError(CmsErrorCode.NOT_CMS, "container is empty")
    if data[0] == 0x30:
        return data
    head = data.lstrip()[:64]
    if head.startswith(b"-----BEGIN"):
        m = _PEM.search(data)
        if not m:
            raise CmsError(CmsErrorCode.NOT_CMS, "PEM armour without END line")
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            raise CmsError(CmsErrorCode.NOT_CMS, "PEM body is not base64") from None
        if der[:1] != b"\x30":
            raise CmsError(CmsErrorCode.NOT_CMS, "PEM body is not DER")
        return der
    stripped = head.lstrip(b"\xef\xbb\xbf")
    if stripped.startswith((b"<", b"{", b"[", b"%PDF")):
        kind = "PDF" if stripped.startswith(b"%PDF") else ("XML" if stripped.startswith(b"<") else "JSON")
        raise CmsError(CmsErrorCode.UNSIGNED_PAYLOAD, f"attachment is a plain {kind} payload, not a signed container", payload=kind)
    if len(data) >= 16 and _B64.match(data):
        try:
            der = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if der[:1] == b"\x30":
            return der
    raise CmsError(CmsErrorCode.NOT_CMS, "not a DER, PEM or base64 CMS container")


def unwrap_cms(data: bytes) -> CmsSignedData:
    """Unwrap a CMS SignedData. Raises :class:`CmsError`, never anything else."""
    der = to_der(data)
    try:
        return _unwrap(der)
    except CmsError:
        raise
    except RecursionError:
        raise CmsError(CmsErrorCode.NOT_CMS, "ASN.1 nested too deeply") from None
    except Exception as exc:
        raise CmsError(CmsErrorCode.NOT_CMS, f"not a readable CMS ContentInfo ({type(exc).__name__})") from None


def _unwrap(der: bytes) -> CmsSignedData:
    ci = acms.ContentInfo.load(der, strict=False)
    ctype = ci["content_type"].native
    if ctype != "signed_data":
        raise CmsError(CmsErrorCode.NOT_SIGNED_DATA, f"CMS content type is {ctype!r}, not signed_data", content_type=ctype)
    sd = ci["content"]
    eci = sd["encap_content_info"]
    econtent_type = eci["content_type"].native
    raw_content = eci["content"]
    content = None if raw_content is None else raw_content.native
    if content is None:
        raise CmsError(CmsErrorCode.DETACHED, "SignedData has no encapsulated content (detached signature)")
    if not isinstance(content, (bytes, bytearray)):
        content = raw_content.contents
    content = bytes(content)

    certs: list[x509.Certificate] = []
    if not isinstance(sd["certificates"], acore.Void):
        for choice in sd["certificates"]:
            if choice.name != "certificate":
                continue
            try:
                certs.append(x509.load_der_x509_certificate(choice.chosen.dump()))
            except Exception:
                continue

    sis = sd["signer_infos"]
    if len(sis) == 0:
        raise CmsError(CmsErrorCode.NO_SIGNER, "SignedData has no SignerInfo (not signed)")
    si = sis[0]
    signer_cert = _find_signer_cert(si, certs)

    signing_time = None
    signed_attrs = si["signed_attrs"]
    has_attrs = not isinstance(signed_attrs, acore.Void) and len(signed_attrs) > 0
    if has_attrs:
        for attr in signed_attrs:
            if attr["type"].native == "signing_time":
                try:
                    signing_time = attr["values"][0].native
                except Exception:
                    signing_time = None
    sig_alg = si["signature_algorithm"]
    try:
        sig_name = sig_alg.signature_algo
    except Exception:
        sig_name = str(sig_alg["algorithm"].native)
    out = CmsSignedData(
        content=content,
        content_type=str(econtent_type),
        certificates=[CertInfo.of(c) for c in certs],
        signer=CertInfo.of(signer_cert) if signer_cert is not None else None,
        digest_algorithm=str(si["digest_algorithm"]["algorithm"].native),
        signature_algorithm=str(sig_name),
        signing_time=signing_time if isinstance(signing_time, datetime) else None,
        signed_attributes=has_attrs,
        signer_count=len(sis),
    )
    out._signer_info = si
    out._signer_cert = signer_cert
    out._certs = certs
    return out


def _find_signer_cert(si: acms.SignerInfo, certs: Sequence[x509.Certificate]) -> x509.Certificate | None:
    sid = si["sid"]
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer_der = sid.chosen["issuer"]
        for c in certs:
            if c.serial_number != serial:
                continue
            try:
                raw = c.issuer.public_bytes()
                # same DER: equal without the (slow) RFC 4518 string preparation of
                # asn1crypto's Name comparison; otherwise compare semantically
                if raw == issuer_der.dump() or ax.Name.load(raw) == issuer_der:
                    return c
            except Exception:
                continue
        return None
    if sid.name == "subject_key_identifier":
        ski = sid.chosen.native
        for c in certs:
            try:
                ext = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            except x509.ExtensionNotFound:
                continue
            if ext.value.digest == ski:
                return c
    return None


# ---------------------------------------------------------------------------- verify


def _result(code: VerifyCode, reason: str, **kw: Any) -> VerificationResult:
    status = _STATUS_OF[code]
    return VerificationResult(status=status, code=code, reason=reason, **kw)


def verify_cms(
    data: bytes | CmsSignedData,
    trust: TrustStore | Iterable[x509.Certificate | bytes] | None = None,
    *,
    at: datetime | None = None,
) -> VerificationResult:
    """Verify a ``.p7s``: signature (tampering) and signer trust at time ``at``.

    ``at`` defaults to now (UTC); naive datetimes are taken as UTC. Never raises on bad
    input – the outcome is in the result.
    """
    if isinstance(data, CmsSignedData):
        sd = data
    else:
        try:
            sd = unwrap_cms(data)
        except CmsError as exc:
            return _result(_CMS_TO_VERIFY[CmsErrorCode(exc.code)], exc.reason)
    base = dict(content=sd.content, signer=sd.signer, signing_time=sd.signing_time)
    if sd._signature_check is None:
        try:
            sd._signature_check = _check_signature(sd)
        except Exception as exc:  # defensive: malformed parameters deep in the ASN.1
            sd._signature_check = (VerifyCode.SIGNATURE_INVALID, f"signature could not be checked ({type(exc).__name__})")
    code, reason = sd._signature_check
    if code is not VerifyCode.OK:
        return _result(code, reason, **base)

    store = _as_store(trust)
    when = at or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        code, reason, chain = _check_trust(sd._signer_cert, sd._certs, store, when)
    except Exception as exc:
        code, reason, chain = VerifyCode.CHAIN_SIGNATURE_INVALID, f"chain could not be checked ({type(exc).__name__})", []
    chain_info = [CertInfo.of(c) for c in chain]
    if code is not VerifyCode.OK:
        return _result(code, reason, signature_ok=True, chain=chain_info, **base)
    return _result(VerifyCode.OK, "signature valid, signer trusted", signature_ok=True, trusted=True, chain=chain_info, **base)


def _check_signature(sd: CmsSignedData) -> tuple[VerifyCode, str]:
    si = sd._signer_info
    cert: x509.Certificate | None = sd._signer_cert
    if cert is None:
        return VerifyCode.SIGNER_CERT_MISSING, "signer certificate is not in the container"
    try:
        digest_name = si["digest_algorithm"]["algorithm"].native
        digest_alg = _hash(digest_name)
        if sd.signed_attributes:
            attrs = si["signed_attrs"]
            md = None
            ctype_attr = None
            for attr in attrs:
                t = attr["type"].native
                if t == "message_digest":
                    md = attr["values"][0].native
                elif t == "content_type":
                    ctype_attr = attr["values"][0].native
            if md is None:
                return VerifyCode.SIGNATURE_INVALID, "signed attributes lack messageDigest"
            h = hashes.Hash(digest_alg)
            h.update(sd.content)
            if not hmac.compare_digest(h.finalize(), bytes(md)):
                return VerifyCode.DIGEST_MISMATCH, "message digest does not match the content (content was altered)"
            if ctype_attr is not None and ctype_attr != sd.content_type:
                return VerifyCode.SIGNATURE_INVALID, "contentType attribute does not match the encapsulated content type"
            signed = b"\x31" + attrs.dump()[1:]
        else:
            signed = sd.content
        signature = si["signature"].native
        _verify_raw(cert.public_key(), si["signature_algorithm"], digest_name, signature, signed)
    except _Unsupported as exc:
        return VerifyCode.UNSUPPORTED_ALGORITHM, f"unsupported algorithm: {exc}"
    except UnsupportedAlgorithm as exc:
        return VerifyCode.UNSUPPORTED_ALGORITHM, f"unsupported algorithm: {exc}"
    except InvalidSignature:
        return VerifyCode.SIGNATURE_INVALID, "signature does not verify with the signer's public key"
    return VerifyCode.OK, "signature valid"


def _verify_raw(pub: Any, sig_alg: Any, digest_name: str, signature: bytes, data: bytes) -> None:
    try:
        algo = sig_alg.signature_algo
    except Exception:
        raise _Unsupported(f"signature algorithm {sig_alg['algorithm'].native!r}") from None
    try:
        hash_name = sig_alg.hash_algo
    except Exception:
        hash_name = digest_name
    if algo == "rsassa_pkcs1v15":
        if not isinstance(pub, rsa.RSAPublicKey):
            raise InvalidSignature()
        pub.verify(signature, data, padding.PKCS1v15(), _hash(hash_name))
    elif algo == "rsassa_pss":
        if not isinstance(pub, rsa.RSAPublicKey):
            raise InvalidSignature()
        params = sig_alg["parameters"]
        h = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise _Unsupported(f"PSS mask generation {mgf['algorithm'].native!r}")
        mgf_h = mgf["parameters"]["algorithm"].native
        salt = params["salt_length"].native
        pub.verify(signature, data, padding.PSS(mgf=padding.MGF1(_hash(mgf_h)), salt_length=int(salt)), _hash(h))
    elif algo == "ecdsa":
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature()
        pub.verify(signature, data, ec.ECDSA(_hash(hash_name)))
    else:
        raise _Unsupported(f"signature algorithm {algo!r}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_validity(cert: x509.Certificate, when: datetime, role: str) -> tuple[VerifyCode, str] | None:
    if when < cert.not_valid_before_utc:
        return VerifyCode.CERT_NOT_YET_VALID, f"{role} certificate not valid before {cert.not_valid_before_utc.isoformat()}"
    if when > cert.not_valid_after_utc:
        return VerifyCode.CERT_EXPIRED, f"{role} certificate expired {cert.not_valid_after_utc.isoformat()}"
    return None


def _check_trust(
    signer: x509.Certificate, bag: Sequence[x509.Certificate], store: TrustStore, when: datetime, max_depth: int = 6
) -> tuple[VerifyCode, str, list[x509.Certificate]]:
    if len(store) == 0:
        return VerifyCode.NO_TRUST_ANCHORS, "no trusted CA certificates configured", []
    chain = [signer]
    current = signer
    candidates = list(store.anchors) + [c for c in bag if not store.contains(c)]
    for depth in range(max_depth):
        role = "signer" if depth == 0 else "issuer"
        bad = _check_validity(current, when, role)
        if bad:
            return bad[0], bad[1], chain
        if store.contains(current):
            return VerifyCode.OK, "trusted", chain
        issuers = [c for c in candidates if c.subject == current.issuer and c != current]
        if not issuers:
            return VerifyCode.UNKNOWN_ISSUER, f"issuer {_name(current.issuer)!r} is not a trusted CA", chain
        nxt = None
        not_ca = False
        for iss in issuers:
            if not _is_ca(iss):
                not_ca = True
                continue
            if not _issued_by(current, iss):
                continue
            nxt = iss
            break
        if nxt is None:
            if not_ca:
                return VerifyCode.ISSUER_NOT_CA, f"issuer {_name(current.issuer)!r} is not a CA certificate", chain
            return VerifyCode.CHAIN_SIGNATURE_INVALID, f"certificate is not signed by {_name(current.issuer)!r}", chain
        chain.append(nxt)
        current = nxt
    return VerifyCode.UNKNOWN_ISSUER, "certificate chain too long", chain


@functools.lru_cache(maxsize=1024)
def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer``'s key signed ``cert`` (name match and signature). A fact about the two
    certificates' bytes alone - ``x509.Certificate`` hashes and compares by its DER - so it
    is remembered: a practice signs every mail with the same certificate, and the chain
    check would otherwise verify the CA's signature on it again for each mail. Validity
    at the signing time is checked on every call (:func:`_check_validity`), never cached."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


# ---------------------------------------------------------------------------- sign


@dataclass(frozen=True)
class Signer:
    """A signing key + certificate. :meth:`sign` makes a DER CMS SignedData with the
    content encapsulated and signed attributes (cryptography's PKCS7SignatureBuilder)."""

    key: Any  # rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    extra_certs: tuple[x509.Certificate, ...] = field(default=())
    rsa_pss: bool = False

    def sign(self, content: bytes) -> bytes:
        pad = None
        if isinstance(self.key, rsa.RSAPrivateKey):
            pad = (
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
                if self.rsa_pss
                else padding.PKCS1v15()
            )
        builder = pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(
            self.cert, self.key, hashes.SHA256(), rsa_padding=pad
        )
        for c in self.extra_certs:
            builder = builder.add_certificate(c)
        return builder.sign(
            serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoCapabilities]
        )


def sign_cms(content: bytes, signer: Signer) -> bytes:
    """Convenience: ``signer.sign(content)``."""
    return signer.sign(content)
