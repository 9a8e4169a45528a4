"""Server-side and client-side references (pure).

*Server-side*: what the case or the caller's authentication already knows (patient,
stay encounter, hospital, answering organisation) is written by the server; whatever
the client put there — a value or a DataAbsentReason ``unsupported`` — is overwritten.
*Client-side*: references only the client can know (``Claim.procedure.procedureReference``,
a transfer's ``serviceProvider`` by ``Organization.identifier``) are resolved against the
Bundle and the case, or validated as logical references; never invented.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from protocols.moped import codes
from protocols.moped.messages import Issue


class CaseRefs(NamedTuple):
    patient: str
    encounter: str
    hospital: str
    caller_org: str


PLACEHOLDERS = CaseRefs("Patient/pending", "Encounter/pending", "Organization/pending", "Organization/pending")

#: (resource type) -> [(element, role, is_list)]; role names a CaseRefs field
_SERVER: dict[str, list[tuple[str, str, bool]]] = {
    "Patient": [("managingOrganization", "hospital", False)],
    "Condition": [("subject", "patient", False), ("encounter", "encounter", False)],
    "Procedure": [("subject", "patient", False), ("encounter", "encounter", False)],
    "Observation": [("subject", "patient", False), ("encounter", "encounter", False)],
    "QuestionnaireResponse": [("subject", "patient", False), ("encounter", "encounter", False)],
    "Coverage": [("beneficiary", "patient", False)],
    "RelatedPerson": [("patient", "patient", False)],
    "Claim": [("patient", "patient", False), ("provider", "hospital", False), ("encounter", "encounter", True)],
    "ClaimResponse": [("patient", "patient", False), ("requestor", "hospital", False),
                      ("insurer", "caller_org", False)],
}
_ENCOUNTER_STAY = [("subject", "patient", False), ("serviceProvider", "hospital", False)]
_ENCOUNTER_TRANSFER = [("subject", "patient", False), ("partOf", "encounter", False)]


def is_transfer(resource: dict[str, Any]) -> bool:
    """A transfer (department) encounter carries type code TENC."""
    types = resource.get("type")
    for cc in types if isinstance(types, list) else []:  # a client's body may have any shape
        codings = cc.get("coding") if isinstance(cc, dict) else None
        for c in codings if isinstance(codings, list) else []:
            if isinstance(c, dict) and c.get("code") == codes.TRANSFER_ENCOUNTER:
                return True
    return False


def server_fields(resource: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rt = resource.get("resourceType")
    if rt == "Encounter":
        return _ENCOUNTER_TRANSFER if is_transfer(resource) else _ENCOUNTER_STAY
    return _SERVER.get(str(rt), [])


def fill_server_refs(resource: dict[str, Any], refs: CaseRefs, *, is_transfer: bool | None = None) -> dict[str, Any]:
    """Overwrite the server-side reference elements in place; returns the resource."""
    for element, role, as_list in server_fields(resource):
        value = getattr(refs, role)
        if not value:
            resource.pop(element, None)
            continue
        ref = {"reference": value}
        resource[element] = [ref] if as_list else ref
    return resource


def overwritten(resource: dict[str, Any], refs: CaseRefs) -> list[str]:
    """Server-side elements where the client sent a value other than the server's."""
    out = []
    for element, role, as_list in server_fields(resource):
        sent = resource.get(element)
        if sent is None:
            continue
        items = sent if isinstance(sent, list) else [sent]
        for it in items:
            if not isinstance(it, dict):
                out.append(element)
                break
            if it.get("reference") and it.get("reference") != getattr(refs, role):
                out.append(element)
                break
    return out


_REF_KEYS = {"reference", "type", "identifier", "display", "extension", "id"}


def _is_reference(node: dict) -> bool:
    if not node.keys() <= _REF_KEYS:
        return False
    return isinstance(node.get("reference"), str) or isinstance(node.get("identifier"), dict)


def _walk_refs(node: Any, path: str, skip: set[str], out: list[tuple[str, dict]]) -> None:
    if isinstance(node, dict):
        if _is_reference(node):
            out.append((path, node))
            return
        for k, v in node.items():
            if k in ("resourceType", "text", "contained"):
                continue
            p = f"{path}.{k}"
            if p in skip:
                continue
            _walk_refs(v, p, skip, out)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk_refs(v, f"{path}[{i}]", skip, out)


def resolve_client_refs(resource: dict[str, Any], where: str, local: dict[str, str], known: set[str]) -> list[Issue]:
    """Rewrite Bundle-local references (``urn:uuid:...``, client ids) to server ids and
    check that every other literal reference names a resource of the case; logical
    references (identifier only) must carry system and value. Returns issues."""
    rt = resource.get("resourceType")
    skip = {f"{rt}.{el}" for el, _, _ in server_fields(resource)}
    found: list[tuple[str, dict]] = []
    _walk_refs(resource, str(rt), skip, found)
    issues = []
    for path, node in found:
        ref = node.get("reference")
        expr = path.replace(str(rt), where, 1) if where else path
        if isinstance(ref, str):
            if ref in local:
                node["reference"] = local[ref]
            elif ref in known or ref.startswith("#"):
                pass
            else:
                issues.append(Issue(code="not-found", rule="reference.client-side", expression=expr,
                                    message=f"reference {ref!r} names neither a resource of this Bundle nor of the case"))
        else:
            ident = node.get("identifier") or {}
            if not (isinstance(ident, dict) and ident.get("system") and ident.get("value")):
                issues.append(Issue(code="required", rule="reference.logical", expression=f"{expr}.identifier",
                                    message="a logical reference needs identifier.system and identifier.value"))
    return issues
