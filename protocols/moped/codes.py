"""MOPED code constants: operations, workflow status, sections, our own extension URLs.

Codes follow the IG HL7Austria/ELGA-MOPED-R5 where it defines them (workflow status,
composition sections); where the IG is still open (main-diagnosis marker) we define our
own URL under ``AUTOMAT_BASE`` and say so.
"""

from __future__ import annotations

MOPED_CS = "https://elga.moped.at/CodeSystem"
WORKFLOW_CS = f"{MOPED_CS}/WorkflowStatusCS"
SECTIONS_CS = f"{MOPED_CS}/CompositionSectionsCS"
ENCOUNTER_TYPES_CS = f"{MOPED_CS}/MopedEncounterTypesCS"
AUTOMAT_BASE = "https://automat.example/fhir"
OPERATIONS_CS = f"{AUTOMAT_BASE}/CodeSystem/moped-operations"
#: Condition extension marking the LKF diagnosis type; valueCoding.code "HD" = main diagnosis
DIAGNOSETYP_URL = f"{AUTOMAT_BASE}/StructureDefinition/moped-diagnosetyp"
MAIN_DIAGNOSIS = "HD"
TRANSFER_ENCOUNTER = "TENC"
DATA_ABSENT_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
USAGE_CONTEXT_CS = "http://terminology.hl7.org/CodeSystem/usage-context-type"
LOINC = "http://loinc.org"

#: instance operations (POST Composition/{id}/_history/{vid}/$op)
INSTANCE_OPS = ("update", "anfragen", "antworten", "entlassen", "abrechnen", "entscheiden", "melden")
ALL_OPS = ("aufnehmen",) + INSTANCE_OPS

#: name of the Bundle parameter in the Parameters body, per operation
PARAM_NAME = {
    "aufnehmen": "Aufnahme",
    "update": "Update",
    "anfragen": "Anfrage",
    "antworten": "Antwort",
    "entlassen": "Entlassung",
    "abrechnen": "Abrechnung",
    "entscheiden": "Entscheidung",
    "melden": "Meldung",
}

#: resource types a client may send in each operation's Bundle
ALLOWED_TYPES: dict[str, frozenset[str]] = {
    "aufnehmen": frozenset({"Patient", "Encounter", "Condition", "Procedure", "Coverage", "RelatedPerson",
                            "Observation", "QuestionnaireResponse"}),
    "update": frozenset({"Patient", "Encounter", "Condition", "Procedure", "Coverage", "RelatedPerson",
                         "Observation", "QuestionnaireResponse"}),
    "anfragen": frozenset({"Claim", "Coverage", "RelatedPerson"}),
    "antworten": frozenset({"ClaimResponse", "Coverage"}),
    "entlassen": frozenset({"Encounter", "Condition", "Procedure", "Observation", "QuestionnaireResponse"}),
    "abrechnen": frozenset({"Claim", "Encounter", "Condition", "Procedure", "Observation", "QuestionnaireResponse"}),
    "entscheiden": frozenset({"ClaimResponse"}),
    "melden": frozenset({"Claim", "ClaimResponse"}),
}

#: which caller role may run which operation (KH hospital, SV insurer, LGF state fund)
ROLE_OPS: dict[str, frozenset[str]] = {
    "KH": frozenset({"aufnehmen", "update", "anfragen", "entlassen", "abrechnen", "melden"}),
    "SV": frozenset({"update", "antworten", "melden"}),
    "LGF": frozenset({"entscheiden", "melden"}),
}

# workflow status codes (IG WorkflowStatusCS)
WF_ADMITTED = "Aufnahme-freigegeben"
WF_SV_DONE = "SV-verarbeitet"
WF_DISCHARGE_AVISO = "Entlassungs-Aviso"
WF_DISCHARGED = "Entlassung-vollständig"
WF_REPORTED = "Endgueltige-Meldung"
WF_CORRECTION = "LGF-Korrekturaufforderung"
WF_PRELIM_RELEASE = "Vorlaeufige-Freigabe"
WF_FINAL_RELEASE = "Endgueltige-Freigabe"
WORKFLOW_DISPLAY = {
    WF_ADMITTED: "Aufnahme freigegeben",
    WF_SV_DONE: "SV verarbeitet",
    WF_DISCHARGE_AVISO: "Entlassungs Aviso",
    WF_DISCHARGED: "Entlassung vollständig",
    WF_REPORTED: "Endgültige Meldung",
    WF_CORRECTION: "LGF Korrekturaufforderung",
    WF_PRELIM_RELEASE: "Vorläufige Freigabe",
    WF_FINAL_RELEASE: "Endgültige Freigabe",
}
