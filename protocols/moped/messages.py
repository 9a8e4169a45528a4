"""Messages between the MOPED HTTP ingress and the Composition entity, and the case state."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["KH", "SV", "LGF"]
#: outcome classes; the ingress maps them to HTTP status codes
ResultCode = Literal["ok", "invalid", "unprocessable", "conflict", "not-found", "forbidden", "exists"]


class Caller(BaseModel):
    """The authenticated calling system (from its bearer token)."""

    device: str  # "Device/XDokV5"
    organization: str  # "Organization/KHK999"
    role: Role


class Issue(BaseModel):
    """One OperationOutcome issue: which rule, which element, what is wrong."""

    severity: Literal["fatal", "error", "warning", "information"] = "error"
    code: str = "business-rule"  # FHIR issue-type code
    rule: str = ""  # e.g. "MopedAbrechnungComposition.no-overlap"
    expression: str = ""  # FHIRPath of the element, e.g. "Encounter.actualPeriod.end"
    message: str = ""


class Entry(BaseModel):
    """One Bundle entry as sent by the client (already checked to be valid FHIR)."""

    full_url: str | None = None
    resource: dict[str, Any]


# -- requests -------------------------------------------------------------------------


class Operate(BaseModel):
    """Run an operation on a case. ``vid`` None only for ``aufnehmen``."""

    op: str
    vid: int | None = None
    entries: list[Entry] = Field(default_factory=list)
    caller: Caller
    at: str  # ISO timestamp of reception (the ingress's clock; keeps the handler deterministic)
    aviso: bool = False  # $entlassen: discharge notice only (no main diagnosis needed yet)


class ReadComposition(BaseModel):
    vid: int | None = None


class ReadHistory(BaseModel):
    pass


class ReadProvenance(BaseModel):
    vid: int | None = None


class ReadDocument(BaseModel):
    pass


# -- replies --------------------------------------------------------------------------


class OpResult(BaseModel):
    code: ResultCode
    vid: int | None = None  # the new (ok) or current (conflict) version
    issues: list[Issue] = Field(default_factory=list)
    workflow: str | None = None


class ReadResult(BaseModel):
    found: bool
    current_vid: int = 0
    items: list[dict[str, Any]] = Field(default_factory=list)  # newest first for history


# -- state ----------------------------------------------------------------------------


class VersionRecord(BaseModel):
    """One Composition version: what changed (the Composition itself is rebuilt from the
    records up to it, so a version costs O(its change), not O(case size))."""

    vid: int
    activity: str
    recorded: str
    workflow: str
    sealed: bool = False
    insurer: str = ""
    added: list[str] = Field(default_factory=list)  # resources that entered the case in this version
    provenance: dict[str, Any]


class CaseState(BaseModel):
    """One inpatient stay. Holds personal data: stored encrypted."""

    case_id: str = ""
    resources: dict[str, dict[str, Any]] = Field(default_factory=dict)  # "Type/id" -> resource
    versions: list[VersionRecord] = Field(default_factory=list)
    workflow: str = ""
    sealed: bool = False
    milestones: list[str] = Field(default_factory=list)  # "anfrage", "billed", ...
    patient: str = ""  # "Patient/<id>"
    encounter: str = ""  # "Encounter/<id>" (the stay)
    hospital: str = ""  # "Organization/..." of the admitting KH
    insurer: str = ""  # "Organization/..." of the SV that answered

    @property
    def vid(self) -> int:
        return self.versions[-1].vid if self.versions else 0
