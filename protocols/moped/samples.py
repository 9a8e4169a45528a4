"""Synthetic MOPED request bodies for tests, the demo and the bench (our own test data;
nothing here is copied from the IG). ``params(op, resources...)`` wraps entries into the
``Parameters`` body an operation takes."""

from __future__ import annotations

import uuid
from typing import Any

from protocols.moped import codes

ICD10 = "http://fhir.at/CodeSystem/icd-10-bmsgpk-2025"
LKF_PROC = "https://elga.moped.at/CodeSystem/LKFLeistungskatalogCS"
DEPT_ID = "https://elga.moped.at/NamingSystem/funktionscode"


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def params(op: str, *entries: tuple[str | None, dict[str, Any]], aviso: bool = False) -> dict[str, Any]:
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [({"fullUrl": u} if u else {}) | {"resource": r} for u, r in entries]}
    p: list[dict[str, Any]] = [{"name": codes.PARAM_NAME[op], "resource": bundle}]
    if aviso:
        p.append({"name": "aviso", "valueBoolean": True})
    return {"resourceType": "Parameters", "parameter": p}


def patient(name: str = "Muster", given: str = "Erika") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": name, "given": [given]}], "gender": "female",
            "birthDate": "1970-03-01"}


def stay(start: str = "2026-01-10T08:00:00+01:00", end: str | None = None) -> dict[str, Any]:
    period = {"start": start} | ({"end": end} if end else {})
    return {"resourceType": "Encounter", "status": "in-progress" if not end else "completed",
            "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}]}],
            "actualPeriod": period}


def transfer(dept: str, start: str, end: str | None = None) -> dict[str, Any]:
    period = {"start": start} | ({"end": end} if end else {})
    return {"resourceType": "Encounter", "status": "completed" if end else "in-progress",
            "type": [{"coding": [{"system": codes.ENCOUNTER_TYPES_CS, "code": codes.TRANSFER_ENCOUNTER}]}],
            "actualPeriod": period,
            "serviceProvider": {"identifier": {"system": DEPT_ID, "value": dept}}}


def condition(icd: str = "I21.0", main: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {"resourceType": "Condition",
                         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                        "code": "active"}]},
                         "code": {"coding": [{"system": ICD10, "code": icd}]}}
    if main:
        c["extension"] = [{"url": codes.DIAGNOSETYP_URL, "valueCoding": {"code": codes.MAIN_DIAGNOSIS}}]
    # subject is server-side: the client says so explicitly
    c["subject"] = {"extension": [{"url": codes.DATA_ABSENT_URL, "valueCode": "unsupported"}]}
    return c


def procedure(code: str = "AA010", when: str = "2026-01-11") -> dict[str, Any]:
    return {"resourceType": "Procedure", "status": "completed",
            "code": {"coding": [{"system": LKF_PROC, "code": code}]}, "occurrenceDateTime": when}


def coverage(insurer: str = "SV11") -> dict[str, Any]:
    return {"resourceType": "Coverage", "status": "active", "kind": "insurance",
            "insurer": {"identifier": {"system": "urn:oid:1.2.40.0.10.1.4.3.2", "value": insurer}}}


def claim(use: str = "preauthorization", procedures: list[str] = (), diagnoses: list[str] = ()) -> dict[str, Any]:
    c: dict[str, Any] = {"resourceType": "Claim", "status": "active",
                         "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                                              "code": "institutional"}]},
                         "use": use, "created": "2026-01-12"}
    if procedures:
        c["procedure"] = [{"sequence": i + 1, "procedureReference": {"reference": r}}
                          for i, r in enumerate(procedures)]
    if diagnoses:
        c["diagnosis"] = [{"sequence": i + 1, "diagnosisReference": {"reference": r}}
                          for i, r in enumerate(diagnoses)]
    return c


def claim_response(request: str, outcome: str = "complete", use: str = "claim") -> dict[str, Any]:
    return {"resourceType": "ClaimResponse", "status": "active",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                                 "code": "institutional"}]},
            "use": use, "created": "2026-01-20", "outcome": outcome, "request": {"reference": request}}


def admission() -> dict[str, Any]:
    """A valid $aufnehmen body: Patient, stay, admission diagnosis, first department."""
    return params("aufnehmen", (urn(), patient()), (urn(), stay()), (urn(), condition("I21.0")),
                  (urn(), transfer("KAK999ABT1", "2026-01-10T08:00:00+01:00")))
