"""Technical layer: store, scan, parse, extract, verify, classify (shared by the road maps)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

from actors.kim.steps._base import (
    CACHE,
    StepFault,
    StepOut,
    Transient,
    blob_ref,
    cached,
    cms,
    load_blob,
    parsed_mail,
    procedure_of,
    put_blob,
    step,
)
from actors.runtime.blobs import BlobNotFound
from actors.runtime.crypto import IntegrityError
from protocols.kim import _fhirxml as fx
from protocols.kim.eau import EauKind, PayloadErrorCode, PayloadType, detect_payload_type, parse_eau
from protocols.kim.eeb import parse_eeb_anfrage
from protocols.kim.errors import EauError, EebError, MimeError
from protocols.kim.mime import DienstkennungStatus, MimeErrorCode, parse_mail
from protocols.kim.pkcs7 import SignatureStatus, TrustStore, verify_cms
from protocols.kim.procedures import NamingIssueCode, Procedure, classify
from protocols.kim.roadmap import select_roadmap

_EAU_PROCS = (Procedure.EAU_LIEFERUNG, Procedure.EAU_STORNO)


def _is_kim_address(addr: str | None, suffixes: tuple[str, ...]) -> bool:
    if not addr or addr.count("@") != 1:
        return False
    local, domain = addr.rsplit("@", 1)
    return bool(local) and any(domain.lower().endswith(s) for s in suffixes)


def _payload_error(order):
    return EebError if procedure_of(order) is Procedure.EEB_ANFRAGE else EauError


# ---------------------------------------------------------------------------- mail level


@step("load_raw")
async def load_raw(order, ports) -> StepOut:
    """Read the raw mail from the claim-check store, decrypting and verifying it."""
    ref = blob_ref(order, "raw")
    try:
        raw = ports.blobs.get(ref)
    except (BlobNotFound, ValueError):  # ValueError: not a valid blob ref
        raise Transient("blob_missing", "the raw mail is not in the blob store") from None
    except IntegrityError:
        raise Transient("blob_integrity", "the stored raw mail fails its integrity check") from None
    CACHE.put(("bytes", ref), raw)
    digest = hashlib.sha256(raw).hexdigest()
    return StepOut(facts={"raw_bytes": str(len(raw)), "mail_hash": ports.pseudonym(digest, "kim.mail")})


@step("check_size")
async def check_size(order, ports) -> StepOut:
    """KIM size limit (25 MB per message; larger content goes through KAS)."""
    raw = load_blob(order, ports, "raw")
    limit = ports.reference.max_mail_bytes
    if not raw.strip():
        raise MimeError(MimeErrorCode.EMPTY, "mail is empty")
    if len(raw) > limit:
        raise MimeError(MimeErrorCode.OVERSIZED, f"mail has {len(raw)} bytes, limit is {limit}", size=len(raw), limit=limit)
    return StepOut(facts={"size_ok": "1"})


@step("parse_mime")
async def parse_mime(order, ports) -> StepOut:
    """Full MIME parse (structure, attachments, defects)."""
    mail = parsed_mail(order, ports)
    return StepOut(facts={"attachments": str(len(mail.attachments)), "mime_defects": str(len(mail.defects))})


@step("check_kim_headers")
async def check_kim_headers(order, ports) -> StepOut:
    """Message-ID, From and Date present; the KIM client module's decryption and
    integrity results (``X-KIM-DecryptionResult`` / ``X-KIM-IntegrityCheckResult``) OK."""
    mail = parsed_mail(order, ports)
    if not mail.message_id:
        raise StepFault("kim_no_message_id", "mail has no Message-ID")
    if not mail.from_addr:
        raise StepFault("kim_no_sender", "mail has no From address")
    if mail.date is None:
        raise StepFault("kim_no_date", "mail has no (valid) Date header")
    bad = ("fail", "error", "fehler", "invalid", "ungueltig", "ungültig", "nok")

    def failed(name: str) -> bool:
        v = (mail.header(name) or "").strip().lower()
        return bool(v) and any(b in v for b in bad)

    if failed("X-KIM-DecryptionResult"):
        raise StepFault("kim_decryption_failed", "the KIM client module could not decrypt the mail")
    if failed("X-KIM-IntegrityCheckResult"):
        raise StepFault("kim_integrity_failed", "the KIM client module reports a violated integrity")
    facts = {"kim_headers": str(len(mail.kim_headers))}
    ss = mail.kim_headers.get("X-KIM-Sendersystem") or mail.header("X-KIM-Sendersystem")
    if ss:
        facts["sender_system"] = ss[:64]
    return StepOut(facts=facts)


@step("parse_dienstkennung")
async def parse_dienstkennung_step(order, ports) -> StepOut:
    """``X-KIM-Dienstkennung: <Anwendung>;<Nachrichtentyp>;<Version>`` well-formed."""
    dk = parsed_mail(order, ports).dienstkennung
    if dk.status is DienstkennungStatus.MISSING:
        raise StepFault("dienstkennung_missing", "mail has no X-KIM-Dienstkennung")
    if dk.status is DienstkennungStatus.MALFORMED:
        raise StepFault("dienstkennung_malformed", f"X-KIM-Dienstkennung is malformed: {dk.reason}")
    return StepOut(facts={"dk_anwendung": dk.anwendung or "", "dk_typ": dk.nachrichtentyp or "", "dk_version": dk.version or ""})


@step("classify_procedure")
async def classify_procedure(order, ports) -> StepOut:
    """Full classification; a mail whose procedure does not belong on this road map is
    handed over (outcome ``misrouted``)."""
    c = classify(parsed_mail(order, ports))
    facts = {"procedure": c.procedure.value, "classification": c.reason.value}
    if c.environment:
        facts["environment"] = c.environment
    if select_roadmap(c.procedure) != order.roadmap:
        facts["misrouted_to"] = select_roadmap(c.procedure)
        return StepOut(outcome="misrouted", facts=facts)
    return StepOut(facts=facts)


@step("check_sender")
async def check_sender(order, ports) -> StepOut:
    """The answer address (Reply-To, else From) is a KIM address."""
    mail = parsed_mail(order, ports)
    addr = mail.reply_address
    if not _is_kim_address(addr, ports.reference.kim_domain_suffixes):
        raise StepFault("sender_invalid", "the sender/Reply-To is not a KIM address")
    return StepOut(facts={"sender_hash": ports.pseudonym(addr.lower(), "kim.sender")})


@step("check_recipient")
async def check_recipient(order, ports) -> StepOut:
    """The mail is addressed to one of the insurer's KIM addresses."""
    mail = parsed_mail(order, ports)
    rcpts = [a.lower() for a in mail.to + mail.cc]
    own = {a.lower() for a in ports.reference.own_addresses}
    if own:
        ok = any(a in own for a in rcpts)
    else:
        ok = any(_is_kim_address(a, ports.reference.kim_domain_suffixes) for a in rcpts)
    if not ok:
        raise StepFault("wrong_recipient", "the mail is not addressed to a KIM address of this insurer")
    return StepOut(facts={"recipients": str(len(rcpts))})


def _naming(order, ports):
    return classify(parsed_mail(order, ports))


@step("check_subject")
async def check_subject(order, ports) -> StepOut:
    """Subject naming of the procedure (eAU ``<E|T>EAU0_<id>``, eEB ``<T|E>EEB0_ANF_<UUID>``)."""
    c = _naming(order, ports)
    for issue in c.naming_issues:
        if issue.code in (NamingIssueCode.SUBJECT, NamingIssueCode.ENVIRONMENT):
            raise StepFault("subject_invalid", issue.reason)
    return StepOut(facts={"subject_ok": "1"})


@step("check_attachment_count")
async def check_attachment_count(order, ports) -> StepOut:
    """Exactly one attachment (KIM client signature reports ignored)."""
    mail = parsed_mail(order, ports)
    mail.single_attachment()
    return StepOut(facts={"relevant_attachments": "1", "client_reports": str(len(mail.attachments) - len(mail.relevant_attachments()))})


@step("check_attachment_name")
async def check_attachment_name(order, ports) -> StepOut:
    """Attachment file name per procedure (``<E|T>EAU0_<DocID>.p7s`` …)."""
    c = _naming(order, ports)
    for issue in c.naming_issues:
        if issue.code in (NamingIssueCode.ATTACHMENT_NAME, NamingIssueCode.ATTACHMENT_MISSING):
            raise StepFault("attachment_name_invalid", issue.reason)
    return StepOut(facts={"attachment_name_ok": "1"})


@step("check_content_type")
async def check_content_type(order, ports) -> StepOut:
    """Attachment Content-Type and Content-Description per procedure."""
    c = _naming(order, ports)
    for issue in c.naming_issues:
        if issue.code in (NamingIssueCode.CONTENT_TYPE, NamingIssueCode.DESCRIPTION):
            raise StepFault("content_type_invalid", issue.reason)
    att = parsed_mail(order, ports).single_attachment()
    return StepOut(facts={"attachment_type": att.content_type})


@step("extract_attachment")
async def extract_attachment(order, ports) -> StepOut:
    """Store the attachment (encrypted) as its own blob."""
    att = parsed_mail(order, ports).single_attachment()
    if att.size == 0:
        raise MimeError(MimeErrorCode.NO_ATTACHMENT, "the attachment is empty")
    ref = put_blob(ports, att.data, "attachment")
    kind = "p7s" if (att.filename or "").lower().endswith(".p7s") else (att.filename or "").rsplit(".", 1)[-1].lower()[:8]
    return StepOut(
        facts={"attachment_hash": ports.pseudonym(att.sha256, "kim.attachment"), "attachment_bytes": str(att.size), "attachment_kind": kind},
        blobs={"attachment": ref},
    )


# ---------------------------------------------------------------------------- signature


@step("unwrap_cms")
async def unwrap_cms_step(order, ports) -> StepOut:
    """Unwrap the PKCS#7/CMS SignedData; the signed content becomes its own blob."""
    sd = cms(order, ports)
    ref = put_blob(ports, sd.content, "payload")
    return StepOut(
        facts={"signer_count": str(sd.signer_count), "digest_alg": sd.digest_algorithm, "signed_attrs": "1" if sd.signed_attributes else "0"},
        blobs={"payload": ref},
    )


@step("verify_signature")
async def verify_signature(order, ports) -> StepOut:
    """Signature over the content (tampering); trust is checked separately."""
    r = verify_cms(cms(order, ports), TrustStore())
    if r.status in (SignatureStatus.BROKEN_SIGNATURE, SignatureStatus.NOT_CMS):
        raise StepFault(r.code.value, r.reason)
    return StepOut(facts={"signature": "ok"})


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _signing_time(order, ports) -> datetime:
    sd = cms(order, ports)
    t = sd.signing_time or parsed_mail(order, ports).date or datetime.fromtimestamp(ports.clock(), timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@step("check_signing_time")
async def check_signing_time(order, ports) -> StepOut:
    """The signing time (signed attribute) is plausible: not in the future at receipt."""
    sd = cms(order, ports)
    if sd.signing_time is None:
        return StepOut(facts={"signing_time_source": "mail_date"})
    st = _utc(sd.signing_time)
    now = datetime.fromtimestamp(ports.clock(), timezone.utc)
    if st > now + timedelta(seconds=ports.reference.signing_time_skew_s):
        raise StepFault("signing_time_invalid", "the document claims to be signed in the future")
    return StepOut(facts={"signing_time_source": "signed_attribute", "signed_at": st.strftime("%Y-%m-%dT%H:%M:%SZ")})


@step("check_cert_validity")
async def check_cert_validity(order, ports) -> StepOut:
    """The signer certificate was valid at signing time."""
    sd = cms(order, ports)
    if sd.signer is None:
        raise StepFault("signer_certificate_missing", "signer certificate is not in the container")
    when = _signing_time(order, ports)
    if when < _utc(sd.signer.not_before):
        raise StepFault("certificate_not_yet_valid", "signer certificate was not yet valid at signing time")
    if when > _utc(sd.signer.not_after):
        raise StepFault("certificate_expired", "signer certificate had expired at signing time")
    return StepOut(facts={"cert_valid_at_signing": "1"})


@step("verify_chain")
async def verify_chain(order, ports) -> StepOut:
    """The signer chains to a trusted CA (validity checked at signing time)."""
    r = verify_cms(cms(order, ports), ports.trust, at=_signing_time(order, ports))
    if not r.valid:
        raise StepFault(r.code.value, r.reason)
    return StepOut(facts={"chain_length": str(len(r.chain)), "trusted": "1"})


# ---------------------------------------------------------------------------- payload


@step("detect_payload")
async def detect_payload(order, ports) -> StepOut:
    """What the signed content is; the FHIR procedures need FHIR XML."""
    pt = detect_payload_type(load_blob(order, ports, "payload"))
    err = _payload_error(order)
    proc = procedure_of(order)
    if proc in (Procedure.EBZ, Procedure.AAR):
        if pt not in (PayloadType.XML, PayloadType.FHIR_XML):
            raise err(PayloadErrorCode.NOT_XML, f"payload is {pt.value}, not XML")
        return StepOut(facts={"payload_type": pt.value})
    if pt is PayloadType.XML:
        raise err(PayloadErrorCode.NOT_FHIR, "payload is XML outside the FHIR namespace")
    if pt is not PayloadType.FHIR_XML:
        raise err(PayloadErrorCode.NOT_XML, f"payload is {pt.value}, not FHIR XML")
    return StepOut(facts={"payload_type": pt.value})


def _root(order, ports):
    ref = blob_ref(order, "payload")
    hit = CACHE.get(("xml", ref))
    if hit is not None:
        return hit
    err = _payload_error(order)
    data = load_blob(order, ports, "payload")
    if procedure_of(order) in (Procedure.EBZ, Procedure.AAR):
        import xml.etree.ElementTree as ET

        if fx._DTD.search(data):
            raise err(PayloadErrorCode.NOT_XML, "payload contains a DTD or entity declaration")
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise err(PayloadErrorCode.NOT_XML, f"payload is not well-formed XML ({exc})") from None
    else:
        root = fx.parse_root(data, err)
    # an ElementTree takes ~7x its source (tracemalloc: 126 KB for an 18 KB eAU bundle)
    return CACHE.put(("xml", ref), root, weight=7 * len(data))


@step("parse_xml")
async def parse_xml(order, ports) -> StepOut:
    """Safe XML parse (no DTD/entities), well-formed, FHIR namespace."""
    root = _root(order, ports)
    return StepOut(facts={"root": fx.local(root.tag)[:64]})


@step("check_resource_type")
async def check_resource_type(order, ports) -> StepOut:
    """The FHIR root resource is a Bundle."""
    rtype = fx.local(_root(order, ports).tag)
    if rtype != "Bundle":
        raise _payload_error(order)(PayloadErrorCode.WRONG_RESOURCE, f"root resource is {rtype}, not Bundle", resource=rtype)
    return StepOut(facts={"resource": "Bundle"})


_PROFILES = {
    Procedure.EAU_LIEFERUNG: ("KBV_PR_EAU_Bundle", "KBV_PR_EAU_Storno_Bundle"),
    Procedure.EAU_STORNO: ("KBV_PR_EAU_Bundle", "KBV_PR_EAU_Storno_Bundle"),
    Procedure.EEB_ANFRAGE: ("EEBAnfrageBundle",),
}


@step("check_profile")
async def check_profile(order, ports) -> StepOut:
    """``Bundle.meta.profile`` is a profile of this procedure."""
    root = _root(order, ports)
    profs = fx.profiles(root)
    wanted = _PROFILES.get(procedure_of(order), ())
    for p in profs:
        for w in wanted:
            if fx.profile_matches(p, w):
                return StepOut(facts={"profile": w, "profile_version": fx.profile_version(p) or ""})
    shown = profs[0] if profs else "none"
    raise _payload_error(order)(PayloadErrorCode.WRONG_PROFILE, f"Bundle.meta.profile is {shown!r}, not {' or '.join(wanted)}", profile=shown)


@step("detect_storno")
async def detect_storno(order, ports) -> StepOut:
    """Lieferung vs Storno: the bundle kind must match the Dienstkennung."""
    profs = fx.profiles(_root(order, ports))
    storno = any(fx.profile_matches(p, "KBV_PR_EAU_Storno_Bundle") for p in profs)
    expect_storno = procedure_of(order) is Procedure.EAU_STORNO
    if storno != expect_storno:
        what = "a Storno bundle" if storno else "a Lieferung bundle"
        raise EauError(PayloadErrorCode.WRONG_PROFILE, f"{what} under {order.facts.get('dk_typ') or 'this'} Dienstkennung")
    return StepOut(facts={"eau_kind": EauKind.STORNO.value if storno else EauKind.LIEFERUNG.value})


def eau_doc(order, ports):
    proc = procedure_of(order)
    expect = EauKind.STORNO if proc is Procedure.EAU_STORNO else EauKind.LIEFERUNG
    ref = blob_ref(order, "payload")
    # read from the tree parse_xml built (one XML parse per payload; the py-spy of the 240k
    # run had the eAU payload parsed twice, 13 % of a worker host)
    return cached("eau", ref, lambda: parse_eau(b"", expect=expect, root=_root(order, ports)))


def eeb_doc(order, ports):
    ref = blob_ref(order, "payload")
    return cached("eeb", ref, lambda: parse_eeb_anfrage(b"", root=_root(order, ports)))


@step("check_mandatory")
async def check_mandatory(order, ports) -> StepOut:
    """All mandatory elements of the profile are present (typed document read)."""
    proc = procedure_of(order)
    if proc is Procedure.EEB_ANFRAGE:
        doc = eeb_doc(order, ports)
        ident = doc.identifier
    elif proc in _EAU_PROCS:
        doc = eau_doc(order, ports)
        ident = doc.identifier
    else:
        raise StepFault("procedure_unsupported", f"no mandatory-element rules for {proc.value}")
    from protocols.kim.eau import strip_urn

    return StepOut(facts={"doc_hash": ports.pseudonym(strip_urn(ident).lower(), "kim.bundle")})


@step("dedupe_file_hash")
async def dedupe_file_hash(order, ports) -> StepOut:
    """Duplicate check by the attachment's hash (same .p7s sent again)."""
    h = order.facts.get("attachment_hash")
    if not h:
        raise StepFault("fact_missing", "attachment_hash not known (extract_attachment did not run)")
    owner = await ports.dupes.claim("file", h, order.mail_id)
    if owner != order.mail_id:
        return StepOut(outcome="duplicate", facts={"duplicate_by": "file_hash", "duplicate_of": owner})
    return StepOut(facts={"file_unique": "1"})


@step("dedupe_bundle_id")
async def dedupe_bundle_id(order, ports) -> StepOut:
    """Duplicate check by Bundle.identifier (same document, possibly signed again)."""
    h = order.facts.get("doc_hash")
    if not h:
        raise StepFault("fact_missing", "doc_hash not known (check_mandatory did not run)")
    owner = await ports.dupes.claim("bundle", h, order.mail_id)
    if owner != order.mail_id:
        return StepOut(outcome="duplicate", facts={"duplicate_by": "bundle_identifier", "duplicate_of": owner})
    return StepOut(facts={"bundle_unique": "1"})


@step("archive_original")
async def archive_original(order, ports) -> StepOut:
    """Archive the signed original (revision-proof copy, own blob kind)."""
    data = load_blob(order, ports, "attachment")
    ref = put_blob(ports, data, "archive")
    return StepOut(facts={"archived": "1"}, blobs={"archive": ref})


__all__ = ["eau_doc", "eeb_doc", "parse_mail"]
