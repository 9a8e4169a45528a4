"""Specialised composition rules (pure): each returns OperationOutcome issues naming the
rule and the element. The master rules always hold; each operation adds its own.

Rules see a ``CaseView``: the case's resources as they would be after the operation,
which of them came with this Bundle, and the case's milestones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from protocols.moped import codes
from protocols.moped.messages import Issue
from protocols.moped.refs import is_transfer


@dataclass
class CaseView:
    resources: dict[str, dict[str, Any]]  # "Type/id" -> resource (after the operation)
    incoming: list[str]  # refs of resources that came with this Bundle
    encounter: str = ""  # the stay
    milestones: set[str] = field(default_factory=set)
    aviso: bool = False

    def of_type(self, rtype: str, *, incoming: bool = False) -> list[tuple[str, dict]]:
        refs = self.incoming if incoming else self.resources.keys()
        return [(r, self.resources[r]) for r in refs if r.startswith(rtype + "/")]

    def stay(self) -> dict[str, Any] | None:
        return self.resources.get(self.encounter)

    def transfers(self) -> list[tuple[str, dict]]:
        return [(r, e) for r, e in self.of_type("Encounter") if is_transfer(e)]


def _issue(rule: str, expression: str, message: str, code: str = "business-rule") -> Issue:
    return Issue(rule=rule, expression=expression, message=message, code=code)


def parse_when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        v = value.replace("Z", "+00:00")
        if len(v) == 4:
            v += "-01-01"
        elif len(v) == 7:
            v += "-01"
        d = datetime.fromisoformat(v)
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _period(res: dict) -> dict:
    return res.get("actualPeriod") or {}


def is_main_diagnosis(cond: dict) -> bool:
    for ext in cond.get("extension") or []:
        if ext.get("url") == codes.DIAGNOSETYP_URL:
            if ext.get("valueCode") == codes.MAIN_DIAGNOSIS:
                return True
            if (ext.get("valueCoding") or {}).get("code") == codes.MAIN_DIAGNOSIS:
                return True
    return False


# -- master ---------------------------------------------------------------------------


def master(v: CaseView) -> list[Issue]:
    out = []
    patients = v.of_type("Patient")
    if len(patients) != 1:
        out.append(_issue("MopedMasterComposition.subject", "Composition.subject",
                          f"a case has exactly one Patient (found {len(patients)})", "invariant"))
    stays = [r for r, e in v.of_type("Encounter") if not is_transfer(e)]
    if len(stays) != 1:
        out.append(_issue("MopedMasterComposition.encounter", "Composition.encounter",
                          f"a case has exactly one stay Encounter (found {len(stays)}; transfers carry type "
                          f"{codes.TRANSFER_ENCOUNTER})", "invariant"))
    stay = v.stay()
    if stay is not None:
        p = _period(stay)
        start, end = parse_when(p.get("start")), parse_when(p.get("end"))
        if start is None:
            out.append(_issue("MopedMasterComposition.admission-date", "Encounter.actualPeriod.start",
                              "the stay needs its admission date", "required"))
        elif end is not None and end < start:
            out.append(_issue("MopedMasterComposition.period", "Encounter.actualPeriod.end",
                              "discharge before admission", "invariant"))
    for r, e in v.transfers():
        p = _period(e)
        s, en = parse_when(p.get("start")), parse_when(p.get("end"))
        if s is not None and en is not None and en < s:
            out.append(_issue("MopedMasterComposition.period", "Encounter.actualPeriod.end",
                              f"transfer {r} ends before it starts", "invariant"))
    return out


# -- specialisations ------------------------------------------------------------------


def aufnahme(v: CaseView) -> list[Issue]:
    out = []
    if not v.of_type("Patient", incoming=True):
        out.append(_issue("MopedAufnahmeComposition.patient", "Bundle.entry:Patient", "admission needs the Patient",
                          "required"))
    if not [r for r, e in v.of_type("Encounter", incoming=True) if not is_transfer(e)]:
        out.append(_issue("MopedAufnahmeComposition.encounter", "Bundle.entry:Aufenthalt",
                          "admission needs the stay Encounter", "required"))
    if not v.of_type("Condition", incoming=True):
        out.append(_issue("MopedAufnahmeComposition.diagnosis", "Bundle.entry:Diagnosen",
                          "admission needs at least one admission diagnosis (Condition)", "required"))
    if not [r for r, e in v.of_type("Encounter", incoming=True) if is_transfer(e)]:
        out.append(_issue("MopedAufnahmeComposition.transfer", "Bundle.entry:Verlegungen",
                          "admission needs at least one transfer Encounter (the first department)", "required"))
    return out


def anfrage(v: CaseView) -> list[Issue]:
    out = []
    insured = [r for r, c in v.of_type("Coverage") if c.get("insurer")]
    if not insured:
        out.append(_issue("MopedAnfrageComposition.insurer", "Coverage.insurer",
                          "an insurance inquiry needs a Coverage naming the insurer", "required"))
    if not v.of_type("Claim", incoming=True):
        out.append(_issue("MopedAnfrageComposition.claim", "Bundle.entry:Claim",
                          "an insurance inquiry carries the request (Claim)", "required"))
    return out


def _claimresponses_point_to_claims(v: CaseView, rule: str) -> list[Issue]:
    out = []
    for r, cr in v.of_type("ClaimResponse", incoming=True):
        req = (cr.get("request") or {}).get("reference")
        if not req or not req.startswith("Claim/") or req not in v.resources:
            out.append(_issue(rule, "ClaimResponse.request",
                              f"{r}: the answer must reference the Claim of this case it answers", "required"))
    return out


def antwort(v: CaseView) -> list[Issue]:
    out = []
    if "anfrage" not in v.milestones:
        out.append(_issue("MopedAntwortComposition.anfrage", "Composition.useContext",
                          "there is no insurance inquiry ($anfragen) to answer", "business-rule"))
    if not v.of_type("ClaimResponse", incoming=True):
        out.append(_issue("MopedAntwortComposition.response", "Bundle.entry:ClaimResponse",
                          "an answer carries a ClaimResponse", "required"))
    out += _claimresponses_point_to_claims(v, "MopedAntwortComposition.request")
    return out


def entlassung_aviso(v: CaseView) -> list[Issue]:
    stay = v.stay() or {}
    if parse_when(_period(stay).get("end")) is None:
        return [_issue("MopedEntlassungsAvisoComposition.discharge-date", "Encounter.actualPeriod.end",
                       "discharge needs the discharge date", "required")]
    return []


def entlassung_vollstaendig(v: CaseView) -> list[Issue]:
    out = [
        Issue(**(i.model_dump() | {"rule": i.rule.replace("EntlassungsAviso", "EntlassungVollstaendig")}))
        for i in entlassung_aviso(v)
    ]
    if not [r for r, c in v.of_type("Condition") if is_main_diagnosis(c)]:
        out.append(_issue("MopedEntlassungVollstaendigComposition.main-diagnosis", "Condition.extension:Diagnosetyp",
                          f"complete discharge needs a main diagnosis (Condition with Diagnosetyp "
                          f"{codes.MAIN_DIAGNOSIS})", "required"))
    return out


def abrechnung(v: CaseView) -> list[Issue]:
    out = []
    if parse_when(_period(v.stay() or {}).get("end")) is None or "discharged" not in v.milestones:
        out.append(_issue("MopedAbrechnungComposition.discharged", "Encounter.actualPeriod.end",
                          "billing needs the patient discharged ($entlassen)", "business-rule"))
    if not v.of_type("Condition"):
        out.append(_issue("MopedAbrechnungComposition.diagnoses", "Composition.section:DIAG",
                          "billing needs the diagnoses recorded", "required"))
    if not v.of_type("Procedure"):
        out.append(_issue("MopedAbrechnungComposition.procedures", "Composition.section:PROC",
                          "billing needs the procedures (Leistungen) recorded", "required"))
    transfers = v.transfers()
    if not transfers:
        out.append(_issue("MopedAbrechnungComposition.department", "Composition.section:TENC",
                          "the patient must have visited at least one department", "required"))
    spans = []
    for r, e in transfers:
        p = _period(e)
        s = parse_when(p.get("start"))
        if s is None:
            out.append(_issue("MopedAbrechnungComposition.transfer-period", "Encounter.actualPeriod.start",
                              f"{r}: a department stay needs its start", "required"))
            continue
        spans.append((s, parse_when(p.get("end")), r))
    spans.sort(key=lambda t: t[0])
    for (s1, e1, r1), (s2, _e2, r2) in zip(spans, spans[1:]):
        if e1 is None or s2 < e1:
            out.append(_issue("MopedAbrechnungComposition.no-overlap", "Encounter.actualPeriod",
                              f"{r1} and {r2} overlap: a patient is never in two departments at once",
                              "business-rule"))
    claims = v.of_type("Claim", incoming=True)
    if not claims:
        out.append(_issue("MopedAbrechnungComposition.claim", "Bundle.entry:Claim",
                          "billing carries the LKF request (Claim)", "required"))
    for r, c in claims:
        for i, p in enumerate(c.get("procedure") or []):
            ref = (p.get("procedureReference") or {}).get("reference")
            if ref is not None and not ref.startswith("Procedure/"):
                out.append(_issue("MopedAbrechnungComposition.procedure-reference",
                                  f"Claim.procedure[{i}].procedureReference",
                                  f"{r}: must reference a Procedure, not {ref!r}", "invalid"))
        for i, d in enumerate(c.get("diagnosis") or []):
            ref = (d.get("diagnosisReference") or {}).get("reference")
            if ref is not None and not ref.startswith("Condition/"):
                out.append(_issue("MopedAbrechnungComposition.diagnosis-reference",
                                  f"Claim.diagnosis[{i}].diagnosisReference",
                                  f"{r}: must reference a Condition, not {ref!r}", "invalid"))
    return out


def entscheiden(v: CaseView) -> list[Issue]:
    out = []
    if "billed" not in v.milestones:
        out.append(_issue("MopedEntscheidenComposition.billed", "Composition.useContext",
                          "a decision needs a billed case ($abrechnen)", "business-rule"))
    responses = v.of_type("ClaimResponse", incoming=True)
    if not responses:
        out.append(_issue("MopedEntscheidenComposition.response", "Bundle.entry:ClaimResponse",
                          "a decision carries the LKF response (ClaimResponse)", "required"))
    out += _claimresponses_point_to_claims(v, "MopedEntscheidenComposition.request")
    return out


def melden(v: CaseView) -> list[Issue]:
    if "billed" not in v.milestones:
        return [_issue("MopedMeldenComposition.billed", "Composition.useContext",
                       "cost information needs a billed case ($abrechnen)", "business-rule")]
    return []


def siegel(sealed: bool, op: str) -> list[Issue]:
    """A sealed case (Composition.status final) takes no more changes but reports."""
    if sealed and op != "melden":
        return [_issue("MopedSiegelComposition.final", "Composition.status",
                       f"the case is sealed (status final); ${op} is not allowed any more", "business-rule")]
    return []


def _entlassen(v: CaseView) -> list[Issue]:
    return entlassung_aviso(v) if v.aviso else entlassung_vollstaendig(v)


#: operation -> the specialised rules it must satisfy on top of the master
OPERATION_RULES: dict[str, list[Callable[[CaseView], list[Issue]]]] = {
    "aufnehmen": [aufnahme],
    "update": [],
    "anfragen": [anfrage],
    "antworten": [antwort],
    "entlassen": [_entlassen],
    "abrechnen": [entlassung_vollstaendig, abrechnung],
    "entscheiden": [entscheiden],
    "melden": [melden],
}


def check(op: str, v: CaseView) -> list[Issue]:
    issues = master(v)
    for rule in OPERATION_RULES[op]:
        issues += rule(v)
    return issues
