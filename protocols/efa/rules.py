"""The EFA rules as pure functions: access (policy), merge, lifecycle, relationships.

Every refusal is an :class:`Refusal` whose ``code`` names the rule (the HTTP status is
derived from the code in :data:`HTTP_STATUS`).
"""

from __future__ import annotations

from typing import Iterable, Literal

from protocols.efa.model import Caller, Consent, DocumentIn, Relationship, RecordState

Right = Literal["read", "write", "manage"]

#: refusal code -> HTTP status (the API's contract; see protocols/efa/api.py)
HTTP_STATUS: dict[str, int] = {
    # tokens
    "malformed_token": 401, "untrusted_issuer": 401, "bad_signature": 401, "expired": 401,
    "not_yet_valid": 401, "revoked": 401, "missing_token": 401, "bad_credential": 401,
    # access
    "not_participant": 403, "record_not_open": 403, "no_access": 403,
    # merge refusals (seed: "Fusion mit einer bestehenden Fallakte")
    "already_participant": 409, "consent_not_extendable": 409, "merge_not_authorised": 409,
    # lookups
    "unknown_record": 404, "unknown_partition": 404, "unknown_document": 404,
    # input
    "relationship_target_missing": 422, "relationship_target_deprecated": 422,
    "relationship_source_unknown": 422, "invalid_consent": 422, "invalid_input": 422,
    "duplicate_local_id": 422, "document_too_large": 413, "submission_too_large": 413,
    "unavailable": 503,
}


class Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)


# --------------------------------------------------------------------------- policy

def is_participant(state: RecordState, caller: Caller) -> bool:
    ps = state.participants
    return caller.sub in ps or caller.org in ps


def is_manager(state: RecordState, caller: Caller) -> bool:
    """Record managers: participants who contributed a partition (they keep access in the
    grace period of a suspended record)."""
    return any(p.owner == caller.sub or p.owner_org == caller.org for p in state.partitions.values())


def rights(state: RecordState, caller: Caller) -> set[str]:
    """The policy provider's answer: the caller's rights on this record now."""
    if state.status == "open" and is_participant(state, caller):
        out = {"read", "write"}
        if is_manager(state, caller):
            out.add("manage")
        return out
    if state.status == "suspended" and is_participant(state, caller) and is_manager(state, caller):
        return {"read", "manage"}
    return set()


def require(state: RecordState, caller: Caller, right: str) -> None:
    if state.status in ("none",):
        raise Refusal("unknown_record", "no such case record")
    if right in rights(state, caller):
        return
    if not is_participant(state, caller):
        raise Refusal("not_participant", "caller is not a participant of this case record")
    raise Refusal("record_not_open", f"case record is {state.status}: {right} not allowed")


# --------------------------------------------------------------------------- consent / merge

def check_consent(consent: Consent, now: float) -> None:
    if consent.revoked:
        raise Refusal("invalid_consent", "a new record needs a consent that is not revoked")
    if consent.valid_until <= now:
        raise Refusal("invalid_consent", "consent validity lies in the past")


def merge_decision(state: RecordState, caller: Caller, new: Consent) -> str:
    """createECR against an existing open record: ``"merge"`` or a Refusal (in the seed's order)."""
    if is_participant(state, caller):
        raise Refusal("already_participant",
                      "caller is already a participant of the record for this patient and purpose: "
                      "add a partition or register a consent instead (not both at once)")
    if state.consent is None or not state.consent.may_extend:
        raise Refusal("consent_not_extendable",
                      "the consent of the existing record does not allow adding participants; "
                      "a participant must first register the patient's new consent")
    if not new.may_merge:
        raise Refusal("merge_not_authorised",
                      "the new consent does not authorise merging with the existing record")
    return "merge"


def union(a: Iterable[str], b: Iterable[str]) -> list[str]:
    out = list(a)
    seen = set(out)
    for x in b:
        if x not in seen:
            out.append(x)
            seen.add(x)
    return out


# --------------------------------------------------------------------------- lifecycle

NEXT_STATUS = {"open": "suspended", "suspended": "retired", "retired": "archived"}


def advance(status: str) -> str:
    """open -> suspended -> retired -> archived (archived stays)."""
    return NEXT_STATUS.get(status, status)


# --------------------------------------------------------------------------- documents

def check_submission(state: RecordState, docs: list[DocumentIn], rels: list[Relationship]) -> None:
    """Relationships must go from a document of this submission to an existing document
    of the record; replaced targets (RPLC, XFRM_RPLC) must still be approved."""
    local = set()
    for d in docs:
        if d.local_id in local:
            raise Refusal("duplicate_local_id", f"document local id {d.local_id!r} given twice")
        local.add(d.local_id)
    for r in rels:
        if r.source not in local:
            raise Refusal("relationship_source_unknown",
                          f"relationship {r.type} source {r.source!r} is not a document of this submission")
        target = state.documents.get(r.target)
        if target is None:
            raise Refusal("relationship_target_missing",
                          f"relationship {r.type} names document {r.target!r}, which does not exist in this record")
        if r.type in ("RPLC", "XFRM_RPLC") and target.status != "approved":
            raise Refusal("relationship_target_deprecated",
                          f"relationship {r.type}: document {r.target!r} was already replaced")


def partition_record(partition_id: str) -> str:
    """The record key a partition or document id belongs to (ids are ``<ecr>.p<n>`` / ``<ecr>.d<n>``)."""
    head, sep, tail = partition_id.rpartition(".")
    if not sep or not head or len(tail) < 2 or tail[0] not in "pd" or not tail[1:].isdigit():
        raise Refusal("invalid_input", f"{partition_id!r} is not an EFA partition or document id")
    return head
