"""KIM mail protocol (Kommunikation im Medizinwesen): pure functions, no I/O, no Ray.

Called by the KIM step workers; each takes bytes / typed models and returns a typed
result or raises a :class:`~protocols.kim.errors.KimError` subclass with a stable
``code`` and a readable ``reason``.

==================  =========================================================
``mime``            :func:`parse_mail` → :class:`ParsedMail` (headers, X-KIM-*,
                    Dienstkennung, attachments, content hash)
``procedures``      :func:`classify` → :class:`Classification` (:class:`Procedure`)
``pkcs7``           :func:`unwrap_cms`, :func:`verify_cms` (signature + trust)
``eau``             :func:`parse_eau` → :class:`EauDocument`, :func:`validate_eau`
``eeb``             :func:`parse_eeb_anfrage`, eEB Bescheinigung / Fehler answers
``answers``         ``eAU;Fehler-Kasse;V1.2`` answers (OperationOutcome)
``generator``       synthetic mails of every procedure and fault, test PKI
==================  =========================================================
"""

from protocols.kim.answers import (
    EauFehlerCode,
    FehlerNachricht,
    build_eau_fehler_mail,
    build_eau_operation_outcome,
    eau_fehler_code_for,
    parse_fehler_nachricht,
)
from protocols.kim.compose import OutgoingMail
from protocols.kim.eau import (
    EauDocument,
    EauIssue,
    EauKind,
    PayloadErrorCode,
    PayloadType,
    detect_payload_type,
    parse_eau,
    validate_eau,
)
from protocols.kim.eeb import (
    EebAnfrage,
    EebBescheinigungData,
    EebFehlerCode,
    build_eeb_bescheinigung_mail,
    build_eeb_fehler_mail,
    parse_eeb_anfrage,
)
from protocols.kim.errors import (
    AnswerError,
    CmsError,
    EauError,
    EebError,
    FhirPayloadError,
    KimError,
    KimFault,
    MimeError,
)
from protocols.kim.mime import (
    Attachment,
    Dienstkennung,
    DienstkennungStatus,
    MimeErrorCode,
    ParsedMail,
    parse_dienstkennung,
    parse_mail,
)
from protocols.kim.pkcs7 import (
    CmsErrorCode,
    CmsSignedData,
    SignatureStatus,
    Signer,
    TrustStore,
    VerificationResult,
    VerifyCode,
    unwrap_cms,
    verify_cms,
)
from protocols.kim.procedures import Classification, ClassificationReason, Procedure, classify

__all__ = [
    "AnswerError", "Attachment", "Classification", "ClassificationReason", "CmsError", "CmsErrorCode",
    "CmsSignedData", "Dienstkennung", "DienstkennungStatus", "EauDocument", "EauError", "EauFehlerCode",
    "EauIssue", "EauKind", "EebAnfrage", "EebBescheinigungData", "EebError", "EebFehlerCode", "FehlerNachricht",
    "FhirPayloadError", "KimError", "KimFault", "MimeError", "MimeErrorCode", "OutgoingMail", "ParsedMail",
    "PayloadErrorCode", "PayloadType", "Procedure", "SignatureStatus", "Signer", "TrustStore",
    "VerificationResult", "VerifyCode", "build_eau_fehler_mail", "build_eau_operation_outcome",
    "build_eeb_bescheinigung_mail", "build_eeb_fehler_mail", "classify", "detect_payload_type",
    "eau_fehler_code_for", "parse_dienstkennung", "parse_eau", "parse_eeb_anfrage", "parse_fehler_nachricht",
    "parse_mail", "unwrap_cms", "validate_eau", "verify_cms",
]
