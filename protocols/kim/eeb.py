"""eEB – elektronische Ersatzbescheinigung (gematik spec-VSDM-Ersatzbescheinigung).

* :func:`parse_eeb_anfrage` – the FHIR XML ``EEBAnfrageBundle`` (content of the
  ``<T|E>EEB0_ANF_<UUID>.p7s``) into an :class:`EebAnfrage`. Raises
  :class:`~protocols.kim.errors.EebError` with the ``payload_*`` codes of
  :class:`~protocols.kim.eau.PayloadErrorCode`.
* :func:`build_eeb_bescheinigung_mail` – the answer ``eEB;Bescheinigung;V1.0``: subject
  and attachment ``<T|E>EEB0_BES_<UUID>.p7s`` (``Content-Description: eEB_BES``), a
  signed ``EEBBescheinigungBundle`` (MessageHeader.response.identifier = request UUID),
  ``In-Reply-To`` = request Message-ID.
* :func:`build_eeb_fehler_mail` – the answer ``eEB;Fehler;V1.0``: attachment
  ``<T|E>EEB0_FEH_<id>.xml`` (OperationOutcome ``EEBFehler``, ``X-KIM-Fehlercode``).
"""

from __future__ import annotations

import base64
import uuid
from datetime import date, datetime, timezone
from enum import StrEnum

from pydantic import BaseModel

from protocols.kim import _fhirxml as fx
from protocols.kim._fhirxml import PayloadErrorCode
from protocols.kim.compose import SENDERSYSTEM, OutAttachment, OutgoingMail, compose, domain_of, mail_date, new_message_id
from protocols.kim.errors import AnswerError, EebError
from protocols.kim.mime import ParsedMail, bare_message_id
from protocols.kim.pkcs7 import Signer

EEB_PROFILE_BASE = "https://gematik.de/fhir/eeb/StructureDefinition/"
EEB_FEHLER_CODESYSTEM = "https://gematik.de/fhir/eeb/CodeSystem/EEBErrorcodeCS"


class EebPatient(BaseModel):
    known: bool  # EEBKnownPatient (KVNR) vs EEBUnknownPatient (name + birth date)
    kvnr: str | None = None
    family: str | None = None
    given: str | None = None
    birth_date: date | None = None
    postal_code: str | None = None

    @property
    def name(self) -> str:
        return " ".join(p for p in (self.given, self.family) if p)


class EebOrganization(BaseModel):
    bsnr: str | None = None
    name: str | None = None
    telematik_id: str | None = None


class EebAnfrage(BaseModel):
    """A parsed eEB Anfrage. Contains personal data – keep it in memory only."""

    profile: str
    bundle_id: str | None
    identifier: str  # Bundle.identifier.value (urn:uuid:… or bare)
    timestamp: datetime | None
    leistungsdatum: date | None
    einverstaendnis: bool | None
    insurer_ik: str | None  # MessageHeader extension Institutionskennzeichen (if sent)
    patient: EebPatient
    organization: EebOrganization | None

    @property
    def request_uuid(self) -> str:
        v = self.identifier
        return v[len("urn:uuid:"):] if v.lower().startswith("urn:uuid:") else v


def parse_eeb_anfrage(data: bytes, *, root=None) -> EebAnfrage:
    """Parse an ``EEBAnfrageBundle`` (gematik or the older ehex profile URLs); ``root``:
    the payload already parsed by ``_fhirxml.parse_root`` (read from it, no second parse)."""
    try:
        return _parse(data, root)
    except EebError:
        raise
    except RecursionError:
        raise EebError(PayloadErrorCode.NOT_XML, "XML nested too deeply") from None
    except Exception as exc:
        raise EebError(PayloadErrorCode.NOT_XML, f"payload could not be read ({type(exc).__name__})") from None


def _missing(element: str) -> EebError:
    return EebError(PayloadErrorCode.MISSING_ELEMENT, f"mandatory element {element} is missing", element=element)


def _parse(data: bytes, root=None) -> EebAnfrage:
    if root is None:
        root = fx.parse_root(data, EebError)
    rtype = fx.local(root.tag)
    if rtype != "Bundle":
        raise EebError(PayloadErrorCode.WRONG_RESOURCE, f"root resource is {rtype}, not Bundle", resource=rtype)
    profs = fx.profiles(root)
    profile = next((p for p in profs if fx.profile_matches(p, "EEBAnfrageBundle")), None)
    if profile is None:
        shown = profs[0] if profs else "none"
        raise EebError(PayloadErrorCode.WRONG_PROFILE, f"Bundle.meta.profile is {shown!r}, not EEBAnfrageBundle", profile=shown)
    identifier = fx.val(root, "identifier/value")
    if not identifier:
        raise _missing("Bundle.identifier")
    res: dict[str, list] = {}
    for r in fx.bundle_resources(root):
        res.setdefault(fx.local(r.tag), []).append(r)
    headers = res.get("MessageHeader", [])
    if not headers:
        raise _missing("MessageHeader")
    mh = headers[0]
    lei = fx.extension(mh, "Leistungsdatum")
    ein = fx.extension(mh, "Einverstaendnis")
    ik = fx.extension(mh, "Institutionskennzeichen")
    ein_v = fx.val(ein, "valueBoolean") if ein is not None else None
    patients = res.get("Patient", [])
    if not patients:
        raise _missing("Patient")
    p = patients[0]
    family, given, _ = fx.human_name(p)
    kvnr = fx.identifier_by(p, system_suffix="kvid-10") or fx.identifier_by(p, type_code="GKV")
    known = kvnr is not None or any(fx.profile_matches(x, "EEBKnownPatient") or fx.profile_matches(x, "KnownPatient") for x in fx.profiles(p))
    if kvnr is None and not (family and fx.val(p, "birthDate")):
        raise _missing("Patient.identifier (KVNR) or Patient.name + Patient.birthDate")
    patient = EebPatient(
        known=known,
        kvnr=kvnr,
        family=family,
        given=given,
        birth_date=fx.parse_date(fx.val(p, "birthDate")),
        postal_code=fx.val(p, "address/postalCode"),
    )
    org = None
    orgs = res.get("Organization", [])
    if orgs:
        o = orgs[0]
        org = EebOrganization(
            bsnr=fx.identifier_by(o, type_code="BSNR"),
            name=fx.val(o, "name"),
            telematik_id=fx.identifier_by(o, system_suffix="telematik-id"),
        )
    return EebAnfrage(
        profile=profile,
        bundle_id=fx.val(root, "id"),
        identifier=identifier,
        timestamp=fx.parse_datetime(fx.val(root, "timestamp")),
        leistungsdatum=fx.parse_date(fx.val(lei, "valueDate")) if lei is not None else None,
        einverstaendnis=None if ein_v is None else ein_v == "true",
        insurer_ik=fx.val(ik, "valueIdentifier/value") if ik is not None else None,
        patient=patient,
        organization=org,
    )


# ---------------------------------------------------------------------------- answers


class EebFehlerCode(StrEnum):
    """gematik ``EEBErrorcodeCS``."""

    NOT_INSURED = "100"
    INVALID = "101"
    PATIENT_NOT_IDENTIFIABLE = "110"
    LEISTUNGSDATUM_IMPLAUSIBLE = "111"
    NO_INSURANCE_AT_DATE = "112"
    NO_CONSENT = "120"
    SPECIAL_CASE = "130"
    CERTIFICATE_INVALID = "201"
    SIGNED_DATA_MISMATCH = "202"
    NOT_SIGNED = "210"
    SIGNATURE_FORMAT = "211"
    DECRYPTION_FORMAT = "307"
    KIM_NOT_SIGNED = "309"
    KIM_SIGNATURE_FORMAT = "310"
    KIM_INTEGRITY = "311"
    KIM_KEY_UNAVAILABLE = "313"

    @property
    def display(self) -> str:
        return _EEB_DISPLAY[self]


_EEB_DISPLAY = {
    EebFehlerCode.NOT_INSURED: "Der Patient ist nicht bei der adressierten Krankenkasse versichert.",
    EebFehlerCode.INVALID: "Die übermittelte eEB entspricht nicht den Vorgaben und/oder ist nicht lesbar.",
    EebFehlerCode.PATIENT_NOT_IDENTIFIABLE: "Der Patient ist nicht eindeutig identifizierbar.",
    EebFehlerCode.LEISTUNGSDATUM_IMPLAUSIBLE: "Das angefragte Leistungsdatum ist unplausibel.",
    EebFehlerCode.NO_INSURANCE_AT_DATE: "Es liegt für den Patienten kein gültiges Versichertenverhältnis zum angefragten Leistungsdatum vor.",
    EebFehlerCode.NO_CONSENT: "Die Einwilligung des Patienten zur Freigabe der Bescheinigungsübermittlung an die Praxis liegt nicht vor.",
    EebFehlerCode.SPECIAL_CASE: "Es liegt ein Sonderfall/ eine Ausnahme vor. Bitten Sie den Patienten, mit der Krankenkasse Kontakt aufzunehmen.",
    EebFehlerCode.CERTIFICATE_INVALID: "Die Signatur der eEB-Anfrage ist nicht gültig, da ein fehlerhaftes Zertifikat verwendet wurde oder nicht alle zur Zertifikatsprüfung erforderlichen Komponenten bzw. Ressourcen zur Verfügung standen.",
    EebFehlerCode.SIGNED_DATA_MISMATCH: "Die Signaturprüfung der eEB-Anfrage hat ergeben, dass die signierten Daten nicht mit den übermittelten Daten der eEB-Anfrage übereinstimmen.",
    EebFehlerCode.NOT_SIGNED: "Die eEB-Anfrage ist nicht signiert. Die eEB-Anfrage ist ggf. manipuliert worden.",
    EebFehlerCode.SIGNATURE_FORMAT: "Die Signatur der eEB-Anfrage konnte aufgrund eines falschen Formats nicht geprüft werden.",
    EebFehlerCode.DECRYPTION_FORMAT: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass die KIM-Nachricht zwar als eine verschlüsselte KIM-Nachricht gekennzeichnet wurde, aber auf Grund des falschen Formats nicht von der Krankenkasse entschlüsselt werden konnte.",
    EebFehlerCode.KIM_NOT_SIGNED: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass für die KIM-Nachricht keine Signatur vorhanden ist.",
    EebFehlerCode.KIM_SIGNATURE_FORMAT: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass die Signatur für die KIM-Nachricht aufgrund des falschen Formats nicht geprüft werden konnte.",
    EebFehlerCode.KIM_INTEGRITY: "Die Integrität der Nachricht wurde verletzt. Die Prüfung der Signatur hat ergeben, dass die Nachricht manipuliert wurde.",
    EebFehlerCode.KIM_KEY_UNAVAILABLE: "Die KIM-Nachricht konnte auf Grund eines nicht verfügbaren Schlüssels nicht entschlüsselt werden.",
}


class EebBescheinigungData(BaseModel):
    """What the insurer's core system confirms (Versichertenstammdaten)."""

    kvnr: str
    family: str
    given: str
    birth_date: date
    street: str | None = None
    house_number: str | None = None
    postal_code: str | None = None
    city: str | None = None
    insurer_ik: str
    insurer_name: str
    coverage_start: date
    coverage_end: date | None = None
    versicherungsart: str = "GKV"
    #: VSD containers as on the eGK (gzip'd XML), carried as valueBase64Binary if given
    allgemeine_versicherungsdaten: bytes | None = None
    persoenliche_versichertendaten: bytes | None = None
    geschuetzte_versichertendaten: bytes | None = None


def _env(request: ParsedMail) -> str:
    s = request.subject or ""
    if s[:5] in ("TEEB0", "EEEB0"):
        return s[0]
    for a in request.attachments:
        fn = a.filename or ""
        if fn[:5] in ("TEEB0", "EEEB0"):
            return fn[0]
    return "E"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def build_eeb_bescheinigung_xml(
    anfrage: EebAnfrage,
    data: EebBescheinigungData,
    *,
    bundle_uuid: str,
    timestamp: datetime,
    endpoint: str = "https://kim.krankenkasse.example/eeb",
) -> bytes:
    """The ``EEBBescheinigungBundle`` (FHIR XML) answering ``anfrage``."""
    e = fx.xml_escape
    ids = uuid.uuid5(uuid.NAMESPACE_URL, "eeb:" + bundle_uuid)
    mh_id, pat_id, cov_id, b_id = (str(uuid.uuid5(ids, n)) for n in ("mh", "pat", "cov", "bundle"))
    vsd = ""
    for url, blob in (
        ("AllgemeineVersicherungsdaten", data.allgemeine_versicherungsdaten),
        ("PersoenlicheVersichertendaten", data.persoenliche_versichertendaten),
        ("GeschuetzteVersichertendaten", data.geschuetzte_versichertendaten),
    ):
        if blob:
            vsd += (
                f'      <extension url="{EEB_PROFILE_BASE}{url}">\n'
                f'        <valueBase64Binary value="{_b64(blob)}" />\n      </extension>\n'
            )
    addr = ""
    if data.street or data.city or data.postal_code:
        line = " ".join(x for x in (data.street, data.house_number) if x)
        addr = "      <address>\n        <type value=\"both\" />\n"
        if line:
            addr += f'        <line value="{e(line)}" />\n'
        if data.city:
            addr += f'        <city value="{e(data.city)}" />\n'
        if data.postal_code:
            addr += f'        <postalCode value="{e(data.postal_code)}" />\n'
        addr += "      </address>\n"
    period_end = f'        <end value="{data.coverage_end.isoformat()}" />\n' if data.coverage_end else ""
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<Bundle xmlns="http://hl7.org/fhir">
  <id value="{b_id}" />
  <meta>
    <profile value="{EEB_PROFILE_BASE}EEBBescheinigungBundle" />
  </meta>
  <identifier>
    <system value="urn:ietf:rfc:3986" />
    <value value="urn:uuid:{e(bundle_uuid)}" />
  </identifier>
  <type value="message" />
  <timestamp value="{timestamp.isoformat(timespec='milliseconds')}" />
  <entry>
    <fullUrl value="https://gematik.de/fhir/MessageHeader/{mh_id}" />
    <resource>
      <MessageHeader>
        <id value="{mh_id}" />
        <meta>
          <profile value="{EEB_PROFILE_BASE}EEBBescheinigungHeader" />
        </meta>
        <eventCoding>
          <system value="https://gematik.de/fhir/directory/CodeSystem/OrganizationProfessionOID" />
          <code value="1.2.276.0.76.4.50" />
          <display value="Betriebsstätte Arzt" />
        </eventCoding>
        <source>
          <endpoint value="{e(endpoint)}" />
        </source>
        <response>
          <identifier value="{e(anfrage.request_uuid)}" />
          <code value="ok" />
        </response>
      </MessageHeader>
    </resource>
  </entry>
  <entry>
    <fullUrl value="https://gematik.de/fhir/Patient/{pat_id}" />
    <resource>
      <Patient>
      <id value="{pat_id}" />
      <meta>
        <profile value="https://fhir.kbv.de/StructureDefinition/KBV_PR_FOR_Patient|1.1.0" />
      </meta>
      <identifier>
        <type>
          <coding>
            <system value="http://fhir.de/CodeSystem/identifier-type-de-basis" />
            <code value="GKV" />
          </coding>
        </type>
        <system value="http://fhir.de/sid/gkv/kvid-10" />
        <value value="{e(data.kvnr)}" />
      </identifier>
      <name>
        <use value="official" />
        <family value="{e(data.family)}" />
        <given value="{e(data.given)}" />
      </name>
      <birthDate value="{data.birth_date.isoformat()}" />
{addr}      </Patient>
    </resource>
  </entry>
  <entry>
    <fullUrl value="https://gematik.de/fhir/Coverage/{cov_id}" />
    <resource>
      <Coverage>
      <id value="{cov_id}" />
      <meta>
        <profile value="{EEB_PROFILE_BASE}EEBCoverageEgk" />
      </meta>
{vsd}      <status value="active" />
      <type>
        <coding>
          <system value="http://fhir.de/CodeSystem/versicherungsart-de-basis" />
          <code value="{e(data.versicherungsart)}" />
        </coding>
      </type>
      <beneficiary>
        <reference value="Patient/{pat_id}" />
      </beneficiary>
      <period>
        <start value="{data.coverage_start.isoformat()}" />
{period_end}      </period>
      <payor>
        <identifier>
          <system value="http://fhir.de/sid/arge-ik/iknr" />
          <value value="{e(data.insurer_ik)}" />
        </identifier>
        <display value="{e(data.insurer_name)}" />
      </payor>
      </Coverage>
    </resource>
  </entry>
</Bundle>
"""
    return xml.encode("utf-8")


def _answer_headers(request: ParsedMail, sender: str, mid: str, subject: str, dienstkennung: str, date: datetime | None) -> tuple[list[tuple[str, str]], str]:
    to = request.reply_address
    if not to:
        raise AnswerError("answer_no_reply_address", "the request has neither Reply-To nor From")
    headers = [("Date", mail_date(date)), ("From", sender), ("To", to), ("Message-ID", mid)]
    if request.message_id:
        headers += [("In-Reply-To", request.message_id), ("References", request.message_id)]
    headers += [
        ("Subject", subject),
        ("X-KIM-Dienstkennung", dienstkennung),
        ("X-KIM-Sendersystem", SENDERSYSTEM),
    ]
    return headers, to


def build_eeb_bescheinigung_mail(
    request: ParsedMail,
    anfrage: EebAnfrage,
    data: EebBescheinigungData,
    signer: Signer,
    *,
    sender: str,
    bundle_uuid: str | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
    version: str = "V1.0",
) -> OutgoingMail:
    """``eEB;Bescheinigung;<version>`` answer to the Anfrage mail ``request``, signed by
    the insurer's ``signer``. Raises :class:`AnswerError` (``answer_no_reply_address``)."""
    bes = bundle_uuid or str(uuid.uuid4())
    now = date or datetime.now(timezone.utc)
    xml = build_eeb_bescheinigung_xml(anfrage, data, bundle_uuid=bes, timestamp=now)
    p7s = signer.sign(xml)
    env = _env(request)
    name = f"{env}EEB0_BES_{bes}"
    dk = f"eEB;Bescheinigung;{version}"
    mid = message_id or new_message_id(domain_of(sender))
    headers, to = _answer_headers(request, sender, mid, name, dk, now)
    raw = compose(
        headers,
        text=f"eEB Bescheinigung {name}",
        attachments=[OutAttachment(filename=name + ".p7s", data=p7s, description="eEB_BES")],
    )
    return OutgoingMail(
        raw=raw, message_id=mid, sender=sender, recipients=[to], subject=name, dienstkennung=dk,
        in_reply_to=request.message_id, attachment_name=name + ".p7s",
    )


def build_eeb_fehler_xml(
    code: EebFehlerCode,
    *,
    outcome_id: str,
    message_id: str | None = None,
    bundle_identifier: str | None = None,
    text: str | None = None,
) -> bytes:
    """OperationOutcome ``EEBFehler`` (one fatal issue; names Bundle-Identifier, else Message-ID)."""
    e = fx.xml_escape
    code = EebFehlerCode(code)
    if bundle_identifier:
        url, system, value = "Bundle-Identifier", "urn:ietf:rfc:3986", bundle_identifier
    elif message_id:
        url, system, value = "Message-ID", EEB_PROFILE_BASE + "Message_ID_KIM", bare_message_id(message_id) or message_id
    else:
        raise AnswerError("answer_no_reference", "an eEB Fehler needs a Message-ID or a Bundle-Identifier")
    txt = f'      <text value="{e(text)}" />\n' if text else ""
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<OperationOutcome xmlns="http://hl7.org/fhir">
  <id value="{e(outcome_id)}" />
  <meta>
    <profile value="{EEB_PROFILE_BASE}EEBFehler" />
  </meta>
  <issue>
    <extension url="{EEB_PROFILE_BASE}EEBOperationOutcomeIssueIdentifier">
      <extension url="{url}">
        <valueIdentifier>
          <system value="{system}" />
          <value value="{e(value)}" />
        </valueIdentifier>
      </extension>
    </extension>
    <severity value="fatal" />
    <code value="processing" />
    <details>
      <coding>
        <system value="{EEB_FEHLER_CODESYSTEM}" />
        <code value="{code.value}" />
        <display value="{e(code.display)}" />
      </coding>
{txt}    </details>
  </issue>
</OperationOutcome>
"""
    return xml.encode("utf-8")


def build_eeb_fehler_mail(
    request: ParsedMail,
    code: EebFehlerCode,
    *,
    sender: str,
    anfrage: EebAnfrage | None = None,
    text: str | None = None,
    outcome_id: str | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
    version: str = "V1.0",
) -> OutgoingMail:
    """``eEB;Fehler;<version>`` answer to ``request`` with ``X-KIM-Fehlercode``.
    ``text`` (optional, test systems) must not contain personal data."""
    code = EebFehlerCode(code)
    oid = outcome_id or str(uuid.uuid4())
    xml = build_eeb_fehler_xml(
        code,
        outcome_id=oid,
        message_id=request.message_id,
        bundle_identifier=anfrage.identifier if anfrage is not None else None,
        text=text,
    )
    env = _env(request)
    name = f"{env}EEB0_FEH_{oid}"
    dk = f"eEB;Fehler;{version}"
    mid = message_id or new_message_id(domain_of(sender))
    headers, to = _answer_headers(request, sender, mid, name, dk, date)
    headers.append(("X-KIM-Fehlercode", code.value))
    raw = compose(
        headers,
        text=f"{code.value} - {code.display}",
        attachments=[OutAttachment(filename=name + ".xml", data=xml, content_type="application/xml", description="eEB_FEH")],
    )
    return OutgoingMail(
        raw=raw, message_id=mid, sender=sender, recipients=[to], subject=name, dienstkennung=dk,
        in_reply_to=request.message_id, attachment_name=name + ".xml",
    )
