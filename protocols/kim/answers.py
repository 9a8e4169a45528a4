"""eAU error answers of the insurer: ``eAU;Fehler-Kasse;V1.2``.

The answer goes to the ``Reply-To`` address (else ``From``) of the faulty mail, with an
XML OperationOutcome attachment ``<E|T>EAU0_Fehler_<id>.xml`` (profile
``KBV_PR_EAU_health_insurance_Practitioner|1.2``): one ``issue`` with
``severity=fatal``, ``code=processing`` and the error code in ``issue.details.coding.code``
(code system ``KBV_CS_SFHIR_EAU_AU_ERROR_KASSE``, codes 100–314). The issue names the
faulty element: the KIM ``Message-ID`` (message-level faults) or the
``Bundle-Identifier`` (when the bundle could be read).

Error answers are sent **only for technical, signature or address faults**, never for
business content: :func:`eau_fehler_code_for` maps our typed fault codes to an
:class:`EauFehlerCode` and returns ``None`` for everything else (business findings of
:func:`~protocols.kim.eau.validate_eau`, duplicates, ...). No read receipt (MDN) is ever
requested.

The code table: 100 and 301 are taken from the KBV examples (``Beispiel_eAU_Fehler_*``);
the others follow the gematik eEB code system ``EEBErrorcodeCS``, which was modelled on
the eAU one (2xx: signature of the document, 3xx: KIM transport). The display texts are
ours where the public sources had none for eAU.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel

from protocols.kim import _fhirxml as fx
from protocols.kim._fhirxml import PayloadErrorCode
from protocols.kim.compose import SENDERSYSTEM, OutAttachment, OutgoingMail, compose, domain_of, mail_date, new_message_id
from protocols.kim.errors import AnswerError, FhirPayloadError
from protocols.kim.mime import MimeErrorCode, ParsedMail, bare_message_id
from protocols.kim.pkcs7 import CmsErrorCode, SignatureStatus, VerifyCode

EAU_FEHLER_DIENSTKENNUNG = "eAU;Fehler-Kasse;V1.2"
EAU_FEHLER_PROFILE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_EAU_health_insurance_Practitioner|1.2"
EAU_FEHLER_CODESYSTEM = "https://fhir.kbv.de/CodeSystem/KBV_CS_SFHIR_EAU_AU_ERROR_KASSE"
EAU_FEHLER_IDENTIFIER_EXT = "https://fhir.kbv.de/StructureDefinition/KBV_EX_EAU_health_insurance_Practitioner_Identifier"
MESSAGE_ID_SYSTEM = "https://fhir.kbv.de/NamingSystem/KBV_NS_EAU_Message_ID_KIM"


class EauFehlerCode(StrEnum):
    """Error codes we answer with (``issue.details.coding.code``)."""

    WRONG_ADDRESS = "100"  # patient not insured at the addressed insurer
    PAYLOAD_INVALID = "101"  # not readable / not per spec (no FHIR, wrong profile, missing element, MIME)
    CERTIFICATE_INVALID = "201"  # signer certificate untrusted / expired
    SIGNED_DATA_MISMATCH = "202"  # signature check: signed data ≠ transmitted data (tampered)
    NOT_SIGNED = "210"  # document not signed
    SIGNATURE_FORMAT = "211"  # signature could not be checked (wrong format)
    STORNO_FORMAT = "301"  # KIM message of a Storno in wrong format
    DECRYPTION_FORMAT = "307"  # KIM message marked encrypted, wrong format
    KIM_NOT_SIGNED = "309"  # KIM message without signature
    KIM_SIGNATURE_FORMAT = "310"  # KIM message signature in wrong format
    KIM_INTEGRITY = "311"  # KIM message manipulated
    KIM_KEY_UNAVAILABLE = "313"  # KIM message not decryptable: key unavailable

    @property
    def display(self) -> str:
        return _DISPLAY[self]

    @property
    def category(self) -> str:
        """``address``, ``technical`` or ``signature``."""
        if self is EauFehlerCode.WRONG_ADDRESS:
            return "address"
        if self.value.startswith("2") or self in (EauFehlerCode.KIM_INTEGRITY, EauFehlerCode.KIM_NOT_SIGNED, EauFehlerCode.KIM_SIGNATURE_FORMAT):
            return "signature"
        return "technical"


_DISPLAY = {
    EauFehlerCode.WRONG_ADDRESS: "Der Patient ist nicht bei der adressierten Krankenkasse versichert.",
    EauFehlerCode.PAYLOAD_INVALID: "Die übermittelte eAU entspricht nicht den Vorgaben und/oder ist nicht lesbar.",
    EauFehlerCode.CERTIFICATE_INVALID: "Die Signatur der eAU ist nicht gültig, da ein fehlerhaftes Zertifikat verwendet wurde oder nicht alle zur Zertifikatsprüfung erforderlichen Komponenten bzw. Ressourcen zur Verfügung standen.",
    EauFehlerCode.SIGNED_DATA_MISMATCH: "Die Signaturprüfung der eAU hat ergeben, dass die signierten Daten nicht mit den übermittelten Daten der eAU übereinstimmen.",
    EauFehlerCode.NOT_SIGNED: "Die eAU ist nicht signiert. Die eAU ist ggf. manipuliert worden.",
    EauFehlerCode.SIGNATURE_FORMAT: "Die Signatur der eAU konnte aufgrund eines falschen Formats nicht geprüft werden.",
    EauFehlerCode.STORNO_FORMAT: "Die KIM-Nachricht für die Stornomeldung ist in einem falschen Format verschlüsselt.",
    EauFehlerCode.DECRYPTION_FORMAT: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass die KIM-Nachricht zwar als eine verschlüsselte KIM-Nachricht gekennzeichnet wurde, aber auf Grund des falschen Formats nicht von der Krankenkasse entschlüsselt werden konnte.",
    EauFehlerCode.KIM_NOT_SIGNED: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass für die KIM-Nachricht keine Signatur vorhanden ist.",
    EauFehlerCode.KIM_SIGNATURE_FORMAT: "Übermittlung ist fehlgeschlagen. Grund hierfür ist, dass die Signatur für die KIM-Nachricht aufgrund des falschen Formats nicht geprüft werden konnte.",
    EauFehlerCode.KIM_INTEGRITY: "Die Integrität der Nachricht wurde verletzt. Die Prüfung der Signatur hat ergeben, dass die Nachricht manipuliert wurde.",
    EauFehlerCode.KIM_KEY_UNAVAILABLE: "Die KIM-Nachricht konnte auf Grund eines nicht verfügbaren Schlüssels nicht entschlüsselt werden.",
}

#: Fault code (any of our typed codes) → answer code. Anything not listed is *not*
#: answered (business content, duplicates, internal faults).
FAULT_TO_FEHLERCODE: dict[str, EauFehlerCode] = {
    # MIME / structure
    MimeErrorCode.BROKEN: EauFehlerCode.PAYLOAD_INVALID,
    MimeErrorCode.EMPTY: EauFehlerCode.PAYLOAD_INVALID,
    MimeErrorCode.OVERSIZED: EauFehlerCode.PAYLOAD_INVALID,
    MimeErrorCode.NO_ATTACHMENT: EauFehlerCode.PAYLOAD_INVALID,
    MimeErrorCode.TOO_MANY_ATTACHMENTS: EauFehlerCode.PAYLOAD_INVALID,
    # CMS container
    CmsErrorCode.NOT_CMS: EauFehlerCode.SIGNATURE_FORMAT,
    CmsErrorCode.NOT_SIGNED_DATA: EauFehlerCode.SIGNATURE_FORMAT,
    CmsErrorCode.DETACHED: EauFehlerCode.SIGNATURE_FORMAT,
    CmsErrorCode.UNSIGNED_PAYLOAD: EauFehlerCode.NOT_SIGNED,
    CmsErrorCode.NO_SIGNER: EauFehlerCode.NOT_SIGNED,
    # signature verification (VerifyCode values)
    VerifyCode.NOT_CMS: EauFehlerCode.SIGNATURE_FORMAT,
    VerifyCode.NOT_SIGNED_DATA: EauFehlerCode.SIGNATURE_FORMAT,
    VerifyCode.DETACHED: EauFehlerCode.SIGNATURE_FORMAT,
    VerifyCode.UNSIGNED_PAYLOAD: EauFehlerCode.NOT_SIGNED,
    VerifyCode.NO_SIGNER_INFO: EauFehlerCode.NOT_SIGNED,
    VerifyCode.SIGNER_CERT_MISSING: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.UNSUPPORTED_ALGORITHM: EauFehlerCode.SIGNATURE_FORMAT,
    VerifyCode.DIGEST_MISMATCH: EauFehlerCode.SIGNED_DATA_MISMATCH,
    VerifyCode.SIGNATURE_INVALID: EauFehlerCode.SIGNED_DATA_MISMATCH,
    VerifyCode.NO_TRUST_ANCHORS: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.UNKNOWN_ISSUER: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.ISSUER_NOT_CA: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.CHAIN_SIGNATURE_INVALID: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.CERT_EXPIRED: EauFehlerCode.CERTIFICATE_INVALID,
    VerifyCode.CERT_NOT_YET_VALID: EauFehlerCode.CERTIFICATE_INVALID,
    # FHIR payload
    PayloadErrorCode.NOT_XML: EauFehlerCode.PAYLOAD_INVALID,
    PayloadErrorCode.NOT_FHIR: EauFehlerCode.PAYLOAD_INVALID,
    PayloadErrorCode.WRONG_RESOURCE: EauFehlerCode.PAYLOAD_INVALID,
    PayloadErrorCode.WRONG_PROFILE: EauFehlerCode.PAYLOAD_INVALID,
    PayloadErrorCode.MISSING_ELEMENT: EauFehlerCode.PAYLOAD_INVALID,
    # address (decided by the domain layer)
    "wrong_address": EauFehlerCode.WRONG_ADDRESS,
}


def eau_fehler_code_for(fault_code: str, *, storno: bool = False) -> EauFehlerCode | None:
    """The answer code for one of our fault codes, or None if the fault must not be
    answered (business content). For a Storno, payload/format faults become ``301``."""
    code = FAULT_TO_FEHLERCODE.get(str(fault_code))
    if code is EauFehlerCode.PAYLOAD_INVALID and storno:
        return EauFehlerCode.STORNO_FORMAT
    return code


def is_answerable(status: SignatureStatus) -> bool:
    """Every non-valid signature status is a signature fault and is answered."""
    return status is not SignatureStatus.VALID


def build_eau_operation_outcome(
    code: EauFehlerCode,
    *,
    outcome_id: str,
    message_id: str | None = None,
    bundle_identifier: str | None = None,
    text: str | None = None,
) -> bytes:
    """FHIR XML OperationOutcome (``KBV_PR_EAU_health_insurance_Practitioner``).

    Names the faulty element by ``bundle_identifier`` if given, else by ``message_id``
    (angle brackets are removed). ``text`` must not contain personal data.
    """
    code = EauFehlerCode(code)
    if bundle_identifier:
        ident = (
            '\t\t\t<extension url="Bundle-Identifier">\n\t\t\t\t<valueIdentifier>\n'
            '\t\t\t\t\t<system value="urn:ietf:rfc:3986" />\n'
            f'\t\t\t\t\t<value value="{fx.xml_escape(bundle_identifier)}" />\n'
            "\t\t\t\t</valueIdentifier>\n\t\t\t</extension>\n"
        )
    elif message_id:
        ident = (
            '\t\t\t<extension url="Message-ID">\n\t\t\t\t<valueIdentifier>\n'
            f'\t\t\t\t\t<system value="{MESSAGE_ID_SYSTEM}" />\n'
            f'\t\t\t\t\t<value value="{fx.xml_escape(bare_message_id(message_id) or message_id)}" />\n'
            "\t\t\t\t</valueIdentifier>\n\t\t\t</extension>\n"
        )
    else:
        raise AnswerError("answer_no_reference", "an OperationOutcome needs a Message-ID or a Bundle-Identifier")
    details_text = f'\t\t\t<text value="{fx.xml_escape(text)}" />\n' if text else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<OperationOutcome xmlns="http://hl7.org/fhir">\n'
        f'\t<id value="{fx.xml_escape(outcome_id)}" />\n'
        f'\t<meta>\n\t\t<profile value="{EAU_FEHLER_PROFILE}" />\n\t</meta>\n'
        "\t<issue>\n"
        f'\t\t<extension url="{EAU_FEHLER_IDENTIFIER_EXT}">\n{ident}\t\t</extension>\n'
        '\t\t<severity value="fatal" />\n'
        '\t\t<code value="processing" />\n'
        "\t\t<details>\n\t\t\t<coding>\n"
        f'\t\t\t\t<system value="{EAU_FEHLER_CODESYSTEM}" />\n'
        f'\t\t\t\t<code value="{code.value}" />\n'
        f'\t\t\t\t<display value="{fx.xml_escape(code.display)}" />\n'
        f"\t\t\t</coding>\n{details_text}\t\t</details>\n"
        "\t</issue>\n"
        "</OperationOutcome>\n"
    )
    return xml.encode("utf-8")


def build_eau_fehler_mail(
    request: ParsedMail,
    code: EauFehlerCode,
    *,
    sender: str,
    bundle_identifier: str | None = None,
    text: str | None = None,
    environment: str | None = None,
    outcome_id: str | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
) -> OutgoingMail:
    """The ``eAU;Fehler-Kasse;V1.2`` answer to ``request`` (to its Reply-To, else From).

    ``environment`` is ``"E"``/``"T"`` (default: from the request subject, else ``E``).
    Raises :class:`AnswerError`: ``answer_no_reply_address`` if the request names no
    sender, ``answer_not_allowed`` if ``code`` is not one of :class:`EauFehlerCode`.
    """
    try:
        code = EauFehlerCode(code)
    except ValueError:
        raise AnswerError("answer_not_allowed", f"{code!r} is not an eAU error code we answer with") from None
    to = request.reply_address
    if not to:
        raise AnswerError("answer_no_reply_address", "the faulty mail has neither Reply-To nor From")
    env = environment or _env_of(request.subject) or "E"
    oid = outcome_id or str(uuid.uuid4())
    xml = build_eau_operation_outcome(
        code, outcome_id=oid, message_id=request.message_id, bundle_identifier=bundle_identifier, text=text
    )
    name = f"{env}EAU0_Fehler_{oid}.xml"
    mid = message_id or new_message_id(domain_of(sender))
    headers = [
        ("Date", mail_date(date)),
        ("From", sender),
        ("To", to),
        ("Message-ID", mid),
    ]
    if request.message_id:
        headers.append(("In-Reply-To", request.message_id))
        headers.append(("References", request.message_id))
    subject = f"{env}EAU0_Fehler_{oid}"
    headers += [
        ("Subject", subject),
        ("X-KIM-Dienstkennung", EAU_FEHLER_DIENSTKENNUNG),
        ("X-KIM-Sendersystem", SENDERSYSTEM),
    ]
    raw = compose(
        headers,
        text=f"eAU Fehlermeldung der Krankenkasse: {code.value} - {code.display}",
        attachments=[OutAttachment(filename=name, data=xml, content_type="application/xml", description="eAU")],
    )
    return OutgoingMail(
        raw=raw,
        message_id=mid,
        sender=sender,
        recipients=[to],
        subject=subject,
        dienstkennung=EAU_FEHLER_DIENSTKENNUNG,
        in_reply_to=request.message_id,
        attachment_name=name,
    )


def _env_of(subject: str | None) -> str | None:
    if subject and len(subject) > 1 and subject[0] in "ET" and subject[1:5] in ("EAU0", "EEB0"):
        return subject[0]
    return None


class FehlerNachricht(BaseModel):
    """A parsed error OperationOutcome (eAU Fehler-Kasse or eEB Fehler)."""

    id: str | None
    profile: str | None
    severity: str | None
    code: str  # issue.details.coding.code
    code_system: str | None
    display: str | None
    text: str | None
    message_id: str | None  # extension Message-ID
    bundle_identifier: str | None  # extension Bundle-Identifier


class _OutcomeError(FhirPayloadError):
    domain = "answer"


def parse_fehler_nachricht(data: bytes) -> FehlerNachricht:
    """Read an error OperationOutcome (e.g. ``Beispiel_eAU_Fehler_*.xml``, eEB Fehler).
    Raises :class:`~protocols.kim.errors.FhirPayloadError` (``payload_*`` codes)."""
    try:
        root = fx.parse_root(data, _OutcomeError)
        rtype = fx.local(root.tag)
        if rtype != "OperationOutcome":
            raise _OutcomeError(PayloadErrorCode.WRONG_RESOURCE, f"root resource is {rtype}, not OperationOutcome", resource=rtype)
        issue = fx.find(root, "issue")
        if issue is None:
            raise _OutcomeError(PayloadErrorCode.MISSING_ELEMENT, "OperationOutcome.issue is missing", element="OperationOutcome.issue")
        coding = fx.find(issue, "details/coding")
        code = fx.val(coding, "code")
        if not code:
            raise _OutcomeError(
                PayloadErrorCode.MISSING_ELEMENT, "issue.details.coding.code is missing", element="issue.details.coding.code"
            )
        mid = bid = None
        for outer in fx.findall(issue, "extension"):
            for inner in fx.findall(outer, "extension"):
                v = fx.val(inner, "valueIdentifier/value")
                if inner.get("url") == "Message-ID":
                    mid = v
                elif inner.get("url") == "Bundle-Identifier":
                    bid = v
        profs = fx.profiles(root)
        return FehlerNachricht(
            id=fx.val(root, "id"),
            profile=profs[0] if profs else None,
            severity=fx.val(issue, "severity"),
            code=code,
            code_system=fx.val(coding, "system"),
            display=fx.val(coding, "display"),
            text=fx.val(issue, "details/text"),
            message_id=mid,
            bundle_identifier=bid,
        )
    except FhirPayloadError:
        raise
    except Exception as exc:
        raise _OutcomeError(PayloadErrorCode.NOT_XML, f"payload could not be read ({type(exc).__name__})") from None
