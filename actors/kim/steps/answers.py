"""Answers over SMTP (eAU Fehler-Kasse, eEB Bescheinigung / Fehler) and received eEB answers.

Every answer has a deterministic Message-ID and document id per (mail_id, kind), and is
sent through ``ports.mail`` keyed by (mail_id, kind): a step that runs again does not
send a second mail (see ``actors.kim.smtp`` for the at-least-once edge).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import date, datetime, timedelta, timezone
from email import policy
from email.parser import BytesHeaderParser

from actors.kim.core_system import Insured
from actors.kim.steps._base import (
    StepFault,
    StepOut,
    blob_ref,
    cached,
    dumps,
    load_blob,
    parsed_mail,
    procedure_of,
    put_blob,
    step,
)
from actors.kim.steps.domain import idempotency_key, kvnr_hash
from actors.kim.steps.technical import eeb_doc
from protocols.kim.answers import EauFehlerCode, build_eau_fehler_mail, eau_fehler_code_for, parse_fehler_nachricht
from protocols.kim.compose import OutgoingMail, domain_of, new_message_id
from protocols.kim.eau import strip_urn
from protocols.kim.eeb import EebBescheinigungData, EebFehlerCode, build_eeb_bescheinigung_mail, build_eeb_fehler_mail
from protocols.kim.errors import KimError, MimeError
from protocols.kim.mime import ParsedMail, parse_dienstkennung
from protocols.kim.pkcs7 import unwrap_cms, verify_cms
from protocols.kim.procedures import Procedure

#: Our own step fault codes that are answered (technical / signature / address faults).
EXTRA_FEHLERCODES: dict[str, EauFehlerCode] = {
    "wrong_address": EauFehlerCode.WRONG_ADDRESS,
    "wrong_recipient": EauFehlerCode.WRONG_ADDRESS,
    "kim_decryption_failed": EauFehlerCode.DECRYPTION_FORMAT,
    "kim_integrity_failed": EauFehlerCode.KIM_INTEGRITY,
    "subject_invalid": EauFehlerCode.PAYLOAD_INVALID,
    "attachment_name_invalid": EauFehlerCode.PAYLOAD_INVALID,
    "content_type_invalid": EauFehlerCode.PAYLOAD_INVALID,
    "dienstkennung_malformed": EauFehlerCode.PAYLOAD_INVALID,
    "kim_no_date": EauFehlerCode.PAYLOAD_INVALID,
    "signing_time_invalid": EauFehlerCode.SIGNATURE_FORMAT,
    "signer_certificate_missing": EauFehlerCode.CERTIFICATE_INVALID,
    "certificate_expired": EauFehlerCode.CERTIFICATE_INVALID,
    "certificate_not_yet_valid": EauFehlerCode.CERTIFICATE_INVALID,
}


def answer_code(fault_code: str, *, storno: bool = False) -> EauFehlerCode | None:
    code = eau_fehler_code_for(fault_code, storno=storno)
    if code is None:
        code = EXTRA_FEHLERCODES.get(fault_code)
        if code is EauFehlerCode.PAYLOAD_INVALID and storno:
            code = EauFehlerCode.STORNO_FORMAT
    return code


def request_mail(order, ports) -> ParsedMail:
    """The faulty request; if its MIME structure is unusable, its header block only."""
    try:
        return parsed_mail(order, ports)
    except MimeError:
        raw = load_blob(order, ports, "raw")
        return cached("mail-headers", blob_ref(order, "raw"), lambda: _headers_only(raw))


def _headers_only(raw: bytes) -> ParsedMail:
    import hashlib
    from email.utils import getaddresses

    msg = BytesHeaderParser(policy=policy.compat32).parsebytes(raw[:256 * 1024])

    def addr(name):
        vals = msg.get_all(name) or []
        pairs = [a for _, a in getaddresses([str(v) for v in vals]) if a and "@" in a]
        return pairs

    mid = str(msg.get("Message-ID") or "").strip() or None
    frm = addr("From")
    rt = addr("Reply-To")
    return ParsedMail(
        message_id=mid, from_addr=frm[0] if frm else None, to=addr("To"), reply_to=rt[0] if rt else None,
        in_reply_to=None, subject=str(msg.get("Subject") or "") or None, date=None, kim_headers={},
        dienstkennung=parse_dienstkennung([str(v) for v in (msg.get_all("X-KIM-Dienstkennung") or [])]),
        attachments=[], defects=["0:HeadersOnly"], content_hash=hashlib.sha256(raw).hexdigest(), size=len(raw),
    )


def _ids(order, ports, kind: str) -> tuple[str, str]:
    token = ports.pseudonym(f"{order.mail_id}:{kind}", "kim.answer")
    mid = new_message_id(domain_of(ports.sender_address), token)
    doc = str(uuid.uuid5(uuid.NAMESPACE_URL, f"automat:{order.mail_id}:{kind}"))
    return mid, doc


def _store_mail(ports, mail: OutgoingMail) -> str:
    doc = mail.model_dump(mode="python", exclude={"raw"})
    doc["raw_b64"] = base64.b64encode(mail.raw).decode("ascii")
    return put_blob(ports, dumps(doc), "answer")


def _load_mail(order, ports) -> OutgoingMail:
    doc = json.loads(load_blob(order, ports, "answer"))
    raw = base64.b64decode(doc.pop("raw_b64"))
    return OutgoingMail(raw=raw, **doc)


def _bundle_identifier(order, ports) -> str | None:
    """The eAU's Bundle.identifier if the bundle could be read (names the faulty element)."""
    if "payload" not in order.blobs:
        return None
    try:
        from actors.kim.steps.technical import eau_doc

        return eau_doc(order, ports).identifier
    except Exception:
        return None


@step("answer_error")
async def answer_error(order, ports) -> StepOut:
    """Send ``eAU;Fehler-Kasse;V1.2`` for a technical, signature or address fault."""
    fault = order.facts.get("error_code", "")
    storno = procedure_of(order) is Procedure.EAU_STORNO
    code = answer_code(fault, storno=storno)
    if code is None:
        return StepOut(outcome="unanswered", facts={"answer": "none", "answer_reason": "fault_not_answerable"})
    req = request_mail(order, ports)
    if not req.reply_address:
        return StepOut(outcome="unanswered", facts={"answer": "none", "answer_reason": "no_reply_address"})
    kind = "eau_fehler"
    if await ports.mail.was_sent(order.mail_id, kind):
        return StepOut(facts={"answer": kind, "answer_code": code.value, "answer_sent": "earlier"})
    mid, oid = _ids(order, ports, kind)
    mail = build_eau_fehler_mail(
        req, code, sender=ports.sender_address, bundle_identifier=_bundle_identifier(order, ports),
        outcome_id=oid, message_id=mid, environment=order.facts.get("environment"),
    )
    r = await ports.mail.send(mail, mail_id=order.mail_id, kind=kind)
    return StepOut(facts={"answer": kind, "answer_code": code.value, "answer_sent": "now" if r.sent else "earlier", "result": "rejected"})


# ---------------------------------------------------------------------------- eEB Anfrage


def _refuse(code: EebFehlerCode, why: str) -> StepOut:
    return StepOut(outcome="refuse", facts={"eeb_code": code.value, "eeb_refusal": why})


@step("eeb_extract", "domain")
async def eeb_extract(order, ports) -> StepOut:
    """Read the eEB Anfrage into the domain model (stored encrypted)."""
    a = eeb_doc(order, ports)
    ref = put_blob(ports, a.model_dump_json().encode("utf-8"), "eeb-doc")
    return StepOut(
        facts={"eeb_patient": "known" if a.patient.known else "unknown", "eeb_consent": str(a.einverstaendnis).lower()},
        blobs={"eeb_doc": ref},
    )


@step("eeb_check_consent", "domain")
async def eeb_check_consent(order, ports) -> StepOut:
    """The patient consented to the transmission to the practice (else code 120)."""
    if eeb_doc(order, ports).einverstaendnis is not True:
        return _refuse(EebFehlerCode.NO_CONSENT, "no_consent")
    return StepOut(facts={"consent": "1"})


@step("eeb_check_leistungsdatum", "domain")
async def eeb_check_leistungsdatum(order, ports) -> StepOut:
    """Leistungsdatum present and plausible w.r.t. the request time (else code 111)."""
    a = eeb_doc(order, ports)
    if a.leistungsdatum is None:
        return _refuse(EebFehlerCode.LEISTUNGSDATUM_IMPLAUSIBLE, "leistungsdatum_missing")
    ref = (a.timestamp.date() if a.timestamp else datetime.fromtimestamp(ports.clock(), timezone.utc).date())
    if a.leistungsdatum > ref + timedelta(days=1) or a.leistungsdatum < ref - timedelta(days=366):
        return _refuse(EebFehlerCode.LEISTUNGSDATUM_IMPLAUSIBLE, "leistungsdatum_implausible")
    return StepOut(facts={"leistungsdatum_ok": "1"})


@step("eeb_check_ik", "domain")
async def eeb_check_ik(order, ports) -> StepOut:
    """An IK named in the request is one of ours (else code 100)."""
    ik = eeb_doc(order, ports).insurer_ik
    if ik and ik not in ports.reference.insurer_iks:
        return _refuse(EebFehlerCode.NOT_INSURED, "other_insurer")
    return StepOut(facts={"eeb_ik": ik or ""})


@step("eeb_lookup_insured", "domain")
async def eeb_lookup_insured(order, ports) -> StepOut:
    """Find the insured person (110 unidentifiable, 100 not insured, 112 no cover at date)."""
    a = eeb_doc(order, ports)
    if not a.patient.kvnr:
        return _refuse(EebFehlerCode.PATIENT_NOT_IDENTIFIABLE, "no_kvnr")
    h = kvnr_hash(ports, a.patient.kvnr)
    ins = await ports.core.lookup_insured(h)
    if ins is None:
        if not ports.reference.auto_enroll_unknown:
            return _refuse(EebFehlerCode.NOT_INSURED, "unknown_insured")
        ik = a.insurer_ik if a.insurer_ik in ports.reference.insurer_iks else sorted(ports.reference.insurer_iks)[0]
        p = a.patient
        await ports.core.enroll(
            Insured(kvnr_hash=h, insurer_ik=ik, coverage_start="2000-01-01",
                    data={"kvnr": p.kvnr, "family": p.family, "given": p.given, "birth_date": p.birth_date,
                          "postal_code": p.postal_code})
        )
        ins = await ports.core.lookup_insured(h)
    if ins.insurer_ik not in ports.reference.insurer_iks:
        return _refuse(EebFehlerCode.NOT_INSURED, "other_insurer")
    if a.leistungsdatum and ins.coverage_end and date.fromisoformat(ins.coverage_end) < a.leistungsdatum:
        return _refuse(EebFehlerCode.NO_INSURANCE_AT_DATE, "no_cover_at_date")
    return StepOut(facts={"insured_ref": h, "insured": "known"})


@step("eeb_build_bescheinigung", "domain")
async def eeb_build_bescheinigung(order, ports) -> StepOut:
    """Build the signed ``eEB;Bescheinigung`` answer from the insured's master data."""
    if ports.insurer_signer is None:
        raise StepFault("no_insurer_signer", "no signing identity of the insurer configured")
    a = eeb_doc(order, ports)
    ins = await ports.core.lookup_insured(order.facts.get("insured_ref", ""))
    if ins is None:
        raise StepFault("insured_missing", "the insured person vanished from the core system")
    d = ins.data
    data = EebBescheinigungData(
        kvnr=d.get("kvnr") or a.patient.kvnr, family=d.get("family") or a.patient.family or "",
        given=d.get("given") or a.patient.given or "",
        birth_date=date.fromisoformat(str(d.get("birth_date") or a.patient.birth_date)),
        postal_code=d.get("postal_code"), insurer_ik=ins.insurer_ik, insurer_name=ports.reference.insurer_name,
        coverage_start=date.fromisoformat(ins.coverage_start or "2000-01-01"),
        coverage_end=date.fromisoformat(ins.coverage_end) if ins.coverage_end else None,
    )
    kind = "eeb_bescheinigung"
    mid, doc = _ids(order, ports, kind)
    req = parsed_mail(order, ports)
    version = req.dienstkennung.version or "V1.0"
    mail = build_eeb_bescheinigung_mail(
        req, a, data, ports.insurer_signer, sender=ports.sender_address, bundle_uuid=doc, message_id=mid, version=version
    )
    return StepOut(facts={"answer_kind": kind}, blobs={"answer": _store_mail(ports, mail)})


def _eeb_fehler(order, ports, code: EebFehlerCode) -> str:
    req = request_mail(order, ports)
    try:
        anfrage = eeb_doc(order, ports) if "payload" in order.blobs else None
    except KimError:
        anfrage = None
    mid, oid = _ids(order, ports, "eeb_fehler")
    version = req.dienstkennung.version or "V1.0"
    mail = build_eeb_fehler_mail(req, code, sender=ports.sender_address, anfrage=anfrage, outcome_id=oid, message_id=mid, version=version)
    return _store_mail(ports, mail)


@step("eeb_build_fehler", "domain")
async def eeb_build_fehler(order, ports) -> StepOut:
    """Build the ``eEB;Fehler`` answer for a refused request (code from the check)."""
    code = EebFehlerCode(order.facts.get("eeb_code", EebFehlerCode.SPECIAL_CASE.value))
    return StepOut(facts={"answer_kind": "eeb_fehler", "answer_code": code.value}, blobs={"answer": _eeb_fehler(order, ports, code)})


@step("send_answer", "domain")
async def send_answer(order, ports) -> StepOut:
    """Send the prepared answer over SMTP (once per mail and answer kind)."""
    kind = order.facts.get("answer_kind")
    if not kind:
        raise StepFault("fact_missing", "answer_kind not known")
    if await ports.mail.was_sent(order.mail_id, kind):
        return StepOut(facts={"answer": kind, "answer_sent": "earlier"})
    r = await ports.mail.send(_load_mail(order, ports), mail_id=order.mail_id, kind=kind)
    return StepOut(facts={"answer": kind, "answer_sent": "now" if r.sent else "earlier", "result": "answered"})


@step("eeb_answer_error")
async def eeb_answer_error(order, ports) -> StepOut:
    """Technical/signature fault of an eEB Anfrage: build and send ``eEB;Fehler``."""
    code = answer_code(order.facts.get("error_code", ""))
    if code is None:
        return StepOut(outcome="unanswered", facts={"answer": "none", "answer_reason": "fault_not_answerable"})
    try:
        ecode = EebFehlerCode(code.value)
    except ValueError:
        ecode = EebFehlerCode.INVALID
    req = request_mail(order, ports)
    if not req.reply_address:
        return StepOut(outcome="unanswered", facts={"answer": "none", "answer_reason": "no_reply_address"})
    kind = "eeb_fehler"
    if await ports.mail.was_sent(order.mail_id, kind):
        return StepOut(facts={"answer": kind, "answer_code": ecode.value, "answer_sent": "earlier"})
    ref = _eeb_fehler(order, ports, ecode)
    mail = _load_mail(order.model_copy(update={"blobs": {**order.blobs, "answer": ref}}), ports)
    r = await ports.mail.send(mail, mail_id=order.mail_id, kind=kind)
    return StepOut(
        facts={"answer": kind, "answer_code": ecode.value, "answer_sent": "now" if r.sent else "earlier", "result": "rejected"},
        blobs={"answer": ref},
    )


# ---------------------------------------------------------------------------- received eEB answers


@step("eeb_inspect_answer", "domain")
async def eeb_inspect_answer(order, ports) -> StepOut:
    """A received Bescheinigung (.p7s: signature state) or Fehler (.xml: error code)."""
    data = load_blob(order, ports, "attachment")
    if procedure_of(order) is Procedure.EEB_FEHLER or order.facts.get("attachment_kind") == "xml":
        f = parse_fehler_nachricht(data)
        return StepOut(facts={"answer_type": "fehler", "fehler_code": f.code[:8]})
    sd = unwrap_cms(data)
    r = verify_cms(sd, ports.trust, at=sd.signing_time)
    ref = put_blob(ports, sd.content, "payload")
    return StepOut(facts={"answer_type": "bescheinigung", "answer_signature": r.status.value}, blobs={"payload": ref})


@step("correlate_reply", "domain")
async def correlate_reply(order, ports) -> StepOut:
    """Correlate with the request by In-Reply-To (pseudonymous)."""
    irt = parsed_mail(order, ports).in_reply_to
    if not irt:
        return StepOut(facts={"correlated": "0"})
    return StepOut(facts={"correlated": "1", "in_reply_to_hash": ports.pseudonym(irt, "kim.message_id")})


@step("map_received", "domain")
async def map_received(order, ports) -> StepOut:
    """Map a received eEB answer onto a core-system record."""
    rec = {
        "kind": "eeb_received",
        "mail_id": order.mail_id,
        "answer_type": order.facts.get("answer_type"),
        "fehler_code": order.facts.get("fehler_code"),
        "signature": order.facts.get("answer_signature"),
        "in_reply_to_hash": order.facts.get("in_reply_to_hash"),
        "attachment_ref": order.blobs.get("attachment"),
        "status": "received",
    }
    ref = put_blob(ports, dumps(rec), "record")
    return StepOut(facts={"record_kind": "eeb_received"}, blobs={"record": ref})
