"""Procedure classification: Dienstkennung + subject + attachment naming → :class:`Procedure`.

The ``X-KIM-Dienstkennung`` decides the procedure (a table of rules, configurable: EBZ
and AAR header values are not public in our sources, so they are plain rules a caller
can replace). Every mail without a *known* Dienstkennung is ``eMailPLUS`` (manual work
basket); :attr:`Classification.reason` says why (missing / malformed / unknown /
unsupported version) and :attr:`Classification.suggested` what the subject/attachment
naming looks like, for the clerk.

For a known procedure the subject and attachment naming rules of the public specs are
checked and deviations reported in :attr:`Classification.naming_issues` (non-fatal; the
road map decides):

* eAU (KBV TA eAU): subject ``<E|T>EAU0_<Bundle.identifier>``, exactly one attachment
  ``<E|T>EAU0_<DocID>.p7s``, ``application/octet-stream``, ``Content-Description: eAU``.
* eEB (gematik spec-VSDM-Ersatzbescheinigung): subject ``<T|E>EEB0_ANF_<UUID>``,
  attachment ``<T|E>EEB0_ANF_<UUID>.p7s`` with ``Content-Description: eEB_ANF`` (older
  samples: ``eEB``); answers ``EEB0_BES_`` / ``EEB0_FEH_``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Mapping

from pydantic import BaseModel, Field

from protocols.kim.mime import Attachment, Dienstkennung, DienstkennungStatus, ParsedMail


class Procedure(StrEnum):
    EAU_LIEFERUNG = "eAU_Lieferung"
    EAU_STORNO = "eAU_Storno"
    EEB_ANFRAGE = "eEB_Anfrage"
    EEB_BESCHEINIGUNG = "eEB_Bescheinigung"
    EEB_FEHLER = "eEB_Fehler"
    EBZ = "EBZ"
    AAR = "AAR"
    EMAILPLUS = "eMailPLUS"


class ClassificationReason(StrEnum):
    KNOWN = "known"
    MISSING_DIENSTKENNUNG = "missing_dienstkennung"
    MALFORMED_DIENSTKENNUNG = "malformed_dienstkennung"
    UNKNOWN_DIENSTKENNUNG = "unknown_dienstkennung"
    UNSUPPORTED_VERSION = "unsupported_version"  # Anwendung;Nachrichtentyp known, version not


class NamingIssueCode(StrEnum):
    SUBJECT = "subject_mismatch"
    ATTACHMENT_MISSING = "attachment_missing"
    ATTACHMENT_COUNT = "attachment_count"
    ATTACHMENT_NAME = "attachment_name"
    CONTENT_TYPE = "attachment_content_type"
    DESCRIPTION = "attachment_description"
    ENVIRONMENT = "environment_mismatch"  # subject T…, attachment E… (or vice versa)


class NamingIssue(BaseModel):
    code: NamingIssueCode
    reason: str


#: Default rules: ``"Anwendung;Nachrichtentyp;Version"`` → procedure; ``*`` matches any
#: part. Comparison is case-insensitive. Exact rules win over wildcard rules.
DEFAULT_RULES: dict[str, Procedure] = {
    "eAU;Lieferung;V1.1": Procedure.EAU_LIEFERUNG,  # accepted during transition
    "eAU;Lieferung;V1.2": Procedure.EAU_LIEFERUNG,
    "eAU;Storno-Arzt;V1.2": Procedure.EAU_STORNO,
    "eEB;Anfrage;V1.0": Procedure.EEB_ANFRAGE,
    "eEB;Anfrage;V1.1": Procedure.EEB_ANFRAGE,
    "eEB;Bescheinigung;V1.0": Procedure.EEB_BESCHEINIGUNG,
    "eEB;Bescheinigung;V1.1": Procedure.EEB_BESCHEINIGUNG,
    "eEB;Fehler;V1.0": Procedure.EEB_FEHLER,
    "eEB;Fehler;V1.1": Procedure.EEB_FEHLER,
    # Not public in our sources: placeholders, override via ``rules``.
    "EBZ;*;*": Procedure.EBZ,
    "AAR;*;*": Procedure.AAR,
}


@dataclass(frozen=True)
class _Naming:
    subject: re.Pattern[str]
    attachment: re.Pattern[str]
    content_types: tuple[str, ...]
    descriptions: tuple[str, ...]


_UUIDISH = r"[0-9A-Za-z][0-9A-Za-z\-]*"
_EAU = _Naming(
    subject=re.compile(rf"^(?P<env>[ET])EAU0_(?P<id>{_UUIDISH})$"),
    attachment=re.compile(rf"^(?P<env>[ET])EAU0_(?P<id>{_UUIDISH})\.p7s$"),
    content_types=("application/octet-stream",),
    descriptions=("eAU",),
)


def _eeb(kind: str, ext: str, descriptions: tuple[str, ...], ctypes: tuple[str, ...]) -> _Naming:
    return _Naming(
        subject=re.compile(rf"^(?P<env>[TE])EEB0_{kind}_(?P<id>{_UUIDISH})$"),
        attachment=re.compile(rf"^(?P<env>[TE])EEB0_{kind}_(?P<id>{_UUIDISH})\.{ext}$"),
        content_types=ctypes,
        descriptions=descriptions,
    )


NAMING: dict[Procedure, _Naming] = {
    Procedure.EAU_LIEFERUNG: _EAU,
    Procedure.EAU_STORNO: _EAU,
    Procedure.EEB_ANFRAGE: _eeb("ANF", "p7s", ("eEB_ANF", "eEB"), ("application/octet-stream",)),
    Procedure.EEB_BESCHEINIGUNG: _eeb("BES", "p7s", ("eEB_BES", "eEB"), ("application/octet-stream",)),
    Procedure.EEB_FEHLER: _eeb("FEH", "xml", ("eEB_FEH", "eEB"), ("application/xml", "text/xml")),
}


class Classification(BaseModel):
    """Result of :func:`classify`. Control information only (no personal data)."""

    procedure: Procedure
    reason: ClassificationReason
    dienstkennung: Dienstkennung
    environment: str | None = None  # "E" (Echtbetrieb) / "T" (Test) from the naming
    document_id: str | None = None  # id from the subject (eAU: Bundle.identifier, eEB: UUID)
    attachment_name: str | None = None
    naming_issues: list[NamingIssue] = Field(default_factory=list)
    suggested: Procedure | None = None  # for eMailPLUS: what the naming looks like

    @property
    def known(self) -> bool:
        return self.reason is ClassificationReason.KNOWN

    @property
    def naming_ok(self) -> bool:
        return not self.naming_issues


def _norm(s: str) -> str:
    return s.strip().casefold()


def match_rules(dk: Dienstkennung, rules: Mapping[str, Procedure] | None = None) -> tuple[Procedure | None, bool]:
    """(procedure or None, whether some rule knows Anwendung;Nachrichtentyp)."""
    rules = DEFAULT_RULES if rules is None else rules
    if dk.status is not DienstkennungStatus.VALID:
        return None, False
    got = (_norm(dk.anwendung or ""), _norm(dk.nachrichtentyp or ""), _norm(dk.version or ""))
    best: tuple[int, Procedure] | None = None
    type_known = False
    for pattern, proc in rules.items():
        parts = [_norm(p) for p in pattern.split(";")]
        if len(parts) != 3:
            continue
        ok = [p == "*" or p == g for p, g in zip(parts, got)]
        if ok[0] and ok[1]:
            type_known = True
        if all(ok):
            specificity = sum(p != "*" for p in parts)
            if best is None or specificity > best[0]:
                best = (specificity, Procedure(proc))
    return (best[1] if best else None), type_known


def suggest_from_naming(mail: ParsedMail) -> Procedure | None:
    """What the subject / attachment names look like (for mails without a usable Dienstkennung)."""
    names = [mail.subject or ""] + [a.filename or "" for a in mail.attachments]
    for proc in (Procedure.EAU_LIEFERUNG, Procedure.EEB_ANFRAGE, Procedure.EEB_BESCHEINIGUNG, Procedure.EEB_FEHLER):
        nm = NAMING[proc]
        if nm.subject.match(names[0]) or any(nm.attachment.match(n) for n in names[1:]):
            return proc
    return None


def _check_naming(proc: Procedure, mail: ParsedMail) -> tuple[list[NamingIssue], str | None, str | None, str | None]:
    nm = NAMING.get(proc)
    if nm is None:
        return [], None, None, None
    issues: list[NamingIssue] = []
    env = doc_id = att_name = None
    m = nm.subject.match((mail.subject or "").strip())
    if m:
        env, doc_id = m.group("env"), m.group("id")
    else:
        issues.append(NamingIssue(code=NamingIssueCode.SUBJECT, reason=f"subject does not match {nm.subject.pattern}"))
    atts: list[Attachment] = mail.relevant_attachments()
    if not atts:
        issues.append(NamingIssue(code=NamingIssueCode.ATTACHMENT_MISSING, reason="no attachment"))
        return issues, env, doc_id, None
    if len(atts) > 1:
        issues.append(NamingIssue(code=NamingIssueCode.ATTACHMENT_COUNT, reason=f"{len(atts)} attachments, expected 1"))
    named = [a for a in atts if a.filename and nm.attachment.match(a.filename)]
    att = named[0] if named else atts[0]
    att_name = att.filename
    am = nm.attachment.match(att.filename or "")
    if not am:
        issues.append(NamingIssue(code=NamingIssueCode.ATTACHMENT_NAME, reason=f"attachment name does not match {nm.attachment.pattern}"))
    elif env is not None and am.group("env") != env:
        issues.append(NamingIssue(code=NamingIssueCode.ENVIRONMENT, reason=f"subject says {env}, attachment says {am.group('env')}"))
    elif env is None:
        env = am.group("env")
    if att.content_type not in nm.content_types:
        issues.append(NamingIssue(code=NamingIssueCode.CONTENT_TYPE, reason=f"content type {att.content_type}, expected {' or '.join(nm.content_types)}"))
    if (att.description or "") not in nm.descriptions:
        issues.append(NamingIssue(code=NamingIssueCode.DESCRIPTION, reason=f"Content-Description {att.description!r}, expected {' or '.join(nm.descriptions)}"))
    return issues, env, doc_id, att_name


def classify(mail: ParsedMail, rules: Mapping[str, Procedure] | None = None) -> Classification:
    """Classify a parsed mail. ``rules`` replaces :data:`DEFAULT_RULES` (pass
    ``{**DEFAULT_RULES, "EBZ;ANW;2.0.0": Procedure.EBZ}`` to extend)."""
    dk = mail.dienstkennung
    if dk.status is DienstkennungStatus.MISSING:
        reason = ClassificationReason.MISSING_DIENSTKENNUNG
        proc = None
    elif dk.status is DienstkennungStatus.MALFORMED:
        reason = ClassificationReason.MALFORMED_DIENSTKENNUNG
        proc = None
    else:
        proc, type_known = match_rules(dk, rules)
        if proc is None:
            reason = ClassificationReason.UNSUPPORTED_VERSION if type_known else ClassificationReason.UNKNOWN_DIENSTKENNUNG
        else:
            reason = ClassificationReason.KNOWN
    if proc is None or proc is Procedure.EMAILPLUS:
        return Classification(
            procedure=Procedure.EMAILPLUS,
            reason=reason,
            dienstkennung=dk,
            suggested=suggest_from_naming(mail),
        )
    issues, env, doc_id, att_name = _check_naming(proc, mail)
    return Classification(
        procedure=proc,
        reason=reason,
        dienstkennung=dk,
        environment=env,
        document_id=doc_id,
        attachment_name=att_name,
        naming_issues=issues,
    )
