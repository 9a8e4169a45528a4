"""eAU payload (elektronische Arbeitsunfähigkeitsbescheinigung, KBV Technische Anlage eAU).

* :func:`detect_payload_type` – what the unwrapped ``.p7s`` content is (FHIR XML or other).
* :func:`parse_eau` – read a FHIR XML ``KBV_PR_EAU_Bundle`` (Lieferung) or
  ``KBV_PR_EAU_Storno_Bundle`` (Storno) into a typed :class:`EauDocument`. Technical
  faults raise :class:`~protocols.kim.errors.EauError` with a distinct
  :class:`PayloadErrorCode`:

  ===============================  ==================================================
  ``payload_not_xml``              empty, not well-formed, DTD/entity declaration
  ``payload_not_fhir``             XML outside the FHIR namespace
  ``payload_wrong_resource``       FHIR, but the root is not a Bundle (detail
                                   ``resource``, e.g. ``OperationOutcome``)
  ``payload_wrong_profile``        Bundle whose ``meta.profile`` is not an eAU profile
                                   (detail ``profile``)
  ``payload_missing_element``      a mandatory element is absent (detail ``element``,
                                   e.g. ``Bundle.identifier``, ``Patient``,
                                   ``Condition(AU).onsetPeriod.end``)
  ===============================  ==================================================

* :func:`validate_eau` – business checks (kept apart: they never trigger an error answer
  to the practice): AU period end ≥ start, ICD-10-GM code format, KVNR format
  ``[A-Z][0-9]{9}``, IK 9 digits, LANR/BSNR 9 digits.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from protocols.kim import _fhirxml as fx
from protocols.kim._fhirxml import PayloadErrorCode
from protocols.kim.errors import EauError

__all__ = [
    "PayloadType",
    "PayloadErrorCode",
    "EauKind",
    "EauPatient",
    "EauPractitioner",
    "EauOrganization",
    "EauCoverage",
    "IcdDiagnosis",
    "AuPeriod",
    "EauDocument",
    "EauIssue",
    "EauIssueCode",
    "detect_payload_type",
    "parse_eau",
    "validate_eau",
    "EAU_BUNDLE_PROFILE",
    "EAU_STORNO_BUNDLE_PROFILE",
]

EAU_BUNDLE_PROFILE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Bundle"
EAU_STORNO_BUNDLE_PROFILE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_Storno_Bundle"


class PayloadType(StrEnum):
    FHIR_XML = "fhir_xml"
    XML = "xml"  # well-formed XML, other namespace
    FHIR_JSON = "fhir_json"
    JSON = "json"
    CMS = "cms"  # still a (nested) CMS container
    PDF = "pdf"
    TEXT = "text"
    BINARY = "binary"
    EMPTY = "empty"


_XML_ROOT = re.compile(rb"<([A-Za-z_][\w.\-]*:)?[A-Za-z_][\w.\-]*[\s>/]")


def detect_payload_type(data: bytes) -> PayloadType:
    """Sniff the type of a payload (cheap; does not fully parse XML)."""
    if not data or not data.strip():
        return PayloadType.EMPTY
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"%PDF"):
        return PayloadType.PDF
    if head[:1] == b"\x30":
        return PayloadType.CMS
    if head.startswith(b"<"):
        # skip prolog/comments, find the first element and its namespace
        body = re.sub(rb"<\?.*?\?>|<!--.*?-->", b"", head, flags=re.DOTALL).lstrip()
        m = _XML_ROOT.match(body)
        if not m:
            return PayloadType.XML if body.startswith(b"<") else PayloadType.TEXT
        start = body[: body.find(b">") + 1] if b">" in body else body
        return PayloadType.FHIR_XML if b'xmlns="http://hl7.org/fhir"' in start else PayloadType.XML
    if head[:1] in (b"{", b"["):
        try:
            obj = json.loads(data)
        except Exception:
            return PayloadType.TEXT
        return PayloadType.FHIR_JSON if isinstance(obj, dict) and "resourceType" in obj else PayloadType.JSON
    try:
        text = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return PayloadType.BINARY
    return PayloadType.TEXT if all(c.isprintable() or c in "\r\n\t" for c in text) else PayloadType.BINARY


class EauKind(StrEnum):
    LIEFERUNG = "Lieferung"  # KBV_PR_EAU_Bundle
    STORNO = "Storno"  # KBV_PR_EAU_Storno_Bundle


class EauPatient(BaseModel):
    family: str | None = None
    given: str | None = None
    kvnr: str | None = None  # Krankenversichertennummer (kvid-10)
    birth_date: date | None = None

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.given, self.family) if p)


class EauPractitioner(BaseModel):
    id_type: str | None = None  # "LANR" (Arzt) or "ZANR" (Zahnarzt)
    number: str | None = None
    telematik_id: str | None = None
    family: str | None = None
    given: str | None = None
    prefix: str | None = None


class EauOrganization(BaseModel):
    id_type: str | None = None  # "BSNR" or "KZVA"
    number: str | None = None
    name: str | None = None
    telematik_id: str | None = None


class EauCoverage(BaseModel):
    insurer_ik: str | None = None  # Institutionskennzeichen of the Kostenträger
    insurer_name: str | None = None
    kind: str | None = None  # GKV / PKV / BG / ...


class IcdDiagnosis(BaseModel):
    code: str
    version: str | None = None
    diagnosesicherheit: str | None = None  # A/G/V/Z
    seitenlokalisation: str | None = None  # L/R/B


class AuPeriod(BaseModel):
    """Arbeitsunfähigkeit: ``Condition(AU).onsetPeriod`` (+ asserted date)."""

    start: date | None = None  # AU seit (may be absent on a Folgebescheinigung)
    end: date | None = None  # voraussichtlich arbeitsunfähig bis
    asserted: date | None = None  # festgestellt am


class EauDocument(BaseModel):
    """A parsed eAU (Lieferung or Storno). Contains personal data – keep it in memory only."""

    kind: EauKind
    profile: str
    profile_version: str | None = None
    bundle_id: str | None = None  # Bundle.id
    identifier: str  # Bundle.identifier.value, e.g. "urn:uuid:…"
    timestamp: datetime | None = None
    au_type: str | None = None  # KBV_CS_EAU_AU_Type: ERST, FOLGE, ERST_END, …
    formular_art: str | None = None  # e010 (eAU), e013 (Storno)
    issued: date | None = None  # Composition.date
    patient: EauPatient | None = None
    practitioner: EauPractitioner | None = None
    organization: EauOrganization | None = None
    coverage: EauCoverage | None = None
    diagnoses: list[IcdDiagnosis] = Field(default_factory=list)
    au: AuPeriod | None = None
    cancelled_identifier: str | None = None  # Storno: the identifier of the cancelled eAU

    @property
    def identifier_uuid(self) -> str:
        """Bundle.identifier without ``urn:uuid:`` (the subject / file name id)."""
        return strip_urn(self.identifier)

    @property
    def is_storno(self) -> bool:
        return self.kind is EauKind.STORNO

    @property
    def is_erst(self) -> bool:
        return (self.au_type or "").upper().startswith("ERST")

    @property
    def is_folge(self) -> bool:
        return (self.au_type or "").upper().startswith("FOLGE")


def strip_urn(value: str) -> str:
    return value[len("urn:uuid:"):] if value.lower().startswith("urn:uuid:") else value


def _missing(element: str) -> EauError:
    return EauError(PayloadErrorCode.MISSING_ELEMENT, f"mandatory element {element} is missing", element=element)


def parse_eau(data: bytes, *, expect: EauKind | None = None, root=None) -> EauDocument:
    """Parse a FHIR XML eAU bundle. Raises :class:`EauError` (see module doc), nothing else.

    ``expect`` restricts the profile (e.g. the ``eAU;Storno-Arzt`` road map expects
    :attr:`EauKind.STORNO`); a mismatch is ``payload_wrong_profile``. ``root``: the
    payload already parsed by ``_fhirxml.parse_root`` (the pipeline's ``parse_xml`` step)
    - read from it instead of parsing ``data`` again.
    """
    try:
        return _parse_eau(data, expect, root)
    except EauError:
        raise
    except RecursionError:
        raise EauError(PayloadErrorCode.NOT_XML, "XML nested too deeply") from None
    except Exception as exc:  # defensive: never crash with a random exception
        raise EauError(PayloadErrorCode.NOT_XML, f"payload could not be read ({type(exc).__name__})") from None


def _parse_eau(data: bytes, expect: EauKind | None, root=None) -> EauDocument:
    if root is None:
        root = fx.parse_root(data, EauError)
    rtype = fx.local(root.tag)
    if rtype != "Bundle":
        raise EauError(PayloadErrorCode.WRONG_RESOURCE, f"root resource is {rtype}, not Bundle", resource=rtype)
    profs = fx.profiles(root)
    kind = None
    profile = None
    for p in profs:
        if fx.profile_matches(p, "KBV_PR_EAU_Bundle"):
            kind, profile = EauKind.LIEFERUNG, p
            break
        if fx.profile_matches(p, "KBV_PR_EAU_Storno_Bundle"):
            kind, profile = EauKind.STORNO, p
            break
    if kind is None or profile is None:
        shown = profs[0] if profs else "none"
        raise EauError(PayloadErrorCode.WRONG_PROFILE, f"Bundle.meta.profile is {shown!r}, not KBV_PR_EAU_Bundle", profile=shown)
    if expect is not None and kind is not expect:
        raise EauError(PayloadErrorCode.WRONG_PROFILE, f"expected an eAU {expect.value}, got {kind.value}", profile=profile)

    identifier = fx.val(root, "identifier/value")
    if not identifier:
        raise _missing("Bundle.identifier")

    resources: dict[str, list] = {}
    for res in fx.bundle_resources(root):
        resources.setdefault(fx.local(res.tag), []).append(res)

    comps = resources.get("Composition", [])
    if not comps:
        raise _missing("Composition")
    comp = comps[0]
    au_type = None
    for code in fx.coding_codes(comp, "type/coding", "KBV_CS_EAU_AU_Type"):
        au_type = code
    formular_art = next(iter(fx.coding_codes(comp, "type/coding", "KBV_CS_SFHIR_KBV_FORMULAR_ART")), None)

    pract = _practitioner(resources.get("Practitioner", []))
    org = _organization(resources.get("Organization", []))
    if pract is None:
        raise _missing("Practitioner")
    if org is None:
        raise _missing("Organization")

    doc = EauDocument(
        kind=kind,
        profile=profile,
        profile_version=fx.profile_version(profile),
        bundle_id=fx.val(root, "id"),
        identifier=identifier,
        timestamp=fx.parse_datetime(fx.val(root, "timestamp")),
        au_type=au_type,
        formular_art=formular_art,
        issued=fx.parse_date(fx.val(comp, "date")),
        practitioner=pract,
        organization=org,
    )

    if kind is EauKind.STORNO:
        lists = resources.get("List", [])
        cancelled = None
        for lst in lists:
            cancelled = fx.val(lst, "entry/item/identifier/value")
            if cancelled:
                break
        if not cancelled:
            raise _missing("List.entry.item.identifier")
        doc.cancelled_identifier = cancelled
        return doc

    if au_type is None:
        raise _missing("Composition.type (KBV_CS_EAU_AU_Type)")
    patients = resources.get("Patient", [])
    if not patients:
        raise _missing("Patient")
    pat = patients[0]
    family, given, _ = fx.human_name(pat)
    if not family:
        raise _missing("Patient.name.family")
    doc.patient = EauPatient(
        family=family,
        given=given,
        kvnr=fx.identifier_by(pat, system_suffix="kvid-10") or fx.identifier_by(pat, type_code="KVZ10")
        or fx.identifier_by(pat, type_code="GKV") or fx.identifier_by(pat, type_code="PKV"),
        birth_date=fx.parse_date(fx.val(pat, "birthDate")),
    )
    covs = resources.get("Coverage", [])
    if not covs:
        raise _missing("Coverage")
    cov = covs[0]
    ik = fx.val(cov, "payor/identifier/value")
    if not ik:
        raise _missing("Coverage.payor.identifier")
    doc.coverage = EauCoverage(
        insurer_ik=ik,
        insurer_name=fx.val(cov, "payor/display"),
        kind=next(iter(fx.coding_codes(cov, "type/coding")), None),
    )

    au_cond = None
    for cond in resources.get("Condition", []):
        profs_c = fx.profiles(cond)
        is_au = any(fx.profile_matches(p, "KBV_PR_EAU_Condition_AU") for p in profs_c) or (
            "eAU" in fx.coding_codes(cond, "code/coding", "KBV_CS_SFHIR_KBV_FHIR_DOKUMENTTYPE")
        )
        if is_au:
            au_cond = au_cond if au_cond is not None else cond
            continue
        for coding in fx.findall(cond, "code/coding"):
            if (fx.val(coding, "system") or "").endswith("icd-10-gm"):
                code = fx.val(coding, "code")
                if code:
                    sich = fx.extension(coding, "icd-10-gm-diagnosesicherheit")
                    seite = fx.extension(coding, "seitenlokalisation")
                    doc.diagnoses.append(
                        IcdDiagnosis(
                            code=code,
                            version=fx.val(coding, "version"),
                            diagnosesicherheit=fx.val(sich, "valueCoding/code") if sich is not None else None,
                            seitenlokalisation=fx.val(seite, "valueCoding/code") if seite is not None else None,
                        )
                    )
    if au_cond is None:
        raise _missing("Condition(AU)")
    period = fx.find(au_cond, "onsetPeriod")
    end = fx.val(period, "end")
    if not end:
        raise _missing("Condition(AU).onsetPeriod.end")
    asserted = fx.extension(au_cond, "condition-assertedDate")
    doc.au = AuPeriod(
        start=fx.parse_date(fx.val(period, "start")),
        end=fx.parse_date(end),
        asserted=fx.parse_date(fx.val(asserted, "valueDateTime")) if asserted is not None else None,
    )
    return doc


def _practitioner(items: list) -> EauPractitioner | None:
    if not items:
        return None
    p = items[0]
    family, given, prefix = fx.human_name(p)
    id_type = number = None
    for t in ("LANR", "ZANR"):
        v = fx.identifier_by(p, type_code=t)
        if v:
            id_type, number = t, v
            break
    return EauPractitioner(
        id_type=id_type,
        number=number,
        telematik_id=fx.identifier_by(p, system_suffix="telematik-id"),
        family=family,
        given=given,
        prefix=prefix,
    )


def _organization(items: list) -> EauOrganization | None:
    if not items:
        return None
    o = items[0]
    id_type = number = None
    for t in ("BSNR", "KZVA"):
        v = fx.identifier_by(o, type_code=t)
        if v:
            id_type, number = t, v
            break
    return EauOrganization(
        id_type=id_type,
        number=number,
        name=fx.val(o, "name"),
        telematik_id=fx.identifier_by(o, system_suffix="telematik-id"),
    )


# ---------------------------------------------------------------------------- business validation


class EauIssueCode(StrEnum):
    PERIOD_END_BEFORE_START = "au_period_end_before_start"
    PERIOD_START_MISSING = "au_period_start_missing"  # Erstbescheinigung without "AU seit"
    ICD_FORMAT = "icd_format"
    DIAGNOSIS_MISSING = "diagnosis_missing"
    KVNR_MISSING = "kvnr_missing"
    KVNR_FORMAT = "kvnr_format"
    IK_FORMAT = "ik_format"
    LANR_FORMAT = "lanr_format"
    BSNR_FORMAT = "bsnr_format"


class EauIssue(BaseModel):
    """A business finding (never answered to the practice by an error mail)."""

    code: EauIssueCode
    element: str
    reason: str  # no personal data: element and rule only


KVNR_RE = re.compile(r"^[A-Z][0-9]{9}$")
IK_RE = re.compile(r"^[0-9]{9}$")
NINE_DIGITS = re.compile(r"^[0-9]{9}$")
#: ICD-10-GM code: letter, two digits, optional ".", 1–2 digits or "-", optional
#: additional sign (†, *, !, +, #).
ICD10GM_RE = re.compile(r"^[A-Z][0-9]{2}(\.([0-9]{1,2}|-))?[†*!+#]?$")


def validate_eau(doc: EauDocument) -> list[EauIssue]:
    """Business checks of a parsed eAU; an empty list means no finding. Storno bundles
    only have practitioner/organization numbers to check."""
    issues: list[EauIssue] = []

    def add(code: EauIssueCode, element: str, reason: str) -> None:
        issues.append(EauIssue(code=code, element=element, reason=reason))

    if doc.practitioner and doc.practitioner.number and not NINE_DIGITS.match(doc.practitioner.number):
        add(EauIssueCode.LANR_FORMAT, "Practitioner.identifier", f"{doc.practitioner.id_type or 'LANR'} must be 9 digits")
    if doc.organization and doc.organization.number and not NINE_DIGITS.match(doc.organization.number):
        add(EauIssueCode.BSNR_FORMAT, "Organization.identifier", f"{doc.organization.id_type or 'BSNR'} must be 9 digits")
    if doc.is_storno:
        return issues

    if doc.patient is not None:
        if not doc.patient.kvnr:
            add(EauIssueCode.KVNR_MISSING, "Patient.identifier", "no KVNR (kvid-10)")
        elif not KVNR_RE.match(doc.patient.kvnr):
            add(EauIssueCode.KVNR_FORMAT, "Patient.identifier", "KVNR must match [A-Z][0-9]{9}")
    if doc.coverage is not None and doc.coverage.insurer_ik and not IK_RE.match(doc.coverage.insurer_ik):
        add(EauIssueCode.IK_FORMAT, "Coverage.payor.identifier", "IK must be 9 digits")
    if not doc.diagnoses:
        add(EauIssueCode.DIAGNOSIS_MISSING, "Condition(ICD)", "no ICD-10-GM diagnosis")
    for i, d in enumerate(doc.diagnoses):
        if not ICD10GM_RE.match(d.code):
            add(EauIssueCode.ICD_FORMAT, f"Condition(ICD)[{i}].code", "code is not ICD-10-GM formatted")
    if doc.au is not None:
        if doc.au.start and doc.au.end and doc.au.end < doc.au.start:
            add(EauIssueCode.PERIOD_END_BEFORE_START, "Condition(AU).onsetPeriod", "end is before start")
        if doc.is_erst and doc.au.start is None:
            add(EauIssueCode.PERIOD_START_MISSING, "Condition(AU).onsetPeriod.start", "Erstbescheinigung without start")
    return issues
