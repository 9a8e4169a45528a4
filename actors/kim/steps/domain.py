"""Domain layer: validate, map, deposit into the core system (eAU, Storno, EBZ/AAR, eMailPLUS).

Business findings (KVNR, LANR, BSNR, ICD, AU period …) never cause an error answer:
each check adds a ``finding_<check>`` fact (a code, no data) and the mail is deposited
as a clarification case. Only an address fault (insured at another insurer) raises
``wrong_address`` and is answered with code 100.
"""

from __future__ import annotations

import json
import re
from datetime import date

from actors.kim.core_system import Insured
from actors.kim.steps._base import (
    StepFault,
    StepOut,
    blob_ref,
    cached,
    dumps,
    findings,
    load_blob,
    parsed_mail,
    procedure_of,
    put_blob,
    step,
)
from actors.kim.steps.technical import eau_doc
from protocols.kim.eau import ICD10GM_RE, IK_RE, KVNR_RE, NINE_DIGITS, EauDocument, strip_urn
from protocols.kim.generator import kvnr_check_digit
from protocols.kim.procedures import Procedure, classify


def doc_of(order, ports) -> EauDocument:
    ref = blob_ref(order, "eau_doc")
    return cached("eau_doc", ref, lambda: EauDocument.model_validate_json(load_blob(order, ports, "eau_doc")))


def kvnr_hash(ports, kvnr: str) -> str:
    return ports.pseudonym(kvnr.strip().upper(), "kim.kvnr")


@step("extract_fields", "domain")
async def extract_fields(order, ports) -> StepOut:
    """Read the eAU into the domain model (stored encrypted as ``eau_doc``)."""
    doc = eau_doc(order, ports)
    ref = put_blob(ports, doc.model_dump_json().encode("utf-8"), "eau-doc")
    facts = {"eau_kind": doc.kind.value, "n_diagnoses": str(len(doc.diagnoses))}
    if doc.au_type:
        facts["au_type"] = doc.au_type
    if doc.formular_art:
        facts["formular_art"] = doc.formular_art
    return StepOut(facts=facts, blobs={"eau_doc": ref})


@step("check_kvnr", "domain")
async def check_kvnr(order, ports) -> StepOut:
    """KVNR (kvid-10): format ``[A-Z][0-9]{9}`` and check digit."""
    doc = doc_of(order, ports)
    kvnr = doc.patient.kvnr if doc.patient else None
    if not kvnr:
        return StepOut(facts={"finding_kvnr": "kvnr_missing"})
    if not KVNR_RE.match(kvnr):
        return StepOut(facts={"finding_kvnr": "kvnr_format"})
    if kvnr_check_digit(kvnr[0], kvnr[1:9]) != int(kvnr[9]):
        return StepOut(facts={"finding_kvnr": "kvnr_checksum"})
    return StepOut(facts={"kvnr_ok": "1"})


@step("check_insurer_ik", "domain")
async def check_insurer_ik(order, ports) -> StepOut:
    """The Kostenträger IK is one of this insurer's IKs (else: address fault, code 100)."""
    doc = doc_of(order, ports)
    ik = doc.coverage.insurer_ik if doc.coverage else None
    if not ik or not IK_RE.match(ik):
        return StepOut(facts={"finding_ik": "ik_format"})
    if ik not in ports.reference.insurer_iks:
        raise StepFault("wrong_address", "the Kostenträger IK is not an IK of this insurer")
    return StepOut(facts={"insurer_ik": ik})


def lanr_checksum_ok(lanr: str) -> bool:
    d6 = lanr[:6]
    s = sum(int(c) * (4 if i % 2 == 0 else 9) for i, c in enumerate(d6))
    return (10 - s % 10) % 10 == int(lanr[6])


@step("check_lanr", "domain")
async def check_lanr(order, ports) -> StepOut:
    """LANR: 9 digits, check digit (7th digit, weights 4/9)."""
    doc = doc_of(order, ports)
    pr = doc.practitioner
    if pr is None or not pr.number:
        return StepOut(facts={"finding_lanr": "lanr_missing"})
    if not NINE_DIGITS.match(pr.number):
        return StepOut(facts={"finding_lanr": "lanr_format"})
    if (pr.id_type or "LANR") == "LANR" and not lanr_checksum_ok(pr.number):
        return StepOut(facts={"finding_lanr": "lanr_checksum"})
    return StepOut(facts={"lanr_ok": "1", "practitioner_type": pr.id_type or "LANR"})


@step("check_bsnr", "domain")
async def check_bsnr(order, ports) -> StepOut:
    """BSNR: 9 digits, first two digits a KV-Bezirk."""
    doc = doc_of(order, ports)
    org = doc.organization
    if org is None or not org.number:
        return StepOut(facts={"finding_bsnr": "bsnr_missing"})
    if not NINE_DIGITS.match(org.number):
        return StepOut(facts={"finding_bsnr": "bsnr_format"})
    if (org.id_type or "BSNR") == "BSNR" and org.number[:2] not in ports.reference.kv_regions:
        return StepOut(facts={"finding_bsnr": "bsnr_region"})
    return StepOut(facts={"bsnr_ok": "1", "kv_region": org.number[:2]})


@step("check_au_period", "domain")
async def check_au_period(order, ports) -> StepOut:
    """AU period: end ≥ start, not longer than the plausible maximum."""
    doc = doc_of(order, ports)
    au = doc.au
    if au is None or au.end is None:
        return StepOut(facts={"finding_au_period": "au_period_missing"})
    begin = au.start or au.asserted
    if begin and au.end < begin:
        return StepOut(facts={"finding_au_period": "au_period_end_before_start"})
    if begin and (au.end - begin).days > ports.reference.max_au_days:
        return StepOut(facts={"finding_au_period": "au_period_too_long"})
    days = (au.end - begin).days + 1 if begin else 0
    return StepOut(facts={"au_days": str(days)})


@step("check_icd", "domain")
async def check_icd(order, ports) -> StepOut:
    """ICD-10-GM diagnoses: present, code format, Diagnosesicherheit A/G/V/Z."""
    doc = doc_of(order, ports)
    if not doc.diagnoses:
        return StepOut(facts={"finding_icd": "diagnosis_missing"})
    for d in doc.diagnoses:
        if not ICD10GM_RE.match(d.code):
            return StepOut(facts={"finding_icd": "icd_format"})
        if d.diagnosesicherheit and d.diagnosesicherheit not in ("A", "G", "V", "Z"):
            return StepOut(facts={"finding_icd": "icd_diagnosesicherheit"})
    return StepOut(facts={"icd_ok": "1"})


@step("check_erst_folge", "domain")
async def check_erst_folge(order, ports) -> StepOut:
    """Erst-/Folgebescheinigung: known type; an Erstbescheinigung names the AU start."""
    doc = doc_of(order, ports)
    t = (doc.au_type or "").upper()
    if not (t.startswith("ERST") or t.startswith("FOLGE")):
        return StepOut(facts={"finding_erst_folge": "au_type_unknown"})
    if t.startswith("ERST") and (doc.au is None or doc.au.start is None):
        return StepOut(facts={"finding_erst_folge": "au_period_start_missing"})
    return StepOut(facts={"erst_folge": "erst" if t.startswith("ERST") else "folge"})


@step("lookup_insured", "domain")
async def lookup_insured(order, ports) -> StepOut:
    """Insured person in the core system's master data (by pseudonymous KVNR)."""
    doc = doc_of(order, ports)
    kvnr = doc.patient.kvnr if doc.patient else None
    if not kvnr:
        return StepOut(facts={"insured": "unidentified"})
    h = kvnr_hash(ports, kvnr)
    ins = await ports.core.lookup_insured(h)
    if ins is None:
        if ports.reference.auto_enroll_unknown:
            ik = doc.coverage.insurer_ik if doc.coverage else ""
            p = doc.patient
            await ports.core.enroll(
                Insured(
                    kvnr_hash=h, insurer_ik=ik or "", coverage_start="2000-01-01",
                    data={"kvnr": kvnr, "family": p.family, "given": p.given, "birth_date": p.birth_date},
                )
            )
            return StepOut(facts={"insured": "enrolled", "insured_ref": h})
        return StepOut(facts={"insured": "unknown", "insured_ref": h, "finding_insured": "insured_unknown"})
    if ins.insurer_ik not in ports.reference.insurer_iks:
        raise StepFault("wrong_address", "the insured person is insured at another insurer")
    if ins.coverage_end and doc.au and doc.au.start and date.fromisoformat(ins.coverage_end) < doc.au.start:
        return StepOut(facts={"insured": "known", "insured_ref": h, "finding_insured": "coverage_ended"})
    return StepOut(facts={"insured": "known", "insured_ref": h})


@step("map_record", "domain")
async def map_record(order, ports) -> StepOut:
    """Map the eAU onto the core system's AU record (stored encrypted as ``record``)."""
    doc = doc_of(order, ports)
    rec = {
        "kind": "eau",
        "doc_hash": order.facts.get("doc_hash"),
        "mail_id": order.mail_id,
        "bundle_identifier": doc.identifier,
        "au_type": doc.au_type,
        "issued": doc.issued,
        "insured_ref": order.facts.get("insured_ref"),
        "patient": doc.patient.model_dump(mode="json") if doc.patient else None,
        "insurer_ik": doc.coverage.insurer_ik if doc.coverage else None,
        "practitioner": {"type": doc.practitioner.id_type, "number": doc.practitioner.number} if doc.practitioner else None,
        "organization": {"type": doc.organization.id_type, "number": doc.organization.number} if doc.organization else None,
        "diagnoses": [d.model_dump(mode="json") for d in doc.diagnoses],
        "au": doc.au.model_dump(mode="json") if doc.au else None,
        "findings": findings(order.facts),
        "status": "received",
    }
    ref = put_blob(ports, dumps(rec), "record")
    return StepOut(facts={"record_kind": "eau"}, blobs={"record": ref})


def _record(order, ports) -> dict:
    ref = blob_ref(order, "record")
    return cached("record", ref, lambda: json.loads(load_blob(order, ports, "record")))


def idempotency_key(order, kind: str) -> str:
    return f"{kind}:{order.mail_id}"


@step("deposit_core", "domain")
async def deposit_core(order, ports) -> StepOut:
    """Deposit the record into the core system (idempotency key = kind + mail id)."""
    rec = _record(order, ports)
    receipt = await ports.core.deposit(rec, idempotency_key(order, rec["kind"]))
    return StepOut(facts={"receipt_id": receipt.receipt_id, "deposit": "created" if receipt.created else "existing"})


@step("decide_answer", "domain")
async def decide_answer(order, ports) -> StepOut:
    """eAU: no answer on success and never for business findings (no MDN either)."""
    found = findings(order.facts)
    return StepOut(
        facts={"answer": "none", "result": "finding" if found else "accepted", "findings": ",".join(found)[:300]}
    )


@step("release_record", "domain")
async def release_record(order, ports) -> StepOut:
    """Release the deposited record for processing (clarification case with findings)."""
    kind = order.facts.get("record_kind") or "eau"
    status = "clarification" if findings(order.facts) else "released"
    r = await ports.core.set_status(idempotency_key(order, kind), status)
    if r is None:
        raise StepFault("record_missing", "the deposited record is not in the core system")
    return StepOut(facts={"core_status": status, "outcome": order.facts.get("outcome") or "deposited"})


@step("record_duplicate", "domain")
async def record_duplicate(order, ports) -> StepOut:
    """A duplicate is recorded, not rejected: note the original's core-system receipt."""
    doc_hash = order.facts.get("doc_hash")
    orig = await ports.core.find_by_document(doc_hash) if doc_hash else None
    facts = {"outcome": "duplicate", "result": "duplicate"}
    if orig is not None:
        facts["original_receipt"] = orig.receipt_id
    return StepOut(facts=facts)


# ---------------------------------------------------------------------------- Storno


@step("map_storno", "domain")
async def map_storno(order, ports) -> StepOut:
    """Find the cancelled eAU in the core system and map the Storno record."""
    doc = doc_of(order, ports)
    target_hash = ports.pseudonym(strip_urn(doc.cancelled_identifier or "").lower(), "kim.bundle")
    target = await ports.core.find_by_document(target_hash, "eau")
    rec = {
        "kind": "eau_storno",
        "doc_hash": order.facts.get("doc_hash"),
        "cancels": target_hash,
        "target_receipt": target.receipt_id if target else None,
        "target_key": target.idempotency_key if target else None,
        "practitioner": {"type": doc.practitioner.id_type, "number": doc.practitioner.number} if doc.practitioner else None,
        "mail_id": order.mail_id,
        "status": "received",
    }
    ref = put_blob(ports, dumps(rec), "record")
    facts = {"record_kind": "eau_storno", "storno_target": "found" if target else "unknown"}
    if target is None:
        facts["finding_storno"] = "storno_target_unknown"
    return StepOut(facts=facts, blobs={"record": ref})


@step("apply_storno", "domain")
async def apply_storno(order, ports) -> StepOut:
    """Mark the cancelled eAU as cancelled in the core system."""
    rec = _record(order, ports)
    if not rec.get("target_key"):
        return StepOut(facts={"storno_applied": "0"})
    r = await ports.core.set_status(rec["target_key"], "cancelled")
    return StepOut(facts={"storno_applied": "1" if r else "0"})


# ---------------------------------------------------------------------------- EBZ / AAR


@step("map_antrag", "domain")
async def map_antrag(order, ports) -> StepOut:
    """EBZ/AAR: map the signed application onto a core-system record (payload by ref)."""
    import hashlib

    payload = load_blob(order, ports, "payload")
    proc = procedure_of(order)
    rec = {
        "kind": proc.value.lower(),
        "doc_hash": ports.pseudonym(hashlib.sha256(payload).hexdigest(), "kim.antrag"),
        "mail_id": order.mail_id,
        "payload_ref": order.blobs.get("payload"),
        "dienstkennung": parsed_mail(order, ports).dienstkennung.value,
        "status": "received",
    }
    ref = put_blob(ports, dumps(rec), "record")
    return StepOut(facts={"record_kind": rec["kind"]}, blobs={"record": ref})


# ---------------------------------------------------------------------------- eMailPLUS / work basket


@step("classify_mail", "domain")
async def classify_mail(order, ports) -> StepOut:
    """eMailPLUS: why the mail has no known procedure and what it looks like (for the clerk)."""
    c = classify(parsed_mail(order, ports))
    facts = {"procedure": Procedure.EMAILPLUS.value, "classification": c.reason.value}
    if c.suggested:
        facts["suggested"] = c.suggested.value
    return StepOut(facts=facts)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@step("extract_text", "domain")
async def extract_text(order, ports) -> StepOut:
    """Prepare the clerk view (body text + attachment list), stored encrypted."""
    mail = parsed_mail(order, ports)
    view = {
        "subject": mail.subject,
        "from": mail.from_addr,
        "date": mail.date_raw,
        "body": (mail.body_text or "")[:200_000],
        "attachments": [{"name": a.filename, "type": a.content_type, "size": a.size} for a in mail.attachments],
    }
    ref = put_blob(ports, dumps(view), "clerk-view")
    return StepOut(facts={"clerk_attachments": str(len(mail.attachments))}, blobs={"clerk_view": ref})


@step("handoff_clerk", "technical")
async def handoff_clerk(order, ports) -> StepOut:
    """Hand the mail to a clerk queue (work basket item in the core system, idempotent)."""
    queue = "emailplus" if procedure_of(order) is Procedure.EMAILPLUS else f"{procedure_of(order).value.lower()}-clearing"
    rec = {
        "kind": "workbasket",
        "queue": queue,
        "mail_id": order.mail_id,
        "reason": order.facts.get("error_code") or order.facts.get("classification") or "manual",
        "suggested": order.facts.get("suggested"),
        "blobs": dict(order.blobs),
        "status": "open",
    }
    receipt = await ports.core.deposit(rec, idempotency_key(order, "workbasket"))
    return StepOut(facts={"workbasket": queue, "receipt_id": receipt.receipt_id, "outcome": "workbasket"})
