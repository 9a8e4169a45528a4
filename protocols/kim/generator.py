"""Synthetic KIM mails for tests and the load generator (pure functions, seedable).

* :func:`make_pki` – a TEST-ONLY PKI: CA, practice signer certificates (SMC-B-like), an
  insurer signer, and a second *rogue* CA + signer that no trust store contains. EC P-256
  keys are derived from the seed (same seed → same keys and certificates, in every
  process); ``key_type="rsa"`` gives RSA 2048 (random keys, cached per process).
* :class:`MailGenerator` – builds realistic KIM mails of every :class:`Procedure` and the
  faulty variants of :class:`Fault`. Everything but the CMS signature bytes (signing
  time, ECDSA nonce) is determined by the seed. Every mail carries a synthetic patient
  name and KVNR (returned in :class:`GeneratedMail`) so tests can scan stores and logs
  for personal data leaks; the eAU Storno is the exception (its bundle has no patient).

``python -m protocols.kim.generator --bench`` measures the generation rate.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import StrEnum
from functools import lru_cache
from typing import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, Field

from protocols.kim._fhirxml import xml_escape as _e
from protocols.kim.compose import OutAttachment, compose, mail_date
from protocols.kim.pkcs7 import Signer, TrustStore
from protocols.kim.procedures import Procedure

# ---------------------------------------------------------------------------- PKI

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=timezone.utc)
_NOT_AFTER = datetime(2045, 1, 1, tzinfo=timezone.utc)


def _derive_ec(seed: int, label: str) -> ec.EllipticCurvePrivateKey:
    d = int.from_bytes(hashlib.sha256(f"automat-test-pki/{seed}/{label}".encode()).digest(), "big")
    return ec.derive_private_key(d % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def pki_name(cn: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def issue_cert(
    subject: x509.Name,
    key,
    issuer: x509.Name,
    issuer_key,
    serial: int,
    *,
    ca: bool,
    not_before: datetime = _NOT_BEFORE,
    not_after: datetime = _NOT_AFTER,
) -> x509.Certificate:
    """Issue a TEST-ONLY certificate (deterministic for EC issuer keys)."""
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        return b.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class TestPki:
    """TEST-ONLY certificates and keys. Trust :attr:`ca_cert` (see :meth:`trust_store`);
    :attr:`rogue_ca_cert` is never trusted."""

    __test__ = False  # not a pytest class

    ca_cert: x509.Certificate
    ca_key: object  # to issue further test certificates (expired, other names, ...)
    practice_signers: tuple[Signer, ...]  # one per synthetic practice, issued by ca_cert
    insurer_signer: Signer  # the insurer (answers, eEB Bescheinigung), issued by ca_cert
    rogue_ca_cert: x509.Certificate
    rogue_signer: Signer  # issued by rogue_ca_cert

    def trust_store(self) -> TrustStore:
        return TrustStore([self.ca_cert])

    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)


@lru_cache(maxsize=8)
def make_pki(seed: int = 0, key_type: str = "ec", practices: int = 4) -> TestPki:
    """Create (once per process and arguments) the test PKI."""
    if key_type not in ("ec", "rsa"):
        raise ValueError("key_type must be 'ec' or 'rsa'")

    def key(label: str):
        if key_type == "ec":
            return _derive_ec(seed, label)
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key = key("ca")
    ca_name = pki_name("automat GEM.SMCB-CA TEST-ONLY", "automat Test-PKI NOT-VALID")
    ca = issue_cert(ca_name, ca_key, ca_name, ca_key, 0x1000 + seed, ca=True)
    signers = []
    for i in range(practices):
        k = key(f"practice-{i}")
        c = issue_cert(pki_name(f"Praxis {i + 1} TEST-ONLY", f"{_bsnr(seed, i)} NOT-VALID"), k, ca_name, ca_key, 0x2000 + i, ca=False)
        signers.append(Signer(key=k, cert=c))
    ik = key("insurer")
    ic = issue_cert(pki_name("Testkasse eAU-Eingang TEST-ONLY", "Testkasse NOT-VALID"), ik, ca_name, ca_key, 0x3000, ca=False)
    rogue_key = key("rogue-ca")
    rogue_name = pki_name("Unbekannte CA TEST-ONLY", "Rogue Test-PKI NOT-VALID")
    rogue = issue_cert(rogue_name, rogue_key, rogue_name, rogue_key, 0x4000, ca=True)
    rk = key("rogue-signer")
    rc = issue_cert(pki_name("Praxis Unbekannt TEST-ONLY", "999999999 NOT-VALID"), rk, rogue_name, rogue_key, 0x4001, ca=False)
    return TestPki(
        ca_cert=ca,
        ca_key=ca_key,
        practice_signers=tuple(signers),
        insurer_signer=Signer(key=ik, cert=ic),
        rogue_ca_cert=rogue,
        rogue_signer=Signer(key=rk, cert=rc),
    )


# ---------------------------------------------------------------------------- synthetic data

_GIVEN = (
    "Ludmilla", "Hartmut", "Sieglinde", "Waldemar", "Friederike", "Kunibert", "Adelheid", "Ottokar", "Mechthild",
    "Reinhold", "Hiltrud", "Eberhard", "Roswitha", "Gottfried", "Walburga", "Leberecht", "Irmgard", "Bertram",
    "Gunhild", "Wendelin", "Jolanda", "Ansgar", "Rotraut", "Isidor", "Brunhilde", "Theodor", "Lieselotte", "Fridolin",
)
_FAM_A = (
    "Kranz", "Wetter", "Holz", "Apfel", "Sonnen", "Eichen", "Mühl", "Stein", "Brunn", "Feld", "Linden", "Rosen",
    "Wald", "Berg", "Tann", "Hasel", "Birken", "Quell", "Schnee", "Korn", "Fichten", "Weiden", "Morgen", "Abend",
)
_FAM_B = (
    "huber", "mayr", "wanger", "stätter", "brenner", "gruber", "lechner", "rieder", "hofer", "moser", "bichler",
    "reiter", "scheidt", "kötter", "bröker", "kamp", "wiesche", "haus", "meier", "bach", "thal", "gärtner",
)
_ICD = (
    ("J06.9", None), ("M54.5", None), ("A09.9", None), ("B34.9", None), ("F32.1", None), ("F43.2", None),
    ("K52.9", None), ("J20.9", None), ("M54.4", None), ("S93.40", "L"), ("J01.9", None), ("R10.4", None),
    ("N39.0", None), ("J11.1", None), ("G43.9", None), ("M77.1", "R"), ("S83.6", "L"), ("F48.0", None),
    ("U07.1", None), ("M25.56", "R"), ("I10.90", None), ("K29.1", None), ("H66.9", "B"), ("S62.60", "R"),
)
_INSURERS = (
    ("101575519", "Testkasse Nord"), ("104212059", "Testkasse West"), ("108310400", "Testkasse Süd"),
    ("109519005", "Testkasse Ost"), ("102114819", "Test-BKK Mitte"), ("105830016", "Test-IKK Küste"),
)
_CITIES = (("Dortmund", "44227"), ("Kassel", "34117"), ("Leipzig", "04109"), ("Ulm", "89073"), ("Kiel", "24103"), ("Trier", "54290"))
_STREETS = ("Lindenallee", "Am Mühlbach", "Kastanienweg", "Hauptstraße", "Gartenstraße", "Schulstraße", "Birkenhof")
_PVS = ("PraxisSoft;4.2.1", "MediPVS;2024.3", "ArztKonsole;11.0", "DentaPlan;7.1")
_FACH = ("Facharzt für Allgemeinmedizin", "Facharzt für Innere Medizin", "Praktischer Arzt", "Facharzt für Orthopädie")


def _bsnr(seed: int, i: int) -> str:
    r = random.Random(f"bsnr/{seed}/{i}")
    return f"{r.choice((17, 20, 38, 46, 52, 71, 72, 78, 93))}{r.randrange(1000000, 9999999)}"


def kvnr_check_digit(letter: str, digits8: str) -> int:
    """Prüfziffer of a KVNR (letter → 01..26, weights 1,2,1,2,…, cross sums, mod 10)."""
    s = f"{ord(letter) - 64:02d}{digits8}"
    total = 0
    for i, ch in enumerate(s):
        p = int(ch) * (1 if i % 2 == 0 else 2)
        total += p // 10 + p % 10
    return total % 10


def _kvnr(rng: random.Random) -> str:
    letter = chr(65 + rng.randrange(26))
    d8 = f"{rng.randrange(10**8):08d}"
    return f"{letter}{d8}{kvnr_check_digit(letter, d8)}"


def _lanr(rng: random.Random) -> str:
    d6 = f"{rng.randrange(100000, 999999)}"
    s = sum(int(c) * (4 if i % 2 == 0 else 9) for i, c in enumerate(d6))
    return f"{d6}{(10 - s % 10) % 10}{rng.choice(('01', '03', '23', '10'))}"


def _uuid(rng: random.Random) -> str:
    """A random (version 4) UUID string drawn from ``rng`` (same as uuid.UUID(int=…, version=4))."""
    n = rng.getrandbits(128)
    n = (n & ~(0xF000 << 64)) | (0x4000 << 64)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---------------------------------------------------------------------------- faults + result


class Fault(StrEnum):
    NONE = "none"
    BROKEN_SIGNATURE = "broken_signature"  # payload byte flipped after signing
    UNTRUSTED_SIGNER = "untrusted_signer"  # signed under the rogue CA
    NON_FHIR_PAYLOAD = "non_fhir_payload"  # signed XML outside the FHIR namespace
    WRONG_PROFILE = "wrong_profile"  # FHIR Bundle with an eRezept profile
    DUPLICATE = "duplicate"  # same .p7s (same Bundle.identifier) as an earlier mail, new Message-ID
    BROKEN_MIME = "broken_mime"  # multipart boundary never appears
    TWO_ATTACHMENTS = "two_attachments"  # .p7s plus a second attachment
    MISSING_DIENSTKENNUNG = "missing_dienstkennung"  # no X-KIM-Dienstkennung → eMailPLUS
    OVERSIZED = "oversized"  # larger than the generator's ``oversize_bytes``


#: The first typed code each fault is expected to produce in the technical layer.
EXPECTED_CODE: dict[Fault, str | None] = {
    Fault.NONE: None,
    Fault.BROKEN_SIGNATURE: "digest_mismatch",
    Fault.UNTRUSTED_SIGNER: "unknown_issuer",
    Fault.NON_FHIR_PAYLOAD: "payload_not_fhir",
    Fault.WRONG_PROFILE: "payload_wrong_profile",
    Fault.DUPLICATE: "duplicate",
    Fault.BROKEN_MIME: "mime_broken",
    Fault.TWO_ATTACHMENTS: "mime_too_many_attachments",
    Fault.MISSING_DIENSTKENNUNG: "missing_dienstkennung",
    Fault.OVERSIZED: "mime_oversized",
}

#: Faults each procedure can be generated with.
SUPPORTED_FAULTS: dict[Procedure, frozenset[Fault]] = {
    Procedure.EAU_LIEFERUNG: frozenset(Fault),
    Procedure.EAU_STORNO: frozenset(Fault) - {Fault.NON_FHIR_PAYLOAD, Fault.WRONG_PROFILE, Fault.DUPLICATE},
    Procedure.EEB_ANFRAGE: frozenset(Fault) - {Fault.NON_FHIR_PAYLOAD, Fault.WRONG_PROFILE, Fault.DUPLICATE},
    Procedure.EBZ: frozenset({Fault.NONE, Fault.BROKEN_SIGNATURE, Fault.UNTRUSTED_SIGNER, Fault.BROKEN_MIME, Fault.MISSING_DIENSTKENNUNG, Fault.OVERSIZED}),
    Procedure.AAR: frozenset({Fault.NONE, Fault.BROKEN_SIGNATURE, Fault.UNTRUSTED_SIGNER, Fault.BROKEN_MIME, Fault.MISSING_DIENSTKENNUNG, Fault.OVERSIZED}),
    Procedure.EMAILPLUS: frozenset({Fault.NONE, Fault.BROKEN_MIME, Fault.OVERSIZED}),
}

#: Default mix of the benchmark (BENCHMARK.md): eAU 80 %, eEB 8 %, EBZ 5 %, AAR 2 %, eMailPLUS 5 %.
DEFAULT_MIX: dict[Procedure, float] = {
    Procedure.EAU_LIEFERUNG: 0.80,
    Procedure.EEB_ANFRAGE: 0.08,
    Procedure.EBZ: 0.05,
    Procedure.AAR: 0.02,
    Procedure.EMAILPLUS: 0.05,
}
DEFAULT_FAULTS: tuple[Fault, ...] = (Fault.BROKEN_SIGNATURE, Fault.UNTRUSTED_SIGNER, Fault.NON_FHIR_PAYLOAD, Fault.DUPLICATE)


class GeneratedMail(BaseModel):
    """One generated mail and what it contains (for assertions and leak scans)."""

    raw: bytes = Field(repr=False)
    procedure: Procedure  # the intended procedure (even if the fault hides it)
    fault: Fault
    message_id: str
    sender: str
    recipient: str
    subject: str
    bundle_id: str | None = None  # Bundle.identifier UUID (eAU, Storno, eEB), document id otherwise
    patient_name: str | None = None
    kvnr: str | None = None
    duplicate_of: str | None = None  # Message-ID of the original for Fault.DUPLICATE
    cancels: str | None = None  # Storno: Bundle.identifier of the cancelled eAU
    expected_code: str | None = None  # see EXPECTED_CODE

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass
class _Person:
    given: str
    family: str
    kvnr: str
    birth: date
    street: str
    house: str
    city: str
    plz: str

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}"


@dataclass
class _Practice:
    index: int
    bsnr: str
    lanr: str
    doc_given: str
    doc_family: str
    fach: str
    phone: str
    city: str
    plz: str
    street: str
    address: str
    pvs: str


# ---------------------------------------------------------------------------- generator


class MailGenerator:
    """Deterministic (per seed) builder of KIM mails.

    ``mailboxes`` are the insurer's KIM addresses the mails go to (round robin by
    choice); ``environment`` is ``"T"`` (Test) or ``"E"`` (Echtbetrieb) in the naming;
    ``oversize_bytes`` is the size :attr:`Fault.OVERSIZED` mails exceed; ``ebz_dienstkennung``
    / ``aar_dienstkennung`` are the header values used for EBZ and AAR mails.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        pki: TestPki | None = None,
        mailboxes: Sequence[str] | None = None,
        environment: str = "T",
        base_time: datetime = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc),
        oversize_bytes: int = 25 * 1024 * 1024 + 1024,
        ebz_dienstkennung: str = "EBZ;Antrag;V1.0",
        aar_dienstkennung: str = "AAR;Antrag;V1.0",
        eau_version: str = "V1.2",
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.pki = pki or make_pki(seed)
        self.mailboxes = list(mailboxes) if mailboxes else [f"eau-{i:02d}@testkasse.kim.telematik-test" for i in range(1, 21)]
        self.environment = environment
        self.base_time = base_time
        self.oversize_bytes = oversize_bytes
        self.ebz_dienstkennung = ebz_dienstkennung
        self.aar_dienstkennung = aar_dienstkennung
        self.eau_version = eau_version
        self._count = 0
        self.history: deque[GeneratedMail] = deque(maxlen=256)  # recent valid eAU (duplicates, Storno)
        self._p7s: dict[str, bytes] = {}  # message_id → attachment of recent eAU (for duplicates)
        prng = random.Random(f"practices/{seed}")
        self.practices = []
        for i in range(len(self.pki.practice_signers)):
            city, plz = prng.choice(_CITIES)
            street = prng.choice(_STREETS)
            self.practices.append(
                _Practice(
                    index=i, bsnr=_bsnr(seed, i), lanr=_lanr(prng), doc_given=prng.choice(_GIVEN),
                    doc_family=prng.choice(_FAM_A) + prng.choice(_FAM_B), fach=prng.choice(_FACH),
                    phone=f"0{prng.randrange(200, 999)}{prng.randrange(100000, 999999)}", city=city, plz=plz,
                    street=street, address=f"praxis-{_bsnr(seed, i)}@arzt.kim.telematik-test", pvs=prng.choice(_PVS),
                )
            )

    # ------------------------------------------------------------------ helpers
    def _next_time(self) -> datetime:
        self._count += 1
        return self.base_time + timedelta(seconds=self._count * 7 + self.rng.randrange(7))

    def _person(self) -> _Person:
        r = self.rng
        city, plz = r.choice(_CITIES)
        return _Person(
            given=r.choice(_GIVEN),
            family=r.choice(_FAM_A) + r.choice(_FAM_B),
            kvnr=_kvnr(r),
            birth=date(1950, 1, 1) + timedelta(days=r.randrange(50 * 365)),
            street=r.choice(_STREETS),
            house=str(r.randrange(1, 120)),
            city=city,
            plz=plz,
        )

    def _mid(self, practice: _Practice) -> str:
        return f"<{_uuid(self.rng)}@{practice.address.split('@')[1]}>"

    def _headers(self, *, practice: _Practice, to: str, mid: str, subject: str, when: datetime, dienstkennung: str | None) -> list[tuple[str, str]]:
        h = [
            ("Date", mail_date(when)),
            ("From", practice.address),
            ("Reply-To", practice.address),
            ("To", to),
            ("Message-ID", mid),
            ("Subject", subject),
        ]
        if dienstkennung:
            h.append(("X-KIM-Dienstkennung", dienstkennung))
        h.append(("X-KIM-Sendersystem", practice.pvs))
        return h

    def _sign(self, content: bytes, practice: _Practice, fault: Fault) -> bytes:
        signer = self.pki.rogue_signer if fault is Fault.UNTRUSTED_SIGNER else self.pki.practice_signers[practice.index]
        der = signer.sign(content)
        if fault is Fault.BROKEN_SIGNATURE:
            der = _flip_payload_byte(der, content)
        return der

    def _finish(
        self, *, fault: Fault, headers: list[tuple[str, str]], attachments: list[OutAttachment], text: str | None
    ) -> bytes:
        if fault is Fault.TWO_ATTACHMENTS:
            attachments = attachments + [
                OutAttachment(filename="Arbeitsunfaehigkeit_Ausdruck.pdf", data=_FAKE_PDF, content_type="application/pdf")
            ]
        boundary = f"----=_Part_{self.rng.getrandbits(64):016x}"
        raw = compose(
            headers, text=text, attachments=attachments, boundary=boundary, multipart=fault is Fault.BROKEN_MIME or None
        )
        if fault is Fault.BROKEN_MIME:
            # the delimiter lines no longer match the declared boundary
            raw = raw.replace(f"--{boundary}".encode(), f"--{boundary}X".encode())
        elif fault is Fault.OVERSIZED:
            missing = self.oversize_bytes - len(raw) + 1
            if missing > 0:
                filler = OutAttachment(
                    filename="Anlage_Scan.tif", data=_filler(missing), content_type="image/tiff", description="Anlage"
                )
                raw = compose(headers, text=text, attachments=attachments + [filler], boundary=boundary)
        return raw

    def _check(self, proc: Procedure, fault: Fault) -> Fault:
        fault = Fault(fault)
        if fault not in SUPPORTED_FAULTS[proc]:
            raise ValueError(f"{proc.value} cannot be generated with fault {fault.value}")
        return fault

    # ------------------------------------------------------------------ procedures
    def eau(self, fault: Fault = Fault.NONE, *, of: GeneratedMail | None = None) -> GeneratedMail:
        """An ``eAU;Lieferung`` mail. ``Fault.DUPLICATE`` re-sends ``of`` (default: the
        most recent valid eAU; one is made first if there is none)."""
        fault = self._check(Procedure.EAU_LIEFERUNG, fault)
        if fault is Fault.DUPLICATE:
            return self._duplicate(of)
        r = self.rng
        practice = r.choice(self.practices)
        person = self._person()
        when = self._next_time()
        bundle = _uuid(r)
        to = r.choice(self.mailboxes)
        mid = self._mid(practice)
        xml = self._eau_xml(bundle, person, practice, when, r, wrong_profile=fault is Fault.WRONG_PROFILE)
        if fault is Fault.NON_FHIR_PAYLOAD:
            xml = _legacy_xml(bundle, person, practice, when)
        p7s = self._sign(xml, practice, fault)
        env = self.environment
        subject = f"{env}EAU0_{bundle}"
        dk = None if fault is Fault.MISSING_DIENSTKENNUNG else f"eAU;Lieferung;{self.eau_version}"
        headers = self._headers(practice=practice, to=to, mid=mid, subject=subject, when=when, dienstkennung=dk)
        att = OutAttachment(filename=f"{env}EAU0_{bundle}.p7s", data=p7s, description="eAU")
        raw = self._finish(fault=fault, headers=headers, attachments=[att], text=None)
        gm = GeneratedMail(
            raw=raw, procedure=Procedure.EAU_LIEFERUNG, fault=fault, message_id=mid, sender=practice.address,
            recipient=to, subject=subject, bundle_id=bundle, patient_name=person.name, kvnr=person.kvnr,
            expected_code=EXPECTED_CODE[fault],
        )
        if fault is Fault.NONE:
            self.history.append(gm)
            self._p7s[mid] = p7s
            while len(self._p7s) > self.history.maxlen:
                self._p7s.pop(next(iter(self._p7s)))
        return gm

    def _duplicate(self, of: GeneratedMail | None) -> GeneratedMail:
        if of is None:
            of = self.history[-1] if self.history else self.eau()
        p7s = self._p7s.get(of.message_id)
        if p7s is None:
            raise ValueError("the original of a duplicate must be a recent valid eAU of this generator")
        r = self.rng
        practice = next(p for p in self.practices if p.address == of.sender)
        when = self._next_time()
        mid = self._mid(practice)
        headers = self._headers(
            practice=practice, to=of.recipient, mid=mid, subject=of.subject, when=when,
            dienstkennung=f"eAU;Lieferung;{self.eau_version}",
        )
        env = of.subject[0]
        att = OutAttachment(filename=f"{env}EAU0_{of.bundle_id}.p7s", data=p7s, description="eAU")
        raw = compose(headers, attachments=[att], boundary=f"----=_Part_{r.getrandbits(64):016x}")
        return GeneratedMail(
            raw=raw, procedure=Procedure.EAU_LIEFERUNG, fault=Fault.DUPLICATE, message_id=mid, sender=of.sender,
            recipient=of.recipient, subject=of.subject, bundle_id=of.bundle_id, patient_name=of.patient_name,
            kvnr=of.kvnr, duplicate_of=of.message_id, expected_code=EXPECTED_CODE[Fault.DUPLICATE],
        )

    def eau_storno(self, fault: Fault = Fault.NONE, *, cancels: GeneratedMail | None = None) -> GeneratedMail:
        """An ``eAU;Storno-Arzt;V1.2`` mail cancelling ``cancels`` (default: a recent eAU
        of this generator, else a random identifier). Carries no patient data."""
        fault = self._check(Procedure.EAU_STORNO, fault)
        r = self.rng
        target = cancels or (self.history[r.randrange(len(self.history))] if self.history else None)
        practice = next((p for p in self.practices if target and p.address == target.sender), None) or r.choice(self.practices)
        cancelled = target.bundle_id if target else _uuid(r)
        when = self._next_time()
        bundle = _uuid(r)
        to = target.recipient if target else r.choice(self.mailboxes)
        mid = self._mid(practice)
        xml = _storno_xml(bundle, cancelled, practice, when, r)
        p7s = self._sign(xml, practice, fault)
        env = self.environment
        subject = f"{env}EAU0_{bundle}"
        dk = None if fault is Fault.MISSING_DIENSTKENNUNG else "eAU;Storno-Arzt;V1.2"
        headers = self._headers(practice=practice, to=to, mid=mid, subject=subject, when=when, dienstkennung=dk)
        att = OutAttachment(filename=f"{env}EAU0_{bundle}.p7s", data=p7s, description="eAU")
        raw = self._finish(fault=fault, headers=headers, attachments=[att], text=None)
        return GeneratedMail(
            raw=raw, procedure=Procedure.EAU_STORNO, fault=fault, message_id=mid, sender=practice.address,
            recipient=to, subject=subject, bundle_id=bundle, cancels=cancelled, expected_code=EXPECTED_CODE[fault],
        )

    def eeb_anfrage(self, fault: Fault = Fault.NONE) -> GeneratedMail:
        """An ``eEB;Anfrage;V1.0`` mail (EEBKnownPatient with KVNR and name)."""
        fault = self._check(Procedure.EEB_ANFRAGE, fault)
        r = self.rng
        practice = r.choice(self.practices)
        person = self._person()
        when = self._next_time()
        req = _uuid(r)
        ik, _ = r.choice(_INSURERS)
        to = r.choice(self.mailboxes)
        mid = self._mid(practice)
        xml = _eeb_xml(req, person, practice, when, ik, r)
        p7s = self._sign(xml, practice, fault)
        env = self.environment
        subject = f"{env}EEB0_ANF_{req}"
        dk = None if fault is Fault.MISSING_DIENSTKENNUNG else "eEB;Anfrage;V1.0"
        headers = self._headers(practice=practice, to=to, mid=mid, subject=subject, when=when, dienstkennung=dk)
        att = OutAttachment(filename=f"{subject}.p7s", data=p7s, description="eEB_ANF")
        raw = self._finish(fault=fault, headers=headers, attachments=[att], text=f"eEB Anfrage {subject}")
        return GeneratedMail(
            raw=raw, procedure=Procedure.EEB_ANFRAGE, fault=fault, message_id=mid, sender=practice.address,
            recipient=to, subject=subject, bundle_id=req, patient_name=person.name, kvnr=person.kvnr,
            expected_code=EXPECTED_CODE[fault],
        )

    def _other(self, proc: Procedure, fault: Fault) -> GeneratedMail:
        fault = self._check(proc, fault)
        r = self.rng
        practice = r.choice(self.practices)
        person = self._person()
        when = self._next_time()
        doc = _uuid(r)
        to = r.choice(self.mailboxes)
        mid = self._mid(practice)
        if proc is Procedure.EMAILPLUS:
            subject = r.choice(("Rückfrage zu Versichertem", "Bitte um Rückruf", "Nachreichung Unterlagen", "Anfrage Kostenübernahme"))
            dk = r.choice((None, "KIM-Mail;Default;V1.0"))
            headers = self._headers(practice=practice, to=to, mid=mid, subject=subject, when=when, dienstkennung=dk)
            text = (
                "Sehr geehrte Damen und Herren,\n\n"
                f"wir bitten um Rückmeldung zu Ihrem Versicherten {person.name} (KVNR {person.kvnr}, "
                f"geb. {person.birth.strftime('%d.%m.%Y')}).\n"
                + "Die Unterlagen zur Behandlung liegen vor und werden auf Wunsch nachgereicht.\n" * r.randrange(1, 6)
                + f"\nMit freundlichen Grüßen\nDr. {practice.doc_given} {practice.doc_family}\n{practice.city}\n"
            )
            raw = self._finish(fault=fault, headers=headers, attachments=[], text=text)
            return GeneratedMail(
                raw=raw, procedure=proc, fault=fault, message_id=mid, sender=practice.address, recipient=to,
                subject=subject, bundle_id=doc, patient_name=person.name, kvnr=person.kvnr,
                expected_code=EXPECTED_CODE[fault],
            )
        kind = "EBZ" if proc is Procedure.EBZ else "AAR"
        dk_value = self.ebz_dienstkennung if proc is Procedure.EBZ else self.aar_dienstkennung
        xml = _antrag_xml(kind, doc, person, practice, when, r)
        p7s = self._sign(xml, practice, fault)
        subject = f"{kind}_{doc}"
        dk = None if fault is Fault.MISSING_DIENSTKENNUNG else dk_value
        headers = self._headers(practice=practice, to=to, mid=mid, subject=subject, when=when, dienstkennung=dk)
        att = OutAttachment(filename=f"{subject}.p7s", data=p7s, description=kind)
        raw = self._finish(fault=fault, headers=headers, attachments=[att], text=None)
        return GeneratedMail(
            raw=raw, procedure=proc, fault=fault, message_id=mid, sender=practice.address, recipient=to,
            subject=subject, bundle_id=doc, patient_name=person.name, kvnr=person.kvnr, expected_code=EXPECTED_CODE[fault],
        )

    def ebz(self, fault: Fault = Fault.NONE) -> GeneratedMail:
        """An EBZ mail (dental treatment plan; synthetic signed XML payload)."""
        return self._other(Procedure.EBZ, fault)

    def aar(self, fault: Fault = Fault.NONE) -> GeneratedMail:
        """An AAR mail (rehab application; synthetic signed XML payload)."""
        return self._other(Procedure.AAR, fault)

    def emailplus(self, fault: Fault = Fault.NONE) -> GeneratedMail:
        """A free-text eMailPLUS mail (no or a generic Dienstkennung)."""
        return self._other(Procedure.EMAILPLUS, fault)

    def generate(self, procedure: Procedure, fault: Fault = Fault.NONE) -> GeneratedMail:
        """Dispatch by procedure (Bescheinigung/Fehler are answers, not generated here)."""
        procedure = Procedure(procedure)
        if procedure is Procedure.EAU_LIEFERUNG:
            return self.eau(fault)
        if procedure is Procedure.EAU_STORNO:
            return self.eau_storno(fault)
        if procedure is Procedure.EEB_ANFRAGE:
            return self.eeb_anfrage(fault)
        if procedure in (Procedure.EBZ, Procedure.AAR, Procedure.EMAILPLUS):
            return self._other(procedure, fault)
        raise ValueError(f"{procedure.value} mails are answers; build them with protocols.kim.eeb")

    def mix(
        self,
        n: int,
        *,
        weights: dict[Procedure, float] | None = None,
        fault_rate: float = 0.0,
        faults: Sequence[Fault] = DEFAULT_FAULTS,
    ) -> Iterator[GeneratedMail]:
        """``n`` mails in the benchmark mix; a share ``fault_rate`` of them faulty (faults
        drawn from ``faults`` among those the procedure supports; duplicates only once a
        valid eAU exists)."""
        weights = weights or DEFAULT_MIX
        procs = list(weights)
        cum = []
        acc = 0.0
        for p in procs:
            acc += weights[p]
            cum.append(acc)
        for _ in range(n):
            x = self.rng.random() * acc
            proc = procs[next(i for i, c in enumerate(cum) if x <= c)]
            fault = Fault.NONE
            if fault_rate > 0 and self.rng.random() < fault_rate:
                allowed = [f for f in faults if f in SUPPORTED_FAULTS[proc] and f is not Fault.NONE]
                if Fault.DUPLICATE in allowed and not self.history:
                    allowed.remove(Fault.DUPLICATE)
                if allowed:
                    fault = self.rng.choice(allowed)
            yield self.generate(proc, fault)

    # ------------------------------------------------------------------ payloads
    def _eau_xml(self, bundle: str, p: _Person, pr: _Practice, when: datetime, r: random.Random, *, wrong_profile: bool) -> bytes:
        ids = [_uuid(r) for _ in range(8)]
        comp_id, pat_id, prac_id, org_id, au_id, cov_id, role_id, bid = ids
        ik, kasse = r.choice(_INSURERS)
        n_icd = r.randrange(1, 5)
        icds = r.sample(_ICD, n_icd)
        icd_ids = [_uuid(r) for _ in icds]
        folge = r.random() < 0.3
        start = when.date() - timedelta(days=r.randrange(0, 4) + (7 if folge else 0))
        end = when.date() + timedelta(days=r.randrange(2, 15))
        profile = "https://fhir.kbv.de/StructureDefinition/KBV_PR_ERP_Bundle|1.1.0" if wrong_profile else "https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Bundle|1.2"
        ts = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        sections = "".join(_SECTION.format(code="ICD", ref=f"Condition/{i}") for i in icd_ids)
        sections += _SECTION.format(code="AU_Condition", ref=f"Condition/{au_id}")
        sections += _SECTION.format(code="Coverage", ref=f"Coverage/{cov_id}")
        sections += _SECTION.format(code="FOR_PractitionerRole", ref=f"PractitionerRole/{role_id}")
        conds = "".join(
            _ICD_COND.format(
                base=_BASE, id=cid, code=code, pat=pat_id, prac=prac_id,
                side=_SIDE.format(side=side) if side else "", sicherheit=r.choice("GGGGV"),
            )
            for cid, (code, side) in zip(icd_ids, icds)
        )
        period_start = "" if folge else f'\n            <start value="{start.isoformat()}" />'
        xml = _EAU_TEMPLATE.format(
            base=_BASE, bid=bid, ts=ts, profile=profile, bundle=bundle, comp=comp_id, legal="01" if r.random() < 0.9 else "00",
            au_type="FOLGE" if folge else "ERST", pat=pat_id, prac=prac_id, org=org_id, date=when.date().isoformat(),
            sections=sections, kvnr=p.kvnr, family=_e(p.family), given=_e(p.given), birth=p.birth.isoformat(),
            street=_e(p.street), house=p.house, city=_e(p.city), plz=p.plz, lanr=pr.lanr, doc_family=_e(pr.doc_family),
            doc_given=_e(pr.doc_given), fach=_e(pr.fach), bsnr=pr.bsnr, phone=pr.phone, org_city=_e(pr.city),
            org_plz=pr.plz, org_street=_e(pr.street), au=au_id, asserted=start.isoformat(), period_start=period_start,
            end=end.isoformat(), cov=cov_id, ik=ik, kasse=_e(kasse), conds=conds, role=role_id,
            wop=r.choice(("17", "20", "38", "46", "52", "71")),
        )
        return xml.encode("utf-8")


# ---------------------------------------------------------------------------- templates

_BASE = "http://pvs.praxis.local/fhir"
_FAKE_PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def _filler(n: int) -> bytes:
    block = hashlib.sha256(b"automat-filler").digest() * 2048  # 64 KiB, not compressible by eye
    return (block * (n // len(block) + 1))[: n * 3 // 4 + 1024]


def _flip_payload_byte(der: bytes, content: bytes) -> bytes:
    """Alter one character of the encapsulated content inside the DER (keeps XML valid)."""
    at = der.find(content[:64])
    if at < 0:
        raise RuntimeError("payload not found in the CMS container")
    pos = content.find(b'<id value="')
    i = at + (pos + 11 if pos >= 0 else len(content) // 2)
    b = bytearray(der)
    b[i] = ord("0") if b[i] != ord("0") else ord("1")
    return bytes(b)


_SECTION = """
        <section>
          <code>
            <coding>
              <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_FOR_Section_Type" />
              <code value="{code}" />
            </coding>
          </code>
          <entry>
            <reference value="{ref}" />
          </entry>
        </section>"""

_SIDE = """
            <extension url="http://fhir.de/StructureDefinition/seitenlokalisation">
              <valueCoding>
                <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_ICD_SEITENLOKALISATION" />
                <code value="{side}" />
              </valueCoding>
            </extension>"""

_ICD_COND = """
  <entry>
    <fullUrl value="{base}/Condition/{id}" />
    <resource>
      <Condition xmlns="http://hl7.org/fhir">
        <id value="{id}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Condition_ICD|1.2" />
        </meta>
        <clinicalStatus>
          <coding>
            <system value="http://terminology.hl7.org/CodeSystem/condition-clinical" />
            <code value="active" />
          </coding>
        </clinicalStatus>
        <verificationStatus>
          <coding>
            <system value="http://terminology.hl7.org/CodeSystem/condition-ver-status" />
            <code value="confirmed" />
          </coding>
        </verificationStatus>
        <code>
          <coding>
            <extension url="http://fhir.de/StructureDefinition/icd-10-gm-diagnosesicherheit">
              <valueCoding>
                <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_ICD_DIAGNOSESICHERHEIT" />
                <code value="{sicherheit}" />
              </valueCoding>
            </extension>{side}
            <system value="http://fhir.de/CodeSystem/bfarm/icd-10-gm" />
            <version value="2025" />
            <code value="{code}" />
          </coding>
        </code>
        <subject>
          <reference value="Patient/{pat}" />
        </subject>
        <asserter>
          <reference value="Practitioner/{prac}" />
        </asserter>
      </Condition>
    </resource>
  </entry>"""

_EAU_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<Bundle xmlns="http://hl7.org/fhir">
  <id value="{bid}" />
  <meta>
    <lastUpdated value="{ts}" />
    <profile value="{profile}" />
  </meta>
  <identifier>
    <system value="urn:ietf:rfc:3986" />
    <value value="urn:uuid:{bundle}" />
  </identifier>
  <type value="document" />
  <timestamp value="{ts}" />
  <entry>
    <fullUrl value="{base}/Composition/{comp}" />
    <resource>
      <Composition xmlns="http://hl7.org/fhir">
        <id value="{comp}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Composition|1.2" />
        </meta>
        <extension url="https://fhir.kbv.de/StructureDefinition/KBV_EX_FOR_Legal_basis">
          <valueCoding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_STATUSKENNZEICHEN" />
            <code value="{legal}" />
          </valueCoding>
        </extension>
        <status value="final" />
        <type>
          <coding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_EAU_AU_Type" />
            <code value="{au_type}" />
          </coding>
          <coding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_FORMULAR_ART" />
            <code value="e010" />
          </coding>
        </type>
        <subject>
          <reference value="Patient/{pat}" />
        </subject>
        <date value="{date}" />
        <author>
          <reference value="Practitioner/{prac}" />
          <type value="Practitioner" />
        </author>
        <author>
          <type value="Device" />
          <identifier>
            <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_FOR_Pruefnummer" />
            <value value="Y/400/2501/36/999" />
          </identifier>
        </author>
        <title value="Arbeitsunfähigkeit" />
        <custodian>
          <reference value="Organization/{org}" />
        </custodian>{sections}
      </Composition>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{base}/Patient/{pat}" />
    <resource>
      <Patient xmlns="http://hl7.org/fhir">
        <id value="{pat}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Patient|1.2" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://fhir.de/CodeSystem/identifier-type-de-basis" />
              <code value="KVZ10" />
            </coding>
          </type>
          <system value="http://fhir.de/sid/gkv/kvid-10" />
          <value value="{kvnr}" />
        </identifier>
        <name>
          <use value="official" />
          <family value="{family}">
            <extension url="http://hl7.org/fhir/StructureDefinition/humanname-own-name">
              <valueString value="{family}" />
            </extension>
          </family>
          <given value="{given}" />
        </name>
        <birthDate value="{birth}" />
        <address>
          <type value="both" />
          <line value="{street} {house}">
            <extension url="http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-houseNumber">
              <valueString value="{house}" />
            </extension>
            <extension url="http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-streetName">
              <valueString value="{street}" />
            </extension>
          </line>
          <city value="{city}" />
          <postalCode value="{plz}" />
          <country value="D" />
        </address>
      </Patient>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{base}/Practitioner/{prac}" />
    <resource>
      <Practitioner xmlns="http://hl7.org/fhir">
        <id value="{prac}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Practitioner|1.2" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://terminology.hl7.org/CodeSystem/v2-0203" />
              <code value="LANR" />
            </coding>
          </type>
          <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_Base_ANR" />
          <value value="{lanr}" />
        </identifier>
        <name>
          <use value="official" />
          <family value="{doc_family}">
            <extension url="http://hl7.org/fhir/StructureDefinition/humanname-own-name">
              <valueString value="{doc_family}" />
            </extension>
          </family>
          <given value="{doc_given}" />
          <prefix value="Dr. med.">
            <extension url="http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier">
              <valueCode value="AC" />
            </extension>
          </prefix>
        </name>
        <qualification>
          <code>
            <coding>
              <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_FOR_Qualification_Type" />
              <code value="00" />
            </coding>
          </code>
        </qualification>
        <qualification>
          <code>
            <coding>
              <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_FOR_Berufsbezeichnung" />
              <code value="Berufsbezeichnung" />
            </coding>
            <text value="{fach}" />
          </code>
        </qualification>
      </Practitioner>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{base}/Organization/{org}" />
    <resource>
      <Organization xmlns="http://hl7.org/fhir">
        <id value="{org}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Organization|1.2" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://terminology.hl7.org/CodeSystem/v2-0203" />
              <code value="BSNR" />
            </coding>
          </type>
          <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_Base_BSNR" />
          <value value="{bsnr}" />
        </identifier>
        <name value="Praxis Dr. {doc_family}" />
        <telecom>
          <system value="phone" />
          <value value="{phone}" />
        </telecom>
        <address>
          <type value="both" />
          <line value="{org_street} 1">
            <extension url="http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-houseNumber">
              <valueString value="1" />
            </extension>
            <extension url="http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-streetName">
              <valueString value="{org_street}" />
            </extension>
          </line>
          <city value="{org_city}" />
          <postalCode value="{org_plz}" />
          <country value="D" />
        </address>
      </Organization>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{base}/Condition/{au}" />
    <resource>
      <Condition xmlns="http://hl7.org/fhir">
        <id value="{au}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Condition_AU|1.2" />
        </meta>
        <extension url="http://hl7.org/fhir/StructureDefinition/condition-assertedDate">
          <valueDateTime value="{asserted}" />
        </extension>
        <clinicalStatus>
          <coding>
            <system value="http://terminology.hl7.org/CodeSystem/condition-clinical" />
            <code value="active" />
          </coding>
        </clinicalStatus>
        <verificationStatus>
          <coding>
            <system value="http://terminology.hl7.org/CodeSystem/condition-ver-status" />
            <code value="confirmed" />
          </coding>
        </verificationStatus>
        <code>
          <coding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_FHIR_DOKUMENTTYPE" />
            <code value="eAU" />
          </coding>
        </code>
        <subject>
          <reference value="Patient/{pat}" />
        </subject>
        <onsetPeriod>{period_start}
            <end value="{end}" />
        </onsetPeriod>
        <asserter>
          <reference value="Practitioner/{prac}" />
        </asserter>
      </Condition>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{base}/Coverage/{cov}" />
    <resource>
      <Coverage xmlns="http://hl7.org/fhir">
        <id value="{cov}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Coverage|1.2" />
        </meta>
        <extension url="http://fhir.de/StructureDefinition/gkv/besondere-personengruppe">
          <valueCoding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_PERSONENGRUPPE" />
            <code value="00" />
          </valueCoding>
        </extension>
        <extension url="http://fhir.de/StructureDefinition/gkv/dmp-kennzeichen">
          <valueCoding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_DMP" />
            <code value="00" />
          </valueCoding>
        </extension>
        <extension url="http://fhir.de/StructureDefinition/gkv/wop">
          <valueCoding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_ITA_WOP" />
            <code value="{wop}" />
          </valueCoding>
        </extension>
        <extension url="http://fhir.de/StructureDefinition/gkv/versichertenart">
          <valueCoding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_VERSICHERTENSTATUS" />
            <code value="1" />
          </valueCoding>
        </extension>
        <status value="active" />
        <type>
          <coding>
            <system value="http://fhir.de/CodeSystem/versicherungsart-de-basis" />
            <code value="GKV" />
          </coding>
        </type>
        <beneficiary>
          <reference value="Patient/{pat}" />
        </beneficiary>
        <payor>
          <identifier>
            <system value="http://fhir.de/sid/arge-ik/iknr" />
            <value value="{ik}" />
          </identifier>
          <display value="{kasse}" />
        </payor>
      </Coverage>
    </resource>
  </entry>{conds}
  <entry>
    <fullUrl value="{base}/PractitionerRole/{role}" />
    <resource>
      <PractitionerRole xmlns="http://hl7.org/fhir">
        <id value="{role}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_PractitionerRole|1.2" />
        </meta>
        <practitioner>
          <reference value="Practitioner/{prac}" />
        </practitioner>
        <organization>
          <identifier>
            <system value="http://fhir.de/NamingSystem/asv/teamnummer" />
            <value value="000000000" />
          </identifier>
        </organization>
      </PractitionerRole>
    </resource>
  </entry>
</Bundle>
"""


def _tabs(template: str) -> str:
    """Indent with tabs (as the KBV examples do): two leading spaces → one tab."""
    out = []
    for line in template.split("\n"):
        stripped = line.lstrip(" ")
        out.append("\t" * ((len(line) - len(stripped)) // 2) + stripped)
    return "\n".join(out)


_SECTION, _SIDE, _ICD_COND, _EAU_TEMPLATE = (_tabs(t) for t in (_SECTION, _SIDE, _ICD_COND, _EAU_TEMPLATE))


def _storno_xml(bundle: str, cancelled: str, pr: _Practice, when: datetime, r: random.Random) -> bytes:
    comp, prac, org, lst, bid = (_uuid(r) for _ in range(5))
    ts = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Bundle xmlns="http://hl7.org/fhir">
  <id value="{bid}" />
  <meta>
    <lastUpdated value="{ts}" />
    <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Storno_Bundle|1.2" />
  </meta>
  <identifier>
    <system value="urn:ietf:rfc:3986" />
    <value value="urn:uuid:{bundle}" />
  </identifier>
  <type value="document" />
  <timestamp value="{ts}" />
  <entry>
    <fullUrl value="{_BASE}/Composition/{comp}" />
    <resource>
      <Composition xmlns="http://hl7.org/fhir">
        <id value="{comp}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Storno_Composition|1.2" />
        </meta>
        <status value="final" />
        <type>
          <coding>
            <system value="https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_KBV_FORMULAR_ART" />
            <code value="e013" />
          </coding>
        </type>
        <date value="{when.date().isoformat()}" />
        <author>
          <reference value="Practitioner/{prac}" />
          <type value="Practitioner" />
        </author>
        <title value="Storno eAU" />
        <custodian>
          <reference value="Organization/{org}" />
        </custodian>
        <section>
          <entry>
            <reference value="List/{lst}" />
          </entry>
        </section>
      </Composition>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{_BASE}/Practitioner/{prac}" />
    <resource>
      <Practitioner xmlns="http://hl7.org/fhir">
        <id value="{prac}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Practitioner|1.2" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://terminology.hl7.org/CodeSystem/v2-0203" />
              <code value="LANR" />
            </coding>
          </type>
          <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_Base_ANR" />
          <value value="{pr.lanr}" />
        </identifier>
        <name>
          <use value="official" />
          <family value="{_e(pr.doc_family)}" />
          <given value="{_e(pr.doc_given)}" />
        </name>
      </Practitioner>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{_BASE}/Organization/{org}" />
    <resource>
      <Organization xmlns="http://hl7.org/fhir">
        <id value="{org}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Organization|1.2" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://terminology.hl7.org/CodeSystem/v2-0203" />
              <code value="BSNR" />
            </coding>
          </type>
          <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_Base_BSNR" />
          <value value="{pr.bsnr}" />
        </identifier>
        <name value="Praxis Dr. {_e(pr.doc_family)}" />
      </Organization>
    </resource>
  </entry>
  <entry>
    <fullUrl value="{_BASE}/List/{lst}" />
    <resource>
      <List xmlns="http://hl7.org/fhir">
        <id value="{lst}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Storno|1.2" />
        </meta>
        <status value="current" />
        <mode value="changes" />
        <entry>
          <deleted value="true" />
          <item>
            <identifier>
              <system value="urn:ietf:rfc:3986" />
              <value value="urn:uuid:{cancelled}" />
            </identifier>
          </item>
        </entry>
      </List>
    </resource>
  </entry>
</Bundle>
"""
    return xml.encode("utf-8")


def _eeb_xml(req: str, p: _Person, pr: _Practice, when: datetime, ik: str, r: random.Random) -> bytes:
    bid, mh, pat, org = (_uuid(r) for _ in range(4))
    g = "https://gematik.de/fhir/eeb/StructureDefinition/"
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Bundle xmlns="http://hl7.org/fhir">
  <id value="{bid}" />
  <meta>
    <profile value="{g}EEBAnfrageBundle" />
  </meta>
  <identifier>
    <system value="urn:ietf:rfc:3986" />
    <value value="urn:uuid:{req}" />
  </identifier>
  <type value="message" />
  <timestamp value="{when.isoformat(timespec='milliseconds')}" />
  <entry>
    <fullUrl value="https://pvs.praxis.local/fhir/MessageHeader/{mh}" />
    <resource>
      <MessageHeader>
        <id value="{mh}" />
        <meta>
          <profile value="{g}EEBAnfrageHeader" />
        </meta>
        <extension url="{g}Leistungsdatum">
          <valueDate value="{when.date().isoformat()}" />
        </extension>
        <extension url="{g}Einverstaendnis">
          <valueBoolean value="true" />
        </extension>
        <extension url="{g}Institutionskennzeichen">
          <valueIdentifier>
            <system value="http://fhir.de/sid/arge-ik/iknr" />
            <value value="{ik}" />
          </valueIdentifier>
        </extension>
        <eventCoding>
          <system value="https://gematik.de/fhir/directory/CodeSystem/OrganizationProfessionOID" />
          <code value="1.2.276.0.76.4.50" />
          <display value="Betriebsstätte Arzt" />
        </eventCoding>
        <sender>
          <reference value="Organization/{org}" />
        </sender>
        <source>
          <endpoint value="https://pvs.praxis.local/KIM" />
        </source>
      </MessageHeader>
    </resource>
  </entry>
  <entry>
    <fullUrl value="https://pvs.praxis.local/fhir/Patient/{pat}" />
    <resource>
      <Patient>
        <id value="{pat}" />
        <meta>
          <profile value="{g}EEBKnownPatient" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://fhir.de/CodeSystem/identifier-type-de-basis" />
              <code value="GKV" />
            </coding>
          </type>
          <system value="http://fhir.de/sid/gkv/kvid-10" />
          <value value="{p.kvnr}" />
        </identifier>
        <name>
          <use value="official" />
          <family value="{_e(p.family)}" />
          <given value="{_e(p.given)}" />
        </name>
        <birthDate value="{p.birth.isoformat()}" />
      </Patient>
    </resource>
  </entry>
  <entry>
    <fullUrl value="https://pvs.praxis.local/fhir/Organization/{org}" />
    <resource>
      <Organization>
        <id value="{org}" />
        <meta>
          <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Organization|1.1.0" />
        </meta>
        <identifier>
          <type>
            <coding>
              <system value="http://terminology.hl7.org/CodeSystem/v2-0203" />
              <code value="BSNR" />
            </coding>
          </type>
          <system value="https://fhir.kbv.de/NamingSystem/KBV_NS_Base_BSNR" />
          <value value="{pr.bsnr}" />
        </identifier>
        <name value="Praxis Dr. {_e(pr.doc_family)}" />
        <telecom>
          <system value="phone" />
          <value value="{pr.phone}" />
        </telecom>
        <address>
          <type value="both" />
          <line value="{_e(pr.street)} 1" />
          <city value="{_e(pr.city)}" />
          <postalCode value="{pr.plz}" />
          <country value="D" />
        </address>
      </Organization>
    </resource>
  </entry>
</Bundle>
"""
    return xml.encode("utf-8")


def _antrag_xml(kind: str, doc: str, p: _Person, pr: _Practice, when: datetime, r: random.Random) -> bytes:
    """Synthetic EBZ/AAR payload (their real formats are not public in our sources)."""
    positions = "".join(
        f'    <Position nr="{i + 1}" code="{r.randrange(1000, 9999)}" anzahl="{r.randrange(1, 4)}" />\n'
        for i in range(r.randrange(2, 12))
    )
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Antrag xmlns="urn:automat:test:{kind.lower()}" verfahren="{kind}" id="{doc}" erstellt="{when.isoformat()}">
  <Versicherter kvnr="{p.kvnr}" name="{_e(p.family)}" vorname="{_e(p.given)}" geburtsdatum="{p.birth.isoformat()}" />
  <Leistungserbringer bsnr="{pr.bsnr}" lanr="{pr.lanr}" name="Praxis Dr. {_e(pr.doc_family)}" />
  <Positionen>
{positions}  </Positionen>
</Antrag>
"""
    return xml.encode("utf-8")


def _legacy_xml(bundle: str, p: _Person, pr: _Practice, when: datetime) -> bytes:
    """An AU certificate in a made-up legacy XML format: well-formed, but not FHIR."""
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Arbeitsunfaehigkeitsbescheinigung xmlns="urn:automat:test:legacy-au" id="{bundle}">
  <Patient kvnr="{p.kvnr}" name="{_e(p.family)}" vorname="{_e(p.given)}" />
  <Arzt lanr="{pr.lanr}" bsnr="{pr.bsnr}" />
  <Zeitraum von="{when.date().isoformat()}" />
</Arbeitsunfaehigkeitsbescheinigung>
"""
    return xml.encode("utf-8")


# ---------------------------------------------------------------------------- bench


def bench(n: int = 5000, *, key_type: str = "ec", seed: int = 0) -> dict[str, float]:
    """Generation rate on this core: eAU only, and the benchmark mix with 5 % faults."""
    pki = make_pki(seed, key_type)
    gen = MailGenerator(seed, pki=pki)
    gen.eau()  # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    size = 0
    for _ in range(n):
        size += len(gen.eau().raw)
    t_eau, c_eau = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in gen.mix(n, fault_rate=0.05):
        pass
    t_mix, c_mix = time.perf_counter() - t0, time.process_time() - c0
    return {
        "eau_mails_per_s": n / t_eau,  # wall clock
        "eau_mails_per_cpu_s": n / c_eau,  # per CPU second of this process (one core)
        "eau_avg_bytes": size / n,
        "mix_mails_per_s": n / t_mix,
        "mix_mails_per_cpu_s": n / c_mix,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protocols.kim.generator", description=__doc__.splitlines()[0])
    ap.add_argument("--bench", action="store_true", help="measure mails/s on one core")
    ap.add_argument("-n", type=int, default=5000, help="mails per measurement")
    ap.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write N mixed mails as .eml files into this folder")
    args = ap.parse_args(argv)
    if args.bench:
        r = bench(args.n, key_type=args.key_type, seed=args.seed)
        print(
            f"eAU: {r['eau_mails_per_s']:.0f} mails/s wall, {r['eau_mails_per_cpu_s']:.0f} mails per CPU-s "
            f"(avg {r['eau_avg_bytes'] / 1024:.1f} KiB, {args.key_type} signatures)\n"
            f"mix (5 % faulty): {r['mix_mails_per_s']:.0f} mails/s wall, {r['mix_mails_per_cpu_s']:.0f} mails per CPU-s  n={args.n}"
        )
        return 0
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gen = MailGenerator(args.seed, pki=make_pki(args.seed, args.key_type))
        for i, m in enumerate(gen.mix(args.n, fault_rate=0.05)):
            (out / f"{i:06d}_{m.procedure.value}_{m.fault.value}.eml").write_bytes(m.raw)
        (out / "trusted-ca.pem").write_bytes(gen.pki.ca_pem())
        print(f"wrote {args.n} mails and trusted-ca.pem to {out}")
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
