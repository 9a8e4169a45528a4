"""FHIR R5 wire handling (pure): OperationOutcome, operation bodies, resource validation.

fhir.resources 8.x: its top-level package is FHIR R5 (``fhir.resources.__fhir_version__``).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from protocols.moped import codes
from protocols.moped.messages import Entry, Issue
from protocols.moped.refs import PLACEHOLDERS, fill_server_refs


class MopedError(Exception):
    """A request refused before it reached a case: HTTP status + issues."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__("; ".join(f"{i.expression}: {i.message}" for i in issues))
        self.status = status
        self.issues = issues


_HTTP = {"ok": 200, "invalid": 400, "unprocessable": 422, "not-found": 404, "forbidden": 403, "exists": 409}


def http_status(result_code: str, conflict_status: int = 409) -> int:
    """HTTP status of an operation result; a stale version answers ``conflict_status``
    (409 as HAPI FHIR does, or 412 as FHIR prescribes for a stale If-Match)."""
    return conflict_status if result_code == "conflict" else _HTTP[result_code]


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    out = []
    for i in issues:
        d: dict[str, Any] = {"severity": i.severity, "code": i.code}
        text = f"[{i.rule}] {i.message}" if i.rule else i.message
        d["details"] = {"text": text}
        if i.rule:
            d["details"]["coding"] = [{"system": f"{codes.AUTOMAT_BASE}/CodeSystem/moped-rules", "code": i.rule}]
        if i.expression:
            d["expression"] = [i.expression]
        d["diagnostics"] = text
        out.append(d)
    if not out:
        out = [{"severity": "information", "code": "informational", "diagnostics": "ok"}]
    return {"resourceType": "OperationOutcome", "issue": out}


def _model(resource_type: str):
    from fhir.resources import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _loc_expr(prefix: str, loc: tuple) -> str:
    parts = [prefix]
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]"
        elif p != "__root__":
            parts.append(str(p))
    return ".".join(parts)


def validation_issues(err: ValidationError, prefix: str) -> list[Issue]:
    issues = []
    for e in err.errors()[:20]:
        issues.append(Issue(code="structure", rule="fhir-r5", expression=_loc_expr(prefix, e.get("loc", ())),
                            message=str(e.get("msg", "invalid"))[:300]))
    return issues


_ACTIVE = frozenset({"active", "cancelled", "draft", "entered-in-error"})
_USE = frozenset({"claim", "preauthorization", "predetermination"})
#: required bindings of top-level codes (fhir.resources checks the code's form, not its value set)
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Bundle", "type"): frozenset({"document", "message", "transaction", "transaction-response", "batch",
                                   "batch-response", "history", "searchset", "collection",
                                   "subscription-notification"}),
    ("Encounter", "status"): frozenset({"planned", "in-progress", "on-hold", "discharged", "completed", "cancelled",
                                        "discontinued", "entered-in-error", "unknown"}),
    ("Procedure", "status"): frozenset({"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
                                        "entered-in-error", "unknown"}),
    ("Observation", "status"): frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                          "entered-in-error", "unknown", "cannot-be-obtained"}),
    ("QuestionnaireResponse", "status"): frozenset({"in-progress", "completed", "amended", "entered-in-error",
                                                    "stopped"}),
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Coverage", "status"): _ACTIVE,
    ("Coverage", "kind"): frozenset({"insurance", "self-pay", "other"}),
    ("Claim", "status"): _ACTIVE,
    ("Claim", "use"): _USE,
    ("ClaimResponse", "status"): _ACTIVE,
    ("ClaimResponse", "use"): _USE,
    ("ClaimResponse", "outcome"): frozenset({"queued", "complete", "error", "partial"}),
}


def _binding_issues(resource: dict[str, Any], where: str) -> list[Issue]:
    rt = resource.get("resourceType")
    out = []
    for (t, el), allowed in REQUIRED_CODES.items():
        if t == rt and el in resource and resource[el] not in allowed:
            out.append(Issue(code="code-invalid", rule="fhir-r5.binding", expression=f"{where}.{el}",
                             message=f"{resource[el]!r} is not in the required value set ({', '.join(sorted(allowed))})"))
    return out


def validate_resource(resource: dict[str, Any], where: str) -> list[Issue]:
    """fhir.resources validation of one resource (R5). Returns issues (empty = valid)."""
    rtype = resource.get("resourceType")
    try:
        model = _model(str(rtype))
    except ValueError:
        return [Issue(code="structure", rule="fhir-r5", expression=where,
                      message=f"unknown resource type {rtype!r}")]
    try:
        model.model_validate(resource)
    except ValidationError as e:
        return validation_issues(e, where)
    except (TypeError, ValueError) as e:  # fhir.resources raises these for some shapes
        return [Issue(code="structure", rule="fhir-r5", expression=where, message=str(e)[:300])]
    return _binding_issues(resource, where)


def parse_operation_body(raw: bytes, op: str) -> tuple[list[Entry], bool]:
    """A ``Parameters`` (or a bare ``Bundle``) → its Bundle's entries and the aviso flag.

    Raises ``MopedError`` 400 for anything that is not valid FHIR R5 and 422 for resource
    types the operation does not take. Server-side references are validated with
    placeholders (the case fills the real values).
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MopedError(400, [Issue(code="structure", rule="json", message=f"body is not JSON: {e}"[:300])])
    if not isinstance(body, dict):
        raise MopedError(400, [Issue(code="structure", rule="json", message="body must be a JSON object")])
    rtype = body.get("resourceType")
    aviso = False
    if rtype == "Parameters":
        params = body.get("parameter")
        if not isinstance(params, list):
            raise MopedError(400, [Issue(code="required", rule="operation-parameters", expression="Parameters.parameter",
                                         message=f"${op} takes one Bundle parameter {codes.PARAM_NAME[op]!r}")])
        bundle = None
        shell = dict(body, parameter=[])
        for i, p in enumerate(params):
            if not isinstance(p, dict):
                raise MopedError(400, [Issue(code="structure", rule="fhir-r5", expression=f"Parameters.parameter[{i}]",
                                             message="parameter must be an object")])
            if isinstance(p.get("resource"), dict):
                if bundle is not None:
                    raise MopedError(400, [Issue(code="structure", rule="operation-parameters",
                                                 expression=f"Parameters.parameter[{i}]",
                                                 message=f"${op} takes exactly one Bundle parameter")])
                bundle = p["resource"]
                if p.get("name") not in (codes.PARAM_NAME[op], None):
                    pass  # tolerated: the single resource parameter is the bundle
                shell["parameter"].append({k: v for k, v in p.items() if k != "resource"} | {"valueString": "-"})
            else:
                if p.get("name") == "aviso":
                    aviso = bool(p.get("valueBoolean"))
                shell["parameter"].append(p)
        issues = validate_resource(shell, "Parameters")
        if issues:
            raise MopedError(400, issues)
        if bundle is None:
            raise MopedError(400, [Issue(code="required", rule="operation-parameters", expression="Parameters.parameter",
                                         message=f"${op} needs the Bundle parameter {codes.PARAM_NAME[op]!r}")])
    elif rtype == "Bundle":
        bundle = body
    else:
        raise MopedError(400, [Issue(code="structure", rule="operation-parameters", expression="resourceType",
                                     message=f"expected a Parameters (or Bundle) resource, got {rtype!r}")])
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise MopedError(400, [Issue(code="structure", rule="operation-parameters",
                                     expression="Parameters.parameter.resource",
                                     message="the operation parameter must be a Bundle")])
    return parse_bundle(bundle, op), aviso


def parse_bundle(bundle: dict[str, Any], op: str) -> list[Entry]:
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise MopedError(400, [Issue(code="structure", rule="fhir-r5", expression="Bundle.entry", message="must be a list")])
    shell = dict(bundle, entry=[{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                                for e in raw_entries])
    issues = validate_resource(shell, "Bundle")
    if issues:
        raise MopedError(400, issues)
    allowed = codes.ALLOWED_TYPES[op]
    entries: list[Entry] = []
    type_issues: list[Issue] = []
    for i, e in enumerate(raw_entries):
        res = e.get("resource") if isinstance(e, dict) else None
        where = f"Bundle.entry[{i}].resource"
        if not isinstance(res, dict):
            issues.append(Issue(code="required", rule="fhir-r5", expression=where, message="entry without a resource"))
            continue
        rt = res.get("resourceType")
        if not isinstance(rt, str) or rt not in allowed:  # (a list here is unhashable)
            type_issues.append(Issue(code="not-supported", rule=f"bundle-content.{op}", expression=where,
                                     message=f"resource type {rt!r} is not accepted by ${op} "
                                             f"(allowed: {', '.join(sorted(allowed))})"))
            continue
        checked = fill_server_refs(json.loads(json.dumps(res)), PLACEHOLDERS, is_transfer=None)
        issues.extend(validate_resource(checked, f"{where}({rt})"))
        entries.append(Entry(full_url=e.get("fullUrl"), resource=res))
    if issues:
        raise MopedError(400, issues)
    if type_issues:
        raise MopedError(422, type_issues)
    if not entries:
        raise MopedError(422, [Issue(code="required", rule=f"bundle-content.{op}", expression="Bundle.entry",
                                     message=f"${op} needs at least one resource")])
    return entries
