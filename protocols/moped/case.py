"""The case logic (pure): apply one operation to a case state → a new version or issues.

``apply_operation(state, msg, custodian)`` never mutates ``state`` unless the operation
is accepted; then the state holds the new Composition version and its Provenance.
Deterministic given state + message (ids are uuid5 of case id, version and position).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from protocols.moped import codes
from protocols.moped.messages import CaseState, Issue, OpResult, Operate, VersionRecord
from protocols.moped.refs import CaseRefs, fill_server_refs, is_transfer, overwritten, resolve_client_refs
from protocols.moped.rules import CaseView, check, siegel

_NS = uuid.UUID("6f1c3f0e-5b7a-4d59-9a43-0d6f0c1b7e21")


def _new_id(case_id: str, vid: int, index: int) -> str:
    return str(uuid.uuid5(_NS, f"{case_id}/{vid}/{index}"))


def _workflow_concept(status: str) -> dict[str, Any]:
    return {
        "code": {"system": codes.USAGE_CONTEXT_CS, "code": "workflow"},
        "valueCodeableConcept": {"coding": [{"system": codes.WORKFLOW_CS, "code": status,
                                             "display": codes.WORKFLOW_DISPLAY.get(status, status)}]},
    }


def _section(code: str, title: str, refs: list[str], system: str = codes.SECTIONS_CS) -> dict[str, Any] | None:
    if not refs:
        return None
    return {"title": title, "code": {"coding": [{"system": system, "code": code}]},
            "entry": [{"reference": r} for r in refs]}


def build_composition(state: CaseState, vid: int, custodian: str) -> dict[str, Any]:
    """The Composition as of version ``vid`` (sections list what the case held then;
    the referenced resources are served in their current form)."""
    rec = state.versions[vid - 1]
    assert rec.vid == vid
    members: list[str] = []
    for v in state.versions[:vid]:
        members.extend(v.added)
    res = state.resources

    def refs(rtype: str, pred=lambda r: True) -> list[str]:
        return [k for k in members if k.startswith(rtype + "/") and pred(res.get(k, {}))]

    sections = [
        _section("KH", "Zuständiges KH", [state.hospital] if state.hospital else []),
        _section("SV", "Zuständige SV", [rec.insurer] if rec.insurer else []),
        _section("DIAG", "Conditions", refs("Condition")),
        _section("PROC", "Procedures", refs("Procedure")),
        _section(codes.TRANSFER_ENCOUNTER, "TransferEncounter", refs("Encounter", is_transfer),
                 codes.ENCOUNTER_TYPES_CS),
        _section("COV", "Coverage", refs("Coverage") + refs("RelatedPerson")),
        _section("LKFReq", "Claims", refs("Claim")),
        _section("LKFResp", "ClaimResponses", refs("ClaimResponse")),
        _section("OBS", "Observations", refs("Observation")),
        _section("QResp", "QuestionnaireResponses", refs("QuestionnaireResponse")),
    ]
    return {
        "resourceType": "Composition",
        "id": state.case_id,
        "meta": {"versionId": str(vid), "lastUpdated": rec.recorded},
        "status": "final" if rec.sealed else "preliminary",
        "type": {"coding": [{"system": codes.LOINC, "code": "102089-0",
                             "display": "FHIR resource patient medical record"}]},
        "subject": [{"reference": state.patient}],
        "encounter": {"reference": state.encounter},
        "date": rec.recorded,
        "useContext": [_workflow_concept(rec.workflow)],
        "author": [{"reference": state.hospital}],
        "custodian": {"reference": custodian},
        "title": "MOPED Fall",
        "section": [s for s in sections if s],
    }


def build_provenance(case_id: str, vid: int, op: str, at: str, device: str, org: str) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": f"{case_id}-{vid}",
        "target": [{"reference": f"Composition/{case_id}/_history/{vid}"}],
        "recorded": at,
        "activity": {"coding": [{"system": codes.OPERATIONS_CS, "code": op, "display": f"${op}"}]},
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "author"}]},
            "who": {"reference": device},
            "onBehalfOf": {"reference": org},
        }],
    }
    if vid > 1:
        prov["entity"] = [{"role": "revision", "what": {"reference": f"Composition/{case_id}/_history/{vid - 1}"}}]
    return prov


def apply_operation(state: CaseState, msg: Operate, case_id: str, custodian: str) -> tuple[CaseState | None, OpResult]:
    """→ (new state, result) when accepted; (None, result) when refused.

    ``custodian`` is unused here (kept for the signature); the Composition is built on read."""
    op = msg.op
    if op not in codes.ALL_OPS:
        return None, OpResult(code="invalid", vid=state.vid or None,
                              issues=[Issue(code="not-supported", rule="operation", message=f"unknown operation ${op}")])
    if op == "aufnehmen":
        if state.versions:
            return None, OpResult(code="exists", vid=state.vid,
                                  issues=[Issue(code="duplicate", rule="aufnehmen", message="case already exists")])
    else:
        if not state.versions:
            return None, OpResult(code="not-found", issues=[Issue(code="not-found", rule="case",
                                                                  expression="Composition.id",
                                                                  message=f"no case Composition/{case_id}")])
        if msg.vid is None:
            return None, OpResult(code="invalid", vid=state.vid, issues=[Issue(
                code="required", rule="version", expression="Composition.meta.versionId",
                message="instance operations need the version: Composition/{id}/_history/{vid}/$op")])
        if msg.vid != state.vid:
            return None, OpResult(code="conflict", vid=state.vid, issues=[Issue(
                code="conflict", rule="version", expression="Composition.meta.versionId",
                message=f"version {msg.vid} is not current (current: {state.vid}); read "
                        f"Composition/{case_id} and retry")])
    if op not in codes.ROLE_OPS.get(msg.caller.role, frozenset()):
        return None, OpResult(code="forbidden", vid=state.vid or None, issues=[Issue(
            code="forbidden", rule="role", message=f"a {msg.caller.role} system may not call ${op}")])
    sealed_issues = siegel(state.sealed, op)
    if sealed_issues:
        return None, OpResult(code="unprocessable", vid=state.vid, issues=sealed_issues)

    # copy-on-write: version records are never changed once written, resources are replaced
    new = state.model_copy()
    new.resources = dict(state.resources)
    new.versions = list(state.versions)
    new.milestones = list(state.milestones)
    new.case_id = case_id
    vid = state.vid + 1
    issues: list[Issue] = []
    notes: list[Issue] = []

    # 1. ids: existing case resources keep theirs, everything else gets a server id
    local: dict[str, str] = {}
    placed: list[tuple[int, str, dict]] = []
    for i, e in enumerate(msg.entries):
        res = copy.deepcopy(e.resource)
        rt = res["resourceType"]
        cid = res.get("id")
        if cid and f"{rt}/{cid}" in state.resources:
            ref = f"{rt}/{cid}"
        else:
            ref = f"{rt}/{_new_id(case_id, vid, i)}"
            if cid:
                local[f"{rt}/{cid}"] = ref
        if e.full_url:
            local[e.full_url] = ref
        res["id"] = ref.split("/", 1)[1]
        res["meta"] = {"versionId": str(vid), "lastUpdated": msg.at}
        placed.append((i, ref, res))

    # 2. the case context (admission: from the Bundle itself)
    if op == "aufnehmen":
        pats = [r for _, r, x in placed if x["resourceType"] == "Patient"]
        stays = [r for _, r, x in placed if x["resourceType"] == "Encounter" and not is_transfer(x)]
        new.patient = pats[0] if len(pats) == 1 else ""
        new.encounter = stays[0] if len(stays) == 1 else ""
        new.hospital = msg.caller.organization
    if op in ("antworten",) and msg.caller.role == "SV":
        new.insurer = msg.caller.organization
    refs = CaseRefs(new.patient, new.encounter, new.hospital, msg.caller.organization)

    # 3. server-side references overwrite, client-side ones are resolved / validated
    known = set(state.resources) | {r for _, r, _ in placed}
    for i, ref, res in placed:
        for el in overwritten(res, refs):
            notes.append(Issue(severity="information", code="informational", rule="reference.server-side",
                               expression=f"{res['resourceType']}.{el}",
                               message=f"Bundle.entry[{i}]: client value replaced by the server's reference"))
        fill_server_refs(res, refs)
        for iss in resolve_client_refs(res, "", local, known):
            iss.message = f"Bundle.entry[{i}]: {iss.message}"
            issues.append(iss)
        new.resources[ref] = res

    # 4. milestones before rules that need them, then the rules
    ms = set(new.milestones)
    if op == "entlassen":
        ms.add("discharged")
    view = CaseView(resources=new.resources, incoming=[r for _, r, _ in placed], encounter=new.encounter,
                    milestones=ms, aviso=msg.aviso)
    issues += check(op, view)
    if issues:
        return None, OpResult(code="unprocessable", vid=state.vid or None, issues=issues)

    # 5. workflow status
    if op == "aufnehmen":
        new.workflow = codes.WF_ADMITTED
    elif op == "anfragen":
        ms.add("anfrage")
    elif op == "antworten":
        new.workflow = codes.WF_SV_DONE
    elif op == "entlassen":
        new.workflow = codes.WF_DISCHARGE_AVISO if msg.aviso else codes.WF_DISCHARGED
        if msg.aviso:
            ms.discard("discharged")
    elif op == "abrechnen":
        ms.add("billed")
        new.workflow = codes.WF_REPORTED
    elif op == "entscheiden":
        outcome = next((x.get("outcome") for r, x in view.of_type("ClaimResponse", incoming=True)), None)
        if outcome == "complete":
            new.workflow = codes.WF_FINAL_RELEASE
            new.sealed = True
        elif outcome == "partial":
            new.workflow = codes.WF_PRELIM_RELEASE
        else:
            new.workflow = codes.WF_CORRECTION
            ms.discard("billed")
    new.milestones = sorted(ms)

    prov = build_provenance(case_id, vid, op, msg.at, msg.caller.device, msg.caller.organization)
    added = [r for _, r, _ in placed if r not in state.resources]
    new.versions.append(VersionRecord(vid=vid, activity=op, recorded=msg.at, workflow=new.workflow,
                                      sealed=new.sealed, insurer=new.insurer, added=added, provenance=prov))
    return new, OpResult(code="ok", vid=vid, workflow=new.workflow, issues=notes)
